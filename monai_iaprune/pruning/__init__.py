"""Structured pruning from relevance: torch-pruning Importance, prune(), MONAI fixes."""

from monai_iaprune.pruning.batchnorm import recalibrate_batchnorm
from monai_iaprune.pruning.importance import RelevanceImportance
from monai_iaprune.pruning.prune import PruneResult, count_macs, count_params, output_layers, prune

__all__ = ["recalibrate_batchnorm", "PruneResult", "RelevanceImportance", "count_macs", "count_params", "output_layers", "prune"]
