"""monai-iaprune: interpretability-aware structured pruning for MONAI 2D/3D networks."""

from monai_iaprune.pruning import PruneResult, RelevanceImportance, prune, recalibrate_batchnorm
from monai_iaprune.relevance import METHODS, ChannelRelevance, channel_relevance

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ChannelRelevance",
    "PruneResult",
    "RelevanceImportance",
    "channel_relevance",
    "prune",
    "recalibrate_batchnorm",
]
