"""Reports of a pruning run: the prune report, explanation agreement and faithfulness, and figures."""

from monai_iaprune.report import explanation_budget, explanations, plots, prune_report
from monai_iaprune.report.explanation_budget import *  # noqa: F403
from monai_iaprune.report.explanations import *  # noqa: F403
from monai_iaprune.report.plots import *  # noqa: F403
from monai_iaprune.report.prune_report import *  # noqa: F403

__all__ = [*explanation_budget.__all__, *explanations.__all__, *plots.__all__, *prune_report.__all__]
