"""Ignite / MONAI workflow handlers: relevance pruning during training, relevance collection on evaluators, reports."""

from monai_iaprune.handlers.explanation_consistency_handler import ExplanationConsistencyHandler
from monai_iaprune.handlers.patch_output_transform import PatchedBatches, PatchOutputTransform
from monai_iaprune.handlers.prune_report_handler import PruneReportHandler
from monai_iaprune.handlers.prune_resume_handler import PruneResumeHandler
from monai_iaprune.handlers.relevance_collector import RelevanceCollector
from monai_iaprune.handlers.relevance_pruning_handler import RelevancePruningHandler

__all__ = [
    "ExplanationConsistencyHandler",
    "PatchedBatches",
    "PatchOutputTransform",
    "PruneReportHandler",
    "PruneResumeHandler",
    "RelevanceCollector",
    "RelevancePruningHandler",
]
