"""Budgeted, cost-aware selection in prune(): budgets are met, cost-awareness buys MACs cheaper in relevance."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from monai_iaprune import ChannelRelevance, prune


def _wide_late() -> nn.Module:
    """Expensive narrow full-resolution convs, then cheap wide convs at 1/4 resolution."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Conv2d(8, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 2),
    )


X = torch.randn(1, 1, 32, 32)


def _relevance(model: nn.Module) -> ChannelRelevance:
    g = torch.Generator().manual_seed(1)
    values = {
        n: torch.rand(m.out_channels, generator=g) + 0.1
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    }
    values["11"] = torch.ones(2)
    return ChannelRelevance(values, "lrp", 1, X)


def _removed_relevance(rel, result) -> float:
    return sum(float(rel[n][idxs].sum()) for n, kind, idxs in result.history if kind == "out" and n in rel)


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_budget_is_met_and_not_overshot(ratio):
    model = _wide_late()
    result = prune(model, _relevance(model), ratio, target="macs", example_inputs=X, tolerance=0.02)
    assert result.cost_aware
    assert ratio <= result.macs_removed <= ratio + 0.02  # the search accepts [ratio, ratio + tolerance / 4]


def test_cost_aware_removes_more_macs_per_unit_relevance():
    base = _wide_late()
    rel = _relevance(base)
    aware, blind = copy.deepcopy(base), copy.deepcopy(base)
    ra = prune(aware, rel, 0.5, target="macs", example_inputs=X, normalizer=None)
    rb = prune(blind, rel, 0.5, target="macs", example_inputs=X, normalizer=None, cost_aware=False)
    per_a = ra.macs_removed / _removed_relevance(rel, ra)
    per_b = rb.macs_removed / _removed_relevance(rel, rb)
    assert per_a > per_b


@pytest.mark.parametrize("ratio", [0, -0.2, 1, 1.5])
def test_bad_fraction_budgets(ratio):
    model = _wide_late()
    with pytest.raises(ValueError):
        prune(model, _relevance(model), ratio, target="macs", example_inputs=X)


@pytest.mark.parametrize("speedup", [1.0, 0.5, -2, None])
def test_bad_speedup(speedup):
    model = _wide_late()
    with pytest.raises(ValueError, match="speedup"):
        prune(model, _relevance(model), target="latency", speedup=speedup, example_inputs=X)


def test_unreachable_latency_target(tmp_path, monkeypatch):
    import monai_iaprune.pruning.latency_table as lt

    # a deterministic timer: seconds proportional to the layer's MAC-like size
    monkeypatch.setattr(
        lt,
        "_time_call",
        lambda fn, x, device, repeats: 1e-6 * sum(p.numel() for p in fn.parameters()) * x.shape[-1] + 1e-3,
    )
    model = _wide_late()
    table = lt.measure_latency_table(model, X, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="not reachable"):
        prune(model, _relevance(model), target="latency", speedup=50.0, example_inputs=X, latency_table=table)
    result = prune(
        model, _relevance(model), target="latency", speedup=1.2, example_inputs=X, latency_table=table
    )
    assert result.latency_estimated_speedup >= 1.2 and result.speedup is not None
