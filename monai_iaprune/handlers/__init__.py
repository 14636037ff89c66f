"""Ignite / MONAI workflow handlers: relevance pruning during training, relevance collection on evaluators."""

from monai_iaprune.handlers.relevance_collector import RelevanceCollector
from monai_iaprune.handlers.relevance_pruning_handler import RelevancePruningHandler

__all__ = ["RelevanceCollector", "RelevancePruningHandler"]
