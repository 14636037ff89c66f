"""prune_iteratively: one step equals one-shot, three steps reach the total budget, progress is shown, a recovery
step between stages is honoured."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from monai_iaprune import channel_relevance, prune, recalibrate_batchnorm
from monai_iaprune.pruning import prune_iteratively
from monai_iaprune.pruning.iterative import prune_step


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


def _zero_first_conv_channels(model: nn.Module, stage: int) -> None:
    """A stand-in recovery step that changes what the next stage sees: the first conv's first two filters are 0."""
    with torch.no_grad():
        model[0].weight[:2] = 0.0
        model[0].bias[:2] = 0.0


def test_recover_runs_between_stages_and_the_next_stage_scores_its_result():
    """Oracle: a hand replay, prune_step -> recover -> prune_step with the remaining budget, gives the same
    network; recover is called after every stage but the last, with the stage number."""
    data = _data()
    calls: list[int] = []

    def recover(model: nn.Module, stage: int) -> None:
        calls.append(stage)
        _zero_first_conv_channels(model, stage)

    a, b = _net(), _net()
    results = prune_iteratively(
        a, data, "taylor", 0.5, target="macs", steps=2, progress=False, recover=recover
    )
    assert len(results) == 2 and calls == [0]
    first = prune_step(b, data, "taylor", 1 - 0.5**0.5, target="macs")
    _zero_first_conv_channels(b, 0)
    prune_step(b, data, "taylor", 1 - 0.5 / (1 - first.macs_removed), target="macs")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # without the recovery step the second stage prunes another network
    c = _net()
    prune_iteratively(c, data, "taylor", 0.5, target="macs", steps=2, progress=False)
    assert any(
        sa[k].shape != v.shape or not torch.equal(sa[k], v) for k, v in c.state_dict().items()
    )  # fmt: skip


def test_recover_not_called_for_one_step_and_must_be_callable():
    calls: list[int] = []
    prune_iteratively(_net(), _data(), "taylor", 0.3, target="macs", steps=1, progress=False, recover=lambda m, k: calls.append(k))  # fmt: skip
    assert calls == []
    with pytest.raises(TypeError, match="recover must be a callable"):
        prune_iteratively(_net(), _data(), "taylor", 0.3, target="macs", steps=2, progress=False, recover=3)
