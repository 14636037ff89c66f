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


def _biased_clock(monkeypatch, tmp_path, power: float):
    """A table from a deterministic layer clock, and a 'measured' latency that is the table's estimate to ``power``:
    the table then over- (power < 1) or under-estimates (power > 1) what a selection saves."""
    import importlib

    import monai_iaprune.pruning.latency_table as lt

    pr = importlib.import_module("monai_iaprune.pruning.prune")  # the attribute `prune` is the function
    monkeypatch.setattr(
        lt,
        "_time_call",
        lambda fn, x, device, repeats: 1e-6 * sum(p.numel() for p in fn.parameters()) * x.shape[-1] + 1e-3,
    )
    table = lt.measure_latency_table(_wide_late(), X, cache_dir=tmp_path, progress=False)
    monkeypatch.setattr(
        pr,
        "measure_latency_pair",
        lambda a, b, x, **kw: (table.estimate_model(a) ** power, table.estimate_model(b) ** power),
    )
    return table


def _true_speedup(table, base: nn.Module, pruned: nn.Module, power: float) -> float:
    return (table.estimate_model(base) / table.estimate_model(pruned)) ** power


@pytest.mark.parametrize("power", [0.7, 1.4])
def test_latency_feedback_reaches_the_measured_speedup(tmp_path, monkeypatch, power):
    """Oracle: the 'device' runs the table's estimate to ``power``. The table alone misses the request by > 5 %;
    the measured corrections land within 5 % and keep the trial closest to it."""
    table = _biased_clock(monkeypatch, tmp_path, power)
    base = _wide_late()
    alone, fed = copy.deepcopy(base), copy.deepcopy(base)
    r0 = prune(alone, _relevance(base), target="latency", speedup=1.5, example_inputs=X, latency_table=table,
               latency_feedback=0)  # fmt: skip
    r2 = prune(fed, _relevance(base), target="latency", speedup=1.5, example_inputs=X, latency_table=table)
    assert r0.latency_trials == []
    assert abs(_true_speedup(table, base, alone, power) / 1.5 - 1) > 0.05
    got = _true_speedup(table, base, fed, power)
    assert abs(got / 1.5 - 1) <= 0.05, r2.latency_trials
    assert r2.speedup == pytest.approx(got)
    assert len(r2.latency_trials) >= 2 and r2.latency_trials[0][0] == 1.5
    assert min(abs(m / 1.5 - 1) for _, m in r2.latency_trials) == pytest.approx(abs(got / 1.5 - 1))
    assert "latency_trials" in r2.as_dict()


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_bad_latency_feedback(bad):
    model = _wide_late()
    with pytest.raises(ValueError, match="latency_feedback"):
        prune(model, _relevance(model), target="latency", speedup=1.5, example_inputs=X, latency_feedback=bad)
