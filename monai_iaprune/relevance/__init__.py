"""Per-channel relevance: LRP (zennit), IG / conductance, DL-Backtrace and baseline criteria.

Importing this package imports every method module, and each registers itself in ``registry.METHODS``.
"""

from monai_iaprune.relevance import backtrace, baselines, conductance, lrp  # noqa: F401  (register the methods)
from monai_iaprune.relevance.blocks import BlockRelevance, block_relevance, find_blocks, removable_blocks
from monai_iaprune.relevance.collect import ChannelRelevance, channel_relevance
from monai_iaprune.relevance.differentiable_maps import DIFFERENTIABLE_EXPLAINERS
from monai_iaprune.relevance.layers import prunable_layers
from monai_iaprune.relevance.registry import (
    METHODS,
    RelevanceMethodSpec,
    get_method,
    input_map_methods,
    register_method,
    unregister_method,
)
from monai_iaprune.relevance.targets import target_selection

__all__ = [
    "METHODS",
    "BlockRelevance",
    "ChannelRelevance",
    "RelevanceMethodSpec",
    "block_relevance",
    "DIFFERENTIABLE_EXPLAINERS",
    "channel_relevance",
    "find_blocks",
    "get_method",
    "input_map_methods",
    "prunable_layers",
    "register_method",
    "removable_blocks",
    "target_selection",
    "unregister_method",
]
