"""Per-channel relevance: LRP (zennit), IG / conductance, DL-Backtrace and baseline criteria."""

from monai_iaprune.relevance.collect import (
    METHODS,
    ChannelRelevance,
    channel_relevance,
    check_input_dims,
    register_method,
    split_batch,
)
from monai_iaprune.relevance.differentiable_maps import DIFFERENTIABLE_EXPLAINERS
from monai_iaprune.relevance.layers import prunable_layers
from monai_iaprune.relevance.targets import target_selection

__all__ = [
    "ChannelRelevance",
    "DIFFERENTIABLE_EXPLAINERS",
    "METHODS",
    "channel_relevance",
    "check_input_dims",
    "prunable_layers",
    "register_method",
    "split_batch",
    "target_selection",
]
