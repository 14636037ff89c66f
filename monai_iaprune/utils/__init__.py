"""The lowest layer: helpers every other part may use (settings checks, DDP, batches, file I/O); imports nothing above."""

from monai_iaprune.utils.batch import (
    FirstOutput,
    check_input_dims,
    first_output,
    input_batches,
    model_device,
    plain_tensor,
    spatial_dims,
    split_batch,
)

__all__ = [
    "FirstOutput",
    "check_input_dims",
    "first_output",
    "input_batches",
    "model_device",
    "plain_tensor",
    "spatial_dims",
    "split_batch",
]
