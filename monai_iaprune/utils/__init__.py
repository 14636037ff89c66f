"""The lowest layer: helpers every other part may use (settings checks, DDP, batches, file I/O); imports nothing above."""

from monai_iaprune.utils import batch
from monai_iaprune.utils.batch import *  # noqa: F403

__all__ = list(batch.__all__)
