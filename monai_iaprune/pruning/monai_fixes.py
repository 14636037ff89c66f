"""Fixes that let torch-pruning handle MONAI networks (filled in per network family)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from torch import nn


@contextmanager
def monai_pruning_fixes(model: nn.Module):
    """Context in which torch-pruning can trace and prune ``model``."""
    yield


def pruner_kwargs_for(model: nn.Module) -> dict[str, Any]:
    """Extra ``MetaPruner`` arguments a network family needs (e.g. ``num_heads`` for attention)."""
    return {}
