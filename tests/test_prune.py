"""prune(): argument errors, consistency of PruneResult, protected output layers, which channels go."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from monai.networks import nets
from torch import nn

from monai_iaprune import ChannelRelevance, channel_relevance, prune
from monai_iaprune.pruning import count_macs, count_params

prune_module = sys.modules["monai_iaprune.pruning.prune"]  # the package's ``prune`` is the function
meta_copy = prune_module.meta_copy

X2 = torch.randn(1, 1, 16, 16)


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def _ones(model: nn.Module) -> ChannelRelevance:
    rel = channel_relevance(model, None, "magnitude", progress=False)
    rel.example_input = X2
    return rel


def _unet() -> nn.Module:
    torch.manual_seed(0)
    return nets.UNet(
        spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2), num_res_units=1
    )


@pytest.mark.parametrize("ratio", [0, 1, -0.1, 1.5, "0.5", True])
def test_bad_ratio(ratio):
    model = _tiny()
    with pytest.raises(ValueError, match="ratio"):
        prune(model, _ones(model), ratio)


def test_unknown_target():
    model = _tiny()
    with pytest.raises(ValueError, match="target"):
        prune(model, _ones(model), 0.5, target="flops")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_relevance(bad):
    model = _tiny()
    rel = _ones(model)
    rel["3"] = rel["3"].clone()
    rel["3"][2] = bad
    with pytest.raises(FloatingPointError, match="'3'"):
        prune(model, rel, 0.5)


def test_unreachable_ratio_is_explained():
    model = _tiny()
    with pytest.raises(ValueError, match="cannot be reached"):
        prune(model, _ones(model), 0.9, max_layer_ratio=0.5)


def test_relevance_for_missing_layer_or_wrong_size():
    model = _tiny()
    rel = _ones(model)
    rel["nope"] = torch.ones(4)
    with pytest.raises(KeyError, match="nope"):
        prune(model, rel, 0.3)
    rel = _ones(model)
    rel["0"] = torch.ones(5)
    with pytest.raises(ValueError, match="5 entries"):
        prune(model, rel, 0.3)


def test_missing_example_input():
    model = _tiny()
    rel = _ones(model)
    rel.example_input = None
    with pytest.raises(ValueError, match="example_inputs"):
        prune(model, rel, 0.3)


def _check_result(model: nn.Module, result, x: torch.Tensor) -> None:
    assert result.params_after == count_params(model)
    assert result.macs_after == pytest.approx(count_macs(model, x))
    modules = dict(model.named_modules())
    for name, (before, after) in result.channels.items():
        m = modules[name]
        assert after == (m.out_features if isinstance(m, nn.Linear) else m.out_channels), name
        assert after <= before


@pytest.mark.parametrize("target", ["params", "macs"])
def test_result_reaches_the_requested_fraction(target):
    model = _unet()
    rel = channel_relevance(model, None, "magnitude", progress=False)
    x = torch.randn(1, 1, 32, 32)
    result = prune(model, rel, 0.4, target=target, example_inputs=x, tolerance=0.02)
    _check_result(model, result, x)
    reached = result.params_removed if target == "params" else result.macs_removed
    assert abs(reached - 0.4) <= 0.02
    assert result.channels["model.2.1.conv.unit0.conv"] == (2, 2)  # segmentation output conv kept
    assert result.channels["model.2.0.conv"] == (2, 2)  # and the up-conv summed into it
    assert model.eval()(x).shape == (1, 2, 32, 32)


def test_channels_target_and_local_pruning():
    model = _tiny()
    result = prune(model, _ones(model), 0.5, target="channels", global_pruning=False)
    assert result.channel_ratio == 0.5
    assert result.channels["0"] == (8, 4) and result.channels["3"] == (8, 4)
    assert result.channels["7"] == (3, 3)  # classifier head never pruned
    _check_result(model, result, X2)


def test_history_names_every_pruned_module():
    model = _tiny()
    result = prune(model, _ones(model), 0.5, target="channels", global_pruning=False)
    outs = {(name, kind) for name, kind, idxs in result.history if idxs}
    assert ("0", "out") in outs and ("1", "out") in outs and ("3", "in") in outs and ("7", "in") in outs


def test_pruned_model_trains():
    model = _unet()
    rel = channel_relevance(model, None, "magnitude", progress=False)
    x = torch.randn(2, 1, 32, 32)
    prune(model, rel, 0.5, example_inputs=x[:1])
    model.train()
    loss = nn.functional.cross_entropy(model(x), torch.randint(0, 2, (2, 32, 32)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_lowest_relevance_channels_are_removed():
    model = _tiny()
    original = copy.deepcopy(model)
    rel = _ones(model)
    rel["0"] = torch.ones(8)
    rel["0"][5] = 1e-3  # clearly the least relevant channel of the first conv
    rel["3"] = torch.ones(8)
    rel["3"][2] = 1e-3
    result = prune(model, rel, 1 / 8, target="channels", global_pruning=False)
    assert result.channels["0"] == (8, 7) and result.channels["3"] == (8, 7)
    keep0 = [i for i in range(8) if i != 5]
    keep3 = [i for i in range(8) if i != 2]
    torch.testing.assert_close(model[0].weight, original[0].weight[keep0])
    torch.testing.assert_close(model[1].weight, original[1].weight[keep0])  # BatchNorm follows its conv
    torch.testing.assert_close(model[3].weight, original[3].weight[keep3][:, keep0])
    torch.testing.assert_close(model[7].weight, original[7].weight[:, keep3])


def test_global_pruning_prefers_the_less_relevant_layer():
    model = _tiny()
    rel = _ones(model)
    rel["0"] = torch.linspace(1.0, 2.0, 8)
    rel["3"] = torch.linspace(1.0, 2.0, 8)
    # the "mean" normaliser compares layers by relative relevance: make conv 3's spread much wider
    rel["3"] = torch.tensor([0.01, 0.01, 0.01, 0.01, 2.0, 2.0, 2.0, 2.0])
    result = prune(model, rel, 0.25, target="channels", global_pruning=True)
    assert result.channels["3"][1] < result.channels["0"][1]


def test_auto_normalizer_follows_the_relevance_method():
    from monai_iaprune.pruning.prune import resolve_normalizer
    from monai_iaprune.relevance.collect import ChannelRelevance

    model = _tiny()
    # raw scores: conv 0 is 10x less relevant everywhere; per-layer "mean" normalisation hides that
    raw = {"0": torch.linspace(0.1, 0.2, 8), "3": torch.tensor([1.0] * 4 + [4.0] * 4)}
    for method, expect in (
        ("lrp", None),
        ("ig", None),
        ("taylor", None),
        ("dlb", "mean"),
        ("magnitude", "mean"),
    ):
        assert resolve_normalizer("auto", ChannelRelevance(raw, method, 1)) == expect
    assert resolve_normalizer("auto", raw) == "mean"  # a plain dict: no method known
    # raw scores only when the ratio counts parameters
    assert resolve_normalizer("auto", ChannelRelevance(raw, "lrp", 1), "macs") == "mean"
    assert resolve_normalizer("rank", ChannelRelevance(raw, "lrp", 1)) == "rank"
    with pytest.raises(ValueError, match="unknown normalizer 'l2'"):
        resolve_normalizer("l2", raw)
    x = torch.randn(1, 1, 8, 8)
    lrp = prune(copy.deepcopy(model), ChannelRelevance(raw, "lrp", 1, x), 0.2)
    mag = prune(copy.deepcopy(model), ChannelRelevance(raw, "magnitude", 1, x), 0.2)
    # raw LRP scores: every removed channel comes from the low-relevance conv 0
    assert lrp.channels["0"][1] < 8 and lrp.channels["3"][1] == 8
    # "mean": conv 3's weak half is weakest relative to its layer (0.4 of the mean vs 0.67 for conv 0)
    assert mag.channels["0"][1] == 8 and mag.channels["3"][1] < 8


def test_default_layer_cap_keeps_a_tenth_of_every_layer():
    """Raw scores that rank one layer far below the rest: the default cap (0.9) keeps 2 of its 20 channels."""

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(1, 20, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(20, 20, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(20, 3),
        )

    def rel(model: nn.Module) -> ChannelRelevance:
        r = _ones(model)
        r["0"] = torch.full((20,), 1e-6) + torch.arange(20) * 1e-8  # far below layer "2"
        r["2"] = torch.ones(20) + torch.arange(20) * 1e-3
        return r

    default = net()
    prune(default, rel(default), 0.9, normalizer=None)
    assert default[0].out_channels == 2  # 20 - floor(0.9 * 20)
    assert default[2].out_channels < 20  # the rest of the budget came from the other layer
    looser = net()
    prune(looser, rel(looser), 0.9, normalizer=None, max_layer_ratio=0.95)
    assert looser[0].out_channels == 1


def test_frozen_network_is_pruned_and_stays_frozen():
    """Issue #13: with every parameter frozen torch-pruning traced no autograd graph and pruned nothing (or
    reported an unreachable ratio); a frozen layer ahead of trainable ones was silently left whole."""
    from monai.networks.nets import DenseNet

    net = DenseNet(2, 1, 2, init_features=8, growth_rate=4, block_config=(1, 1), bn_size=2)
    net.features.conv0.requires_grad_(False)  # a frozen stem: no grad_fn reaches it
    for p in net.class_layers.parameters():
        p.requires_grad_(False)
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    x = torch.randn(1, 1, 16, 16)
    rel = channel_relevance(net, None, "magnitude", progress=False)
    result = prune(net, rel, 0.5, example_inputs=x)
    assert result.params_after < 0.55 * result.params_before
    assert net.features.conv0.out_channels < 8  # the frozen stem was pruned too
    assert {n for n, p in net.named_parameters() if not p.requires_grad} == frozen  # flags restored


def test_meta_copy_has_the_shapes_and_no_data():
    model = _unet()
    model.model[0].conv.unit0.conv.weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    meta = prune_module.meta_copy(model)
    assert all(p.is_meta for p in meta.parameters()) and all(b.is_meta for b in meta.buffers())
    assert [(n, p.shape, p.requires_grad) for n, p in meta.named_parameters()] == [
        (n, p.shape, p.requires_grad) for n, p in model.named_parameters()
    ]
    assert [(n, b.shape) for n, b in meta.named_buffers()] == [(n, b.shape) for n, b in model.named_buffers()]
    assert all(
        torch.equal(v, model.state_dict()[k]) for k, v in before.items()
    )  # the original keeps its data
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize(
    "build,x",
    [
        (_unet, torch.randn(1, 1, 32, 32)),
        (
            lambda: nets.SEResNet50(spatial_dims=3, in_channels=1, num_classes=2, layers=(1, 1, 1, 1)),
            torch.randn(1, 1, 16, 16, 16),
        ),
        (
            lambda: nets.SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8),
            torch.randn(1, 1, 16, 16, 16),
        ),
    ],
    ids=["unet2d", "seresnet3d", "segresnet3d"],
)
@pytest.mark.parametrize("target", ["params", "macs"])
def test_trials_on_meta_copies_choose_what_real_copies_choose(build, x, target, monkeypatch):
    """The ratio search counted on meta copies (big networks) ends where it ends on real copies."""
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        seg = model(x).ndim > 2
    y = torch.randint(0, 2, (1, 1, *x.shape[2:])) if seg else torch.tensor([[1]])
    rel = channel_relevance(model, [(x, y)], "taylor", progress=False)
    results = {}
    for meta in (True, False):
        monkeypatch.setattr(prune_module, "META_TRIAL_PARAMS", 0 if meta else float("inf"))
        monkeypatch.setattr(prune_module, "META_TRIAL_MACS", 0 if meta else float("inf"))
        copies = []
        monkeypatch.setattr(prune_module, "meta_copy", lambda m, seen=copies: seen.append(1) or meta_copy(m))
        m = copy.deepcopy(model)
        r = prune(m, rel, 0.5, target=target, example_inputs=x)
        assert bool(copies) == meta  # the search really counted where this run says
        results[meta] = (r.channel_ratio, r.channels, r.history, r.params_after, r.macs_after)
    assert results[True] == results[False]


def test_a_network_that_fails_on_meta_is_counted_on_real_copies(monkeypatch):
    monkeypatch.setattr(prune_module, "META_TRIAL_PARAMS", 0)

    def no_meta(model):
        raise NotImplementedError("a forward that needs real values")

    monkeypatch.setattr(prune_module, "meta_copy", no_meta)
    model = _unet()
    x = torch.randn(1, 1, 32, 32)
    result = prune(model, channel_relevance(model, None, "magnitude", progress=False), 0.4, example_inputs=x)
    assert abs(result.params_removed - 0.4) <= 0.01
