"""prune_iteratively: one step equals one-shot, three steps reach the total budget, progress is shown."""

from __future__ import annotations

import copy

import torch
from torch import nn

from monai_iaprune import channel_relevance, prune, recalibrate_batchnorm
from monai_iaprune.pruning import prune_iteratively


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    )


def _data():
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(4, 1, 16, 16, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(2)
    ]


def test_one_step_equals_one_shot():
    data = _data()
    a, b = _net(), _net()
    prune_iteratively(a, data, "taylor", 0.4, target="macs", steps=1, progress=False)
    rel = channel_relevance(b, data, "taylor", progress=False)
    prune(b, rel, 0.4, target="macs")
    recalibrate_batchnorm(b, data)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_three_steps_reach_the_total(capsys):
    model = _net()
    before = copy.deepcopy(model)
    results = prune_iteratively(model, _data(), "taylor", 0.5, target="params", steps=3, tolerance=0.02)
    assert "pruning steps" in capsys.readouterr().err
    assert 1 <= len(results) <= 3
    removed = 1 - sum(p.numel() for p in model.parameters()) / sum(p.numel() for p in before.parameters())
    assert removed >= 0.5 - 0.02
    assert model(torch.randn(1, 1, 16, 16)).shape == (1, 2)
