"""Structured pruning from relevance: torch-pruning Importance, prune(), MONAI fixes, BN re-calibration,
optimizer remap, pruned checkpoints and inference clean-up."""

from monai_iaprune.pruning.batchnorm import recalibrate_batchnorm
from monai_iaprune.pruning.checkpoint import export_torchscript, load_pruned, save_pruned
from monai_iaprune.pruning.explanation_consistency import ExplanationConsistencyLoss, map_distance
from monai_iaprune.pruning.importance import RelevanceImportance
from monai_iaprune.pruning.optimizer import parameter_snapshot, remap_optimizer
from monai_iaprune.pruning.prune import (
    PruneResult,
    count_macs,
    count_params,
    output_layers,
    prune,
    resolve_normalizer,
)
from monai_iaprune.pruning.speed import (
    OneDNNConv,
    OneDNNPool,
    fold_batchnorm,
    optimize_for_inference,
    select_kernels,
)

__all__ = [
    "ExplanationConsistencyLoss",
    "OneDNNConv",
    "OneDNNPool",
    "PruneResult",
    "RelevanceImportance",
    "count_macs",
    "count_params",
    "export_torchscript",
    "fold_batchnorm",
    "load_pruned",
    "map_distance",
    "optimize_for_inference",
    "output_layers",
    "parameter_snapshot",
    "prune",
    "recalibrate_batchnorm",
    "remap_optimizer",
    "resolve_normalizer",
    "save_pruned",
    "select_kernels",
]
