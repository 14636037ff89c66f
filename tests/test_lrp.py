"""LRP (zennit) relevance: conservation on MONAI nets in 2D and 3D, canonizers, errors, collection."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import DenseNet, ResNet, SEResNet50, UNet, ViT
from torch import nn
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonPlusFlat

from monai_iaprune.relevance import channel_relevance, prunable_layers
from monai_iaprune.relevance.canonizers import GraphMergeBatchNorm, merge_pairs
from monai_iaprune.relevance.lrp import _propagate, input_relevance, lrp

EPS = 1e-9


def zero_bias(model: nn.Module) -> nn.Module:
    """Zero every bias / BN shift / embedding, randomise BN scale and variance; float64, eval mode."""
    for m in model.modules():
        for name, p in m.named_parameters(recurse=False):
            if name in ("bias", "position_embeddings", "cls_token"):
                nn.init.zeros_(p)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.zero_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
    return model.double().eval()


def densenet(sd: int) -> nn.Module:
    # DenseNet121 layout (6, 12, 24, 16) with tiny widths
    return DenseNet(sd, 1, 3, init_features=8, growth_rate=4, block_config=(6, 12, 24, 16), bn_size=2)


def resnet18(sd: int) -> nn.Module:
    # resnet18 layout (basic blocks, [2, 2, 2, 2]) with tiny widths
    return ResNet("basic", [2, 2, 2, 2], [4, 8, 8, 16], spatial_dims=sd, n_input_channels=1, num_classes=3)


def unet(sd: int) -> nn.Module:
    return UNet(sd, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="batch")


def class_select(k: int = 0):
    def select(out: torch.Tensor) -> torch.Tensor:
        sel = torch.zeros_like(out)
        sel[:, k] = 1
        return sel

    return select


def pred_mask_select(out: torch.Tensor) -> torch.Tensor:
    idx = torch.arange(out.shape[1]).view(1, -1, *([1] * (out.ndim - 2)))
    return (out.argmax(1, keepdim=True) == idx).to(out.dtype)


def target_value(model: nn.Module, x: torch.Tensor, select) -> torch.Tensor:
    out = model(x)
    out = out[0] if isinstance(out, tuple) else out
    return (select(out) * out).flatten(1).sum(1)


CASES = [
    ("densenet", densenet, 2, 32, class_select(1)),
    ("densenet", densenet, 3, 32, class_select(1)),
    ("resnet18", resnet18, 2, 32, class_select(2)),
    ("resnet18", resnet18, 3, 16, class_select(2)),
    ("unet", unet, 2, 32, pred_mask_select),
    ("unet", unet, 3, 16, pred_mask_select),
]


@pytest.mark.parametrize("name,build,sd,size,select", CASES, ids=[f"{c[0]}-{c[2]}d" for c in CASES])
def test_epsilon_conservation_on_monai_nets(name, build, sd, size, select):
    model = zero_bias(build(sd))
    x = torch.randn(1, 1, *([size] * sd), dtype=torch.double)
    expected = target_value(model, x, select)
    rel = input_relevance(model, x, select, composite="epsilon", epsilon=EPS, stabilizer=EPS)
    assert rel.shape == x.shape
    torch.testing.assert_close(rel.flatten(1).sum(1), expected, rtol=1e-5, atol=1e-8)


def test_residual_sums_need_the_canonizer():
    """Without canonizers the residual sums copy relevance to both branches: conservation breaks."""
    model = zero_bias(resnet18(2))
    x = torch.randn(1, 1, 32, 32, dtype=torch.double)
    expected = target_value(model, x, class_select(0))
    rel = input_relevance(model, x, class_select(0), composite="epsilon", canonizers=None, epsilon=EPS)
    assert not torch.allclose(rel.sum(), expected[0], rtol=1e-2)


@pytest.mark.parametrize(
    "build,shape",
    [
        (
            lambda: SEResNet50(spatial_dims=2, in_channels=1, num_classes=3, layers=(1, 1, 1, 1)),
            (1, 1, 32, 32),
        ),
        (
            lambda: ViT(
                1,
                (16, 16),
                (4, 4),
                hidden_size=32,
                mlp_dim=64,
                num_layers=2,
                num_heads=4,
                spatial_dims=2,
                classification=True,
                num_classes=3,
            ),
            (2, 1, 16, 16),
        ),
        (lambda: UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1), (1, 1, 32, 32)),
    ],
    ids=["seresnet-se-gates", "vit-attention-layernorm", "unet-instancenorm"],
)
def test_conservation_se_attention_instancenorm(build, shape):
    model = zero_bias(build())
    x = torch.randn(*shape, dtype=torch.double)
    select = class_select(0) if shape[-1] == 16 or isinstance(model, SEResNet50) else pred_mask_select
    expected = target_value(model, x, select)
    rel = input_relevance(model, x, select, composite="epsilon", epsilon=EPS, stabilizer=EPS)
    torch.testing.assert_close(rel.flatten(1).sum(1), expected, rtol=1e-5, atol=1e-8)


def test_layerwise_conservation_on_a_chain():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 5, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    )
    model = zero_bias(model)
    x = torch.randn(3, 1, 16, 16, dtype=torch.double)
    layers = prunable_layers(model)
    per_layer = lrp(model, x, class_select(1), layers, composite="epsilon", epsilon=EPS, stabilizer=EPS)
    expected = target_value(model, x, class_select(1))
    assert set(per_layer) == set(layers)
    for name, r in per_layer.items():
        assert r.shape == (3, layers[name].weight.shape[0])
        torch.testing.assert_close(r.sum(1), expected, rtol=1e-6, atol=1e-9, msg=f"layer {name}")


def test_batchnorm_merge_pairs_direct_edges_only_on_densenet():
    model = DenseNet(2, 1, 3, init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2).eval()
    x = torch.randn(1, 1, 32, 32)
    pairs = merge_pairs(model, x)
    expected = [("features.conv0", "features.norm0")] + [
        (
            f"features.denseblock{b}.denselayer{i}.layers.conv1",
            f"features.denseblock{b}.denselayer{i}.layers.norm2",
        )
        for b in (1, 2)
        for i in (1, 2)
    ]
    assert pairs == expected
    ref = model(x)
    handles = GraphMergeBatchNorm(x).apply(model)
    try:
        assert len(handles) == len(expected)
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    # zennit's order-based merge pairs conv2 with the next dense layer's norm1 across torch.cat
    with pytest.raises(RuntimeError, match="size of tensor"):
        SequentialMergeBatchNorm().apply(copy.deepcopy(model))


RESTORE_NETS = {
    "densenet": lambda: DenseNet(2, 1, 3, init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2),
    "resnet18": lambda: resnet18(2),
    "unet": lambda: unet(2),
    "seresnet": lambda: SEResNet50(spatial_dims=2, in_channels=1, num_classes=3, layers=(1, 1, 1, 1)),
}


@pytest.mark.parametrize("name", list(RESTORE_NETS))
def test_canonizers_restore_the_model_exactly(name):
    model = RESTORE_NETS[name]().eval()
    for m in model.modules():  # non-trivial BN statistics
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, 1, 32, 32)
    ref = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: id(p) for k, p in model.named_parameters()}
    forwards = {n for n, m in model.named_modules() if "forward" in m.__dict__}
    lrp(model, x, class_select(0), prunable_layers(model))
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    after = model.state_dict()
    assert set(after) == set(state)
    for k, v in state.items():
        assert torch.equal(after[k], v), k
    assert {k: id(p) for k, p in model.named_parameters()} == params
    assert {n for n, m in model.named_modules() if "forward" in m.__dict__} == forwards
    assert not any("canonizer" in n for n, _ in model.named_modules())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_channel_relevance_lrp_returns_one_vector_per_layer():
    model = DenseNet(2, 1, 3, init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2)
    data = [(torch.randn(2, 1, 32, 32), torch.tensor([0, 2]))]
    rel = channel_relevance(model, data, "lrp", progress=False)
    layers = prunable_layers(model)
    assert set(rel) == set(layers) and rel.method == "lrp" and rel.num_samples == 2
    for name, m in layers.items():
        out_ch = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        assert rel[name].shape == (out_ch,)
        assert torch.isfinite(rel[name]).all() and rel[name].sum() > 0


def test_two_batches_of_four_equal_one_batch_of_eight():
    model = zero_bias(resnet18(2)).float()
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 3, (8,))
    one = channel_relevance(model, [(x, y)], "lrp", progress=False)
    two = channel_relevance(model, [(x[:4], y[:4]), (x[4:], y[4:])], "lrp", progress=False)
    assert one.num_samples == two.num_samples == 8
    for name in one:
        torch.testing.assert_close(one[name], two[name], rtol=1e-5, atol=1e-7)


class Scale(nn.Module):
    """A layer with a parameter that no LRP rule knows."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x):
        return x * self.weight


def test_layer_without_rule_raises_naming_it():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), Scale(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )
    with pytest.raises(NotImplementedError, match=r"'1' \(Scale\).*taylor"):
        lrp(model, torch.randn(1, 1, 8, 8), class_select(0), prunable_layers(model))


def test_unknown_composite_lists_the_names():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 2))
    with pytest.raises(ValueError, match="epsilon_plus_flat"):
        lrp(model, torch.randn(1, 1, 8, 8), class_select(0), prunable_layers(model), composite="nope")


@pytest.mark.parametrize(
    "composite,sd",
    [
        ("zplus", 2),
        ("alpha_beta", 2),
        ("epsilon_alpha2beta1_flat", 2),
        ("epsilon_plus_flat", 3),
        ("instance", 3),
    ],
)
def test_named_and_instance_composites_run(composite, sd):
    model = resnet18(sd).eval()
    x = torch.randn(2, 1, *([16] * sd))
    layers = prunable_layers(model)
    comp = EpsilonPlusFlat() if composite == "instance" else composite
    out = lrp(model, x, class_select(0), layers, composite=comp)
    assert set(out) == set(layers)
    assert all(torch.isfinite(v).all() and v.shape[0] == 2 for v in out.values())
    assert any(v.abs().sum() > 0 for v in out.values())


def test_input_relevance_restores_training_mode():
    model = unet(2)
    model.train()
    rel = input_relevance(model, torch.randn(2, 1, 32, 32))
    assert model.training and rel.shape == (2, 1, 32, 32) and torch.isfinite(rel).all()


def test_relevance_matches_propagate_output_layer_start():
    """The relevance at the output layer is the start relevance select(output) * output."""
    model = zero_bias(resnet18(2))
    x = torch.randn(2, 1, 32, 32, dtype=torch.double)
    _, grads = _propagate(model, x, class_select(2), {"fc": model.fc}, "epsilon", EPS, EPS, "auto")
    out = model(x)
    torch.testing.assert_close(grads["fc"], class_select(2)(out) * out)


def _zennit_reference(name: str):
    """zennit's own rules for a named composite (a merged-away BatchNorm, an exact identity, passes relevance)."""
    from zennit.composites import LayerMapComposite, layer_map_base
    from zennit.core import Composite
    from zennit.rules import Epsilon, Pass, ZPlus
    from zennit.types import Linear as ZennitLinear

    from monai_iaprune.relevance.canonizers import is_merged_identity

    bn = [(nn.modules.batchnorm._BatchNorm, Epsilon(EPS))]
    if name == "epsilon_plus_flat":
        inner = EpsilonPlusFlat(epsilon=EPS, stabilizer=EPS, layer_map=bn)
    else:
        rule = Epsilon(EPS) if name == "epsilon" else ZPlus(stabilizer=EPS)
        inner = LayerMapComposite(bn + layer_map_base(EPS) + [(ZennitLinear, rule)])

    def module_map(ctx, module_name, module):
        return Pass() if is_merged_identity(module) else inner.module_map(ctx, module_name, module)

    return Composite(module_map=module_map)


@pytest.mark.parametrize("composite", ["epsilon_plus_flat", "epsilon", "zplus"])
@pytest.mark.parametrize("net", ["densenet", "resnet18"])
def test_output_rules_equal_zennit_rules(composite, net):
    # the package's rules skip zennit's discarded native backward; values must stay zennit's, layer by layer
    torch.manual_seed(0)
    model = RESTORE_NETS[net]()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, -1.0, 1.5)
            nn.init.normal_(m.bias)
    model = model.double().eval()
    x = torch.randn(2, 1, 32, 32, dtype=torch.double)
    layers = prunable_layers(model)
    rel, grads = _propagate(model, x, class_select(1), layers, composite, EPS, EPS, "auto")
    ref_rel, ref = _propagate(
        model, x, class_select(1), layers, _zennit_reference(composite), EPS, EPS, "auto"
    )
    torch.testing.assert_close(rel, ref_rel, rtol=1e-9, atol=1e-12)
    assert set(grads) == set(ref) == set(layers)
    for name in layers:
        assert ref[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-9, atol=1e-12, msg=name)


def test_session_keeps_the_model_canonized_and_equals_lrp():
    from monai_iaprune.relevance.lrp import lrp_session

    model = RESTORE_NETS["densenet"]().eval()
    xs = [torch.randn(2, 1, 32, 32), torch.randn(3, 1, 32, 32)]
    layers = prunable_layers(model)
    ref = model(xs[0])
    expected = [lrp(model, x, class_select(0), layers) for x in xs]
    with lrp_session(model, layers) as per_batch:
        got = [per_batch(model, x, class_select(0), layers) for x in xs]
        assert any(m._forward_hooks for m in model.modules())  # hooks stay between batches
    for e, g in zip(expected, got):
        assert set(e) == set(g) == set(layers)
        for name in layers:
            torch.testing.assert_close(g[name], e[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(model(xs[0]), ref, rtol=0, atol=0)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_merge_plan_is_traced_once_per_model_and_shape(monkeypatch):
    from monai_iaprune.relevance import canonizers

    calls = []
    real = canonizers.merge_pairs
    monkeypatch.setattr(canonizers, "merge_pairs", lambda m, x: calls.append(1) or real(m, x))
    model = RESTORE_NETS["densenet"]().eval()
    layers = prunable_layers(model)
    first = lrp(model, torch.randn(2, 1, 32, 32), class_select(0), layers)
    lrp(model, torch.randn(1, 1, 32, 32), class_select(0), layers)  # other batch size: same plan
    assert len(calls) == 1
    lrp(model, torch.randn(1, 1, 48, 48), class_select(0), layers)  # other spatial shape: traced again
    assert len(calls) == 2
    model.features.denseblock1.denselayer1.layers.norm2 = nn.BatchNorm2d(8).eval()  # a replaced module
    lrp(model, torch.randn(1, 1, 32, 32), class_select(0), layers)
    assert len(calls) == 3 and set(first) == set(layers)


@pytest.mark.parametrize("act", ["monai-swish", "monai-me-swish", "monai-mish", "torch-mish"])
def test_monai_activations_pass_relevance(act):
    """MONAI's Swish / MemoryEfficientSwish / Mish (EfficientNet, SegResNet options) and torch's Mish are not in
    zennit's ``Activation`` type: without a Pass rule their gradient (not ``f(x) / x``) scales the relevance and
    conservation breaks. With the rule the input relevance sums to the explained logit."""
    from monai.networks.blocks.activation import MemoryEfficientSwish, Mish, Swish

    make = {
        "monai-swish": Swish,
        "monai-me-swish": MemoryEfficientSwish,
        "monai-mish": Mish,
        "torch-mish": nn.Mish,
    }
    torch.manual_seed(0)
    model = zero_bias(
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            make[act](),
            nn.Conv2d(4, 5, 3, padding=1),
            make[act](),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(5, 3),
        )
    )
    x = torch.randn(3, 1, 12, 12, dtype=torch.double)
    expected = target_value(model, x, class_select(1))
    rel = input_relevance(model, x, class_select(1), composite="epsilon", epsilon=EPS, stabilizer=EPS)
    torch.testing.assert_close(rel.flatten(1).sum(1), expected, rtol=1e-6, atol=1e-9)
