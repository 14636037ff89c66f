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
