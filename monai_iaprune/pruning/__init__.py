"""Structured pruning from relevance: torch-pruning Importance, prune(), MONAI fixes, BN re-calibration,
optimizer remap, pruned checkpoints, deployment exports and inference clean-up."""

from monai_iaprune.pruning.batchnorm import recalibrate_batchnorm
from monai_iaprune.pruning.checkpoint import export_torchscript, load_pruned, save_pruned
from monai_iaprune.pruning.cost import ChannelCost, channel_costs
from monai_iaprune.pruning.depth import (
    DepthBudgetUnreachable,
    DepthPruneResult,
    prune_depth,
    removed_block_names,
)
from monai_iaprune.pruning.explanation_consistency import ExplanationConsistencyLoss, map_distance
from monai_iaprune.pruning.export import export_onnx, export_torch_export
from monai_iaprune.pruning.feature_distillation import FeatureDistillationLoss, kept_channels
from monai_iaprune.pruning.importance import CostAwareImportance, RelevanceImportance
from monai_iaprune.pruning.iterative import prune_iteratively, prune_step
from monai_iaprune.pruning.latency_table import (
    LatencyTable,
    measure_latency,
    measure_latency_pair,
    measure_latency_table,
)
from monai_iaprune.pruning.monai_fixes import output_layers
from monai_iaprune.pruning.optimizer import parameter_snapshot, remap_optimizer
from monai_iaprune.pruning.prune import (
    PruneResult,
    count_macs,
    count_params,
    prune,
    resolve_normalizer,
)
from monai_iaprune.pruning.quiet import quiet_op_counter
from monai_iaprune.pruning.speed import (
    OneDNNConv,
    OneDNNPool,
    fold_batchnorm,
    optimize_for_inference,
    select_kernels,
)

__all__ = [
    "DepthBudgetUnreachable",
    "DepthPruneResult",
    "prune_depth",
    "removed_block_names",
    "ChannelCost",
    "CostAwareImportance",
    "LatencyTable",
    "channel_costs",
    "measure_latency",
    "measure_latency_pair",
    "measure_latency_table",
    "prune_iteratively",
    "prune_step",
    "ExplanationConsistencyLoss",
    "FeatureDistillationLoss",
    "kept_channels",
    "OneDNNConv",
    "OneDNNPool",
    "PruneResult",
    "RelevanceImportance",
    "count_macs",
    "count_params",
    "export_onnx",
    "export_torch_export",
    "export_torchscript",
    "fold_batchnorm",
    "load_pruned",
    "map_distance",
    "optimize_for_inference",
    "output_layers",
    "parameter_snapshot",
    "prune",
    "quiet_op_counter",
    "recalibrate_batchnorm",
    "remap_optimizer",
    "resolve_normalizer",
    "save_pruned",
    "select_kernels",
]
