"""RelevanceImportance: group scores from per-layer relevance, as torch-pruning sees them."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from monai_iaprune import prune
from monai_iaprune.pruning.importance import RelevanceImportance


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 2),
    )


def test_group_scores_follow_relevance_at_group_indices():
    net = _net()
    x = torch.randn(1, 1, 8, 8)
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=x)
    rel = torch.tensor([5.0, 1.0, 3.0, 2.0, 8.0, 4.0, 7.0, 6.0])
    imp = RelevanceImportance({net[0]: rel}, normalizer=None)
    group = dg.get_pruning_group(net[0], tp.prune_conv_out_channels, idxs=list(range(8)))
    torch.testing.assert_close(imp(group), rel)
    # a mean normaliser keeps the order and divides by the layer's mean
    imp = RelevanceImportance({net[0]: rel}, normalizer="mean")
    torch.testing.assert_close(imp(group), rel / rel.mean())
    ranks = RelevanceImportance({net[0]: rel}, normalizer="rank")(group)
    assert torch.equal(ranks.argsort(), rel.argsort())


def test_group_without_scored_member_is_left_alone():
    net = _net()
    x = torch.randn(1, 1, 8, 8)
    dg = tp.DependencyGraph().build_dependency(net, example_inputs=x)
    imp = RelevanceImportance({net[2]: torch.rand(8)})
    group = dg.get_pruning_group(net[0], tp.prune_conv_out_channels, idxs=list(range(8)))
    assert imp(group) is None


def test_all_zero_relevance_counts_as_unscored():
    """A layer LRP scores exactly 0 everywhere (e.g. SE excitation) must not be pruned first."""
    x = torch.randn(1, 1, 8, 8)
    net = _net()
    res = prune(
        net, {"0": torch.zeros(8), "2": torch.arange(1.0, 9.0)}, 0.5, target="channels", example_inputs=x
    )
    assert res.channels["0"] == (8, 8)
    assert res.channels["2"][1] < 8
    # with tiny but non-zero relevance the first layer is ranked, and loses channels
    net = _net()
    res = prune(
        net,
        {"0": torch.full((8,), 1e-3) + torch.arange(8) * 1e-4, "2": torch.arange(1.0, 9.0)},
        0.5,
        target="channels",
        example_inputs=x,
    )
    assert res.channels["0"][1] < 8


@pytest.mark.parametrize("kwargs", [{"normalizer": "l3"}, {"group_reduction": "median"}])
def test_bad_settings_are_named(kwargs):
    with pytest.raises(ValueError, match="unknown"):
        RelevanceImportance({}, **kwargs)


def test_nan_relevance_rejected():
    with pytest.raises(FloatingPointError, match="NaN"):
        RelevanceImportance({nn.Conv2d(1, 2, 1): torch.tensor([1.0, float("nan")])})
