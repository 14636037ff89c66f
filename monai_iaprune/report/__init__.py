"""Reports of a pruning run: the prune report, explanation agreement and faithfulness, and figures."""

from monai_iaprune.report.explanation_budget import (
    AgreementBudget,
    AgreementNotReached,
    prune_to_min_agreement,
)
from monai_iaprune.report.explanations import (
    agreement_from_maps,
    attribution_maps,
    curve_auc,
    deletion_insertion_curves,
    explained_selection,
    explanation_agreement,
    explanation_report,
    faithfulness,
    map_ssim,
    spearman_correlation,
    top_fraction_iou,
)
from monai_iaprune.report.plots import (
    log_heatmaps_to_tensorboard,
    plot_accuracy_vs_params,
    plot_channels_per_layer,
    plot_faithfulness_curves,
    plot_heatmap_overlays,
    plot_relevance_distribution,
)
from monai_iaprune.report.prune_report import (
    measure_latency,
    package_versions,
    render_markdown,
    write_prune_report,
)

__all__ = [
    "AgreementBudget",
    "AgreementNotReached",
    "agreement_from_maps",
    "attribution_maps",
    "curve_auc",
    "deletion_insertion_curves",
    "explained_selection",
    "explanation_agreement",
    "explanation_report",
    "faithfulness",
    "log_heatmaps_to_tensorboard",
    "map_ssim",
    "measure_latency",
    "package_versions",
    "plot_accuracy_vs_params",
    "plot_channels_per_layer",
    "plot_faithfulness_curves",
    "plot_heatmap_overlays",
    "plot_relevance_distribution",
    "prune_to_min_agreement",
    "render_markdown",
    "spearman_correlation",
    "top_fraction_iou",
    "write_prune_report",
]
