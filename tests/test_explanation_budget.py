"""Explanation budget: the largest pruning ratio whose IG maps still agree with the unpruned network's."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ResNet
from torch import nn

from monai_iaprune.report.explanation_budget import AgreementNotReached, prune_to_min_agreement
from monai_iaprune.report.explanations import explanation_agreement


def tiny_resnet() -> nn.Module:
    torch.manual_seed(0)
    return ResNet(
        "basic",
        [1, 1, 1, 1],
        [8, 8, 16, 16],
        spatial_dims=2,
        n_input_channels=1,
        num_classes=2,
        conv1_t_size=3,
        no_max_pool=True,
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 1, 12, 12, generator=g), torch.tensor([0, 1, 0, 1, 0, 1])


def _relevance(net: nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: m.weight.detach().abs().flatten(1).sum(1)
        for n, m in net.named_modules()
        if isinstance(m, nn.Conv2d)
    }


def test_returns_the_largest_ratio_at_or_above_the_threshold():
    net = tiny_resnet().eval()
    x, y = _data()
    rel = _relevance(net)
    ratios = (0.2, 0.6, 0.4)
    # a threshold under the agreement of the mildest candidate, so some candidate passes
    loose = prune_to_min_agreement(
        net, rel, (x, y), 0.01, "ig", ratios, "channels", map_kwargs={"n_steps": 4}
    )
    tried = dict(loose.tried)
    assert list(tried) == sorted(tried, reverse=True)[: len(tried)]  # descending, stops at the first pass
    assert loose.agreement >= 0.01 and tried[loose.ratio] == loose.agreement
    assert all(a < 0.01 for r, a in loose.tried[:-1])
    assert sum(p.numel() for p in loose.model.parameters()) < sum(p.numel() for p in net.parameters())
    # the model handed back is the one measured: its agreement on the same data is the reported one
    again = explanation_agreement(net, loose.model, (x, y), "ig", n_steps=4, max_samples=None)
    assert again["spearman_median"] == pytest.approx(loose.agreement, abs=1e-6)
    # never below the threshold: asking for more than any candidate reached raises and names the best
    best = max(a for _, a in loose.tried)
    with pytest.raises(AgreementNotReached, match="best reached was") as err:
        prune_to_min_agreement(net, rel, (x, y), 1.0, "ig", (0.3, 0.2), "channels", map_kwargs={"n_steps": 4})
    assert best <= 1.0
    # the exception carries every candidate it measured, largest first, each below the threshold
    assert [r for r, _ in err.value.tried] == [0.3, 0.2] and all(a < 1.0 for _, a in err.value.tried)
    # the input model is left unpruned
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in tiny_resnet().parameters())


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), True])
def test_threshold_outside_unit_interval(bad):
    net = tiny_resnet()
    with pytest.raises(ValueError, match="min_agreement"):
        prune_to_min_agreement(net, _relevance(net), _data(), bad)


def test_unknown_explainer_and_bad_ratios():
    net = tiny_resnet()
    with pytest.raises(ValueError, match="unknown explainer"):
        prune_to_min_agreement(net, _relevance(net), _data(), 0.9, explainer="grad_cam")
    for ratios in ((), (0.0, 0.5), (1.0,)):
        with pytest.raises(ValueError, match="ratios"):
            prune_to_min_agreement(net, _relevance(net), _data(), 0.9, ratios=ratios)


def _budget_or_none(net, rel, data, threshold, cost_aware):
    try:
        return prune_to_min_agreement(
            net, rel, data, threshold, "lrp", (0.6, 0.4, 0.2), "macs", cost_aware=cost_aware
        )
    except AgreementNotReached:
        return None


@pytest.mark.parametrize("threshold", [0.25, 0.3, 0.5])  # raw wins at 0.6 / cost at 0.4 / none
def test_either_ranking_is_the_better_of_the_two_on_the_data_it_was_given(threshold):
    """``cost_aware="either"`` returns what running each ranking alone and keeping the larger ratio returns (the higher
    agreement at an equal ratio), never below the threshold, and prunes with the ranking it names."""
    net = tiny_resnet().eval()
    data = _data()
    rel = _relevance(net)
    alone = {rank: _budget_or_none(net, rel, data, threshold, rank) for rank in (True, False)}
    both = _budget_or_none(net, rel, data, threshold, "either")
    found = [b for b in alone.values() if b is not None]
    if not found:
        assert both is None
        with pytest.raises(AgreementNotReached) as err:
            prune_to_min_agreement(
                net, rel, data, threshold, "lrp", (0.6, 0.4, 0.2), "macs", cost_aware="either"
            )
        assert err.value.tried_cost_aware == [True, False] * 3 and len(err.value.tried) == 6
        return
    best = max(found, key=lambda b: (b.ratio, b.agreement))
    assert both is not None and both.agreement >= threshold
    assert (both.ratio, both.agreement) == pytest.approx((best.ratio, best.agreement))
    assert both.cost_aware == next(rank for rank, b in alone.items() if b is best)
    # the model handed back is the chosen ranking's: the same channels as that ranking run alone
    ref = alone[both.cost_aware]
    assert ref is not None and ref.ratio == both.ratio
    assert [p.shape for p in both.model.parameters()] == [p.shape for p in ref.model.parameters()]
    assert both.tried_cost_aware[: len(both.tried)] == [True, False] * (len(both.tried) // 2)


def test_bad_cost_aware_is_refused():
    net = tiny_resnet()
    for bad in ("maybe", 1):
        with pytest.raises(ValueError, match="cost_aware must be True, False, None or 'either'"):
            prune_to_min_agreement(net, _relevance(net), _data(), 0.9, cost_aware=bad)
    with pytest.raises(ValueError, match="needs a params, macs or latency budget"):
        prune_to_min_agreement(net, _relevance(net), _data(), 0.9, target="channels", cost_aware="either")
