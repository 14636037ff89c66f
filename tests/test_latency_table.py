"""Latency table: cache round trip, monotone interpolation, argument errors (no timing asserts)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import monai_iaprune.pruning.latency_table as lt

X = torch.randn(1, 1, 16, 16)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Flatten(),
        nn.Linear(8 * 16 * 16, 2),
    )


@pytest.fixture
def timer(monkeypatch):
    calls = []

    def fake(fn, x, device, repeats):
        calls.append(fn)
        return 1e-7 * sum(p.numel() for p in fn.parameters()) * x.shape[-1] + 1e-4

    monkeypatch.setattr(lt, "_time_call", fake)
    return calls


def test_cache_round_trip(tmp_path, timer, capsys):
    table = lt.measure_latency_table(_net(), X, cache_dir=tmp_path, threads=1, progress=True)
    assert "latency table" in capsys.readouterr().err
    assert timer and (tmp_path / lt.CACHE_FILE).exists()
    n = len(timer)
    again = lt.measure_latency_table(_net(), X, cache_dir=tmp_path, threads=1, progress=False)
    assert len(timer) == n  # nothing measured the second time
    assert again.layers == table.layers and again.overhead == table.overhead
    lt.measure_latency_table(_net(), X, cache_dir=tmp_path, threads=2, progress=False)
    assert len(timer) > n  # another thread count is another key


def test_interpolation_is_monotone(tmp_path, timer):
    table = lt.measure_latency_table(_net(), X, cache_dir=tmp_path, threads=1, progress=False)
    t = table.layers["2"]
    values = [t(c, c) for c in torch.linspace(1, 8, 30).tolist()]
    assert all(b >= a for a, b in zip(values, values[1:]))
    noisy = lt.LayerLatency([2, 4], [2, 4], lt._cummax([[2.0, 1.0], [1.0, 3.0]]))
    assert noisy(2, 4) >= noisy(2, 2) and noisy(4, 2) >= noisy(2, 2)
    full = table.estimate({})
    assert table.estimate({"2": (4, 4)}) <= full


@pytest.mark.parametrize(
    "kw",
    [
        {"device": "nodevice"},
        {"device": "mps"},
        {"threads": 0},
        {"threads": -1},
        {"threads": 1.5},
        {"fractions": (0.0, 1.0)},
    ],
)
def test_bad_arguments(tmp_path, kw):
    with pytest.raises(ValueError):
        lt.measure_latency_table(_net(), X, cache_dir=tmp_path, progress=False, **kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_unavailable(tmp_path):
    with pytest.raises(ValueError, match="CUDA"):
        lt.measure_latency_table(_net(), X, device="cuda", cache_dir=tmp_path, progress=False)


C0, C1 = 3e-4, 2e-8  # the fake network's constant non-layer seconds and seconds per layer output element


def _layer_time(m: nn.Module, x: torch.Tensor) -> float:
    """Bilinear in a layer's channel counts (so the table interpolates it exactly)."""
    return 1e-7 * sum(p.numel() for p in m.parameters()) * (x.shape[-1] if x.dim() > 2 else 1) + 1e-4


@pytest.fixture
def affine_timer(monkeypatch):
    """A layer costs ``_layer_time``; a network the sum of its layers plus ``C0 + C1 x`` their output elements."""

    def fake(fn, x, device, repeats):
        layers = [m for m in fn.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        if fn in layers:
            return _layer_time(fn, x)
        seen: list[tuple[float, int]] = []
        hooks = [
            m.register_forward_hook(lambda m, i, o: seen.append((_layer_time(m, i[0]), o.numel())))
            for m in layers
        ]
        try:
            fn(x)
        finally:
            for h in hooks:
                h.remove()
        return sum(t for t, _ in seen) + C0 + C1 * sum(e for _, e in seen)

    monkeypatch.setattr(lt, "_time_call", fake)


def _wide_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    )


def test_non_layer_time_is_fitted_on_a_narrowed_copy(tmp_path, affine_timer):
    """Oracle: the fake clock's constant and per-element time are recovered, and the table then predicts a pruned
    network's time exactly (a constant overhead alone overestimates it)."""
    net = _wide_net()
    table = lt.measure_latency_table(net, X, cache_dir=tmp_path, threads=1, progress=False)
    assert table.overhead == pytest.approx(C0, rel=1e-6)
    assert table.activation_seconds == pytest.approx(C1, rel=1e-6)
    assert table.layers["0"].out_elements == 16 * 16
    narrow = {"0": (1, 5), "3": (5, 7), "8": (7, 2)}
    truth = sum(_layer_time(nn.Conv2d(a, b, 3, padding=1), X) for a, b in [(1, 5), (5, 7)])
    truth += _layer_time(nn.Linear(7, 2), torch.zeros(1, 7)) + C0 + C1 * (5 * 256 + 7 * 256 + 2)
    assert table.estimate(narrow) == pytest.approx(truth, rel=1e-6)
    constant = lt.LatencyTable(
        table.layers, table.estimate({}) - lt.LatencyTable(table.layers, 0.0, "").estimate({}), ""
    )
    assert constant.estimate(narrow) > truth * 1.05
    again = lt.measure_latency_table(net, X, cache_dir=tmp_path, threads=1, progress=False)
    assert again.activation_seconds == table.activation_seconds  # the calibration is cached with the table


def test_channel_cost_counts_the_activation_time(tmp_path, affine_timer):
    """Removing one channel of conv 0 saves what the table's estimate says (finite difference)."""
    from monai_iaprune.pruning.cost import ChannelCost

    table = lt.measure_latency_table(_wide_net(), X, cache_dir=tmp_path, threads=1, progress=False)
    saved = table.estimate({}) - table.estimate({"0": (1, 15), "3": (15, 16)})
    cost = ChannelCost(params=0.0, macs=0.0, out_layers=("0",), in_layers=("3",))
    assert table.channel_cost(cost) == pytest.approx(saved, rel=1e-6)
    assert table.activation_seconds * 256 == pytest.approx(C1 * 256)  # part of it: one channel's activations
    without = lt.LatencyTable(table.layers, table.overhead, table.device)
    assert table.channel_cost(cost) - without.channel_cost(cost) == pytest.approx(C1 * 256, rel=1e-6)


def test_a_network_that_cannot_be_narrowed_keeps_a_constant_overhead(tmp_path, affine_timer, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("no narrowing")

    monkeypatch.setattr(lt, "_narrowed", refuse)
    with pytest.warns(UserWarning, match="could not be narrowed"):
        table = lt.measure_latency_table(_wide_net(), X, cache_dir=tmp_path, threads=1, progress=False)
    assert table.activation_seconds == 0.0
    assert table.estimate({}) == pytest.approx(lt._time_call(_wide_net().eval(), X, "cpu", 1), rel=1e-6)


@pytest.mark.parametrize(
    "points, expected",
    [
        ([(10.0, 4.0, 100.0), (6.0, 2.0, 50.0)], (2.0, 0.04)),  # exact line
        ([(10.0, 4.0, 100.0), (9.0, 2.0, 50.0)], (6.0, 0.0)),  # more non-layer time when narrower: constant
        ([(10.0, 4.0, 100.0), (2.5, 2.0, 50.0)], (0.0, 0.06)),  # negative intercept: all in the slope
        ([(10.0, 4.0, 100.0)], (6.0, 0.0)),  # no narrowed copy
        ([(3.0, 4.0, 100.0), (1.0, 2.0, 50.0)], (0.0, 0.0)),  # layers over the whole: nothing left
    ],
)
def test_fit_non_layer_time(points, expected):
    overhead, slope = lt._fit_non_layer_time(points)
    assert overhead == pytest.approx(expected[0]) and slope == pytest.approx(expected[1])


def test_latency_pair_times_both_interleaved(monkeypatch):
    """Call for call: a clock that slows down during the run hits both networks alike."""
    calls: list[str] = []
    clock = iter(range(1000))
    monkeypatch.setattr(lt.time, "perf_counter", lambda: float(next(clock)) ** 1.5)  # ever slower

    class Tagged(nn.Module):
        def __init__(self, tag: str):
            super().__init__()
            self.tag = tag

        def forward(self, x):
            calls.append(self.tag)
            return x

    a, b = lt.measure_latency_pair(Tagged("a"), Tagged("b"), X, threads=1, repeats=5)
    assert calls == ["a", "b"] * 6  # one warm-up each, then alternating
    assert 0.8 < a / b < 1.0  # the first of each pair is a little earlier on the slowing clock, never far off
    with pytest.raises(ValueError, match="repeats"):
        lt.measure_latency_pair(Tagged("a"), Tagged("b"), X, repeats=0)
