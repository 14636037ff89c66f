"""monai-iaprune: interpretability-aware structured pruning for MONAI 2D/3D networks."""

from monai_iaprune.pruning import (
    PruneResult,
    RelevanceImportance,
    channel_costs,
    prune,
    prune_depth,
    prune_iteratively,
    recalibrate_batchnorm,
)
from monai_iaprune.relevance import (
    METHODS,
    ChannelRelevance,
    block_relevance,
    channel_relevance,
    register_method,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ChannelRelevance",
    "PruneResult",
    "RelevanceImportance",
    "block_relevance",
    "channel_costs",
    "channel_relevance",
    "prune",
    "prune_depth",
    "prune_iteratively",
    "recalibrate_batchnorm",
    "register_method",
]
