"""DL-Backtrace ("dlb"): oracle against the dl-backtrace package, rule oracles, MONAI nets, batching, errors."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from monai_iaprune.relevance import channel_relevance
from monai_iaprune.relevance.backtrace import backtrace, backtrace_relevance_maps


def _pred(output: torch.Tensor) -> torch.Tensor:
    return nn.functional.one_hot(output.argmax(1), output.shape[1]).to(output.dtype)


def _package_relevance(net: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-layer relevance of sample 0 from the dl-backtrace package (torch backend, no TensorFlow needed)."""
    mod = pytest.importorskip(
        "dl_backtrace.pytorch_backtrace.backtrace",
        reason="dl-backtrace not installed (pip install --no-deps)",
    )
    bt = mod.Backtrace(model=net)
    with torch.no_grad():
        outs = bt.predict(x)
    # multiplier=1: the package starts from the predicted logit itself, as target "pred" does here
    return {k: np.asarray(v) for k, v in bt.eval(outs, mode="default", multiplier=1.0).items()}


def _cnn() -> nn.Sequential:
    # the package walks named children: "identity" is its input node, an activation child is merged into the
    # layer before it by name, and the last child is dropped (hence the trailing "out")
    return nn.Sequential(
        OrderedDict(
            [
                ("identity", nn.Identity()),
                ("conv1", nn.Conv2d(1, 4, 3, padding=1)),
                ("relu1", nn.ReLU()),
                ("pool1", nn.MaxPool2d(2)),
                ("conv2", nn.Conv2d(4, 6, 3, padding=1)),
                ("relu2", nn.ReLU()),
                ("pool2", nn.MaxPool2d(2)),
                ("flatten", nn.Flatten()),
                ("fc1", nn.Linear(6 * 4 * 4, 10)),
                ("relu3", nn.ReLU()),
                ("fc2", nn.Linear(10, 3)),
                ("out", nn.Identity()),
            ]
        )
    ).eval()


def _assert_matches_package(net: nn.Module, x: torch.Tensor, pairs: dict[str, str]) -> None:
    ref = _package_relevance(net, x[:1])
    mods = dict(net.named_modules())
    maps = backtrace_relevance_maps(net, x, _pred, {n: mods[n] for n in pairs.values()})
    for pkg_name, name in pairs.items():
        ours = maps[name][0].double().numpy()
        assert ours.shape == ref[pkg_name].shape, pkg_name
        scale = np.abs(ref[pkg_name]).max()
        assert scale > 0, f"package relevance at {pkg_name} is all zero: the comparison would be vacuous"
        np.testing.assert_allclose(ours, ref[pkg_name], rtol=1e-4, atol=1e-5 * scale, err_msg=pkg_name)


def test_equals_dl_backtrace_package_on_conv_net():
    net = _cnn()
    x = torch.randn(1, 1, 16, 16)
    pairs = {
        "fc2": "fc2",
        "fc1/relu3": "fc1",
        "flatten": "flatten",
        "pool2": "pool2",
        "conv2/relu2": "conv2",
        "pool1": "pool1",
        "conv1/relu1": "conv1",
        "identity": "identity",
    }
    _assert_matches_package(net, x, pairs)


def test_sample_zero_of_a_batch_equals_the_package():
    # batched: the package explains sample 0 alone; here it is one of three, with other samples around it
    net = _cnn()
    x = torch.randn(3, 1, 16, 16)
    _assert_matches_package(net, x, {"conv1/relu1": "conv1", "fc1/relu3": "fc1", "identity": "identity"})


@pytest.mark.parametrize("act, gain", [(nn.Sigmoid, 3.0), (nn.Tanh, 2.0)])
def test_activation_saturation_equals_the_package(act, gain):
    # large weights push pre-activations past the sigmoid / tanh range, so saturation changes the split
    torch.manual_seed(1)
    name = act.__name__.lower()
    net = nn.Sequential(
        OrderedDict(
            [
                ("identity", nn.Identity()),
                ("fc1", nn.Linear(6, 8)),
                (f"{name}1", act()),
                ("fc2", nn.Linear(8, 3)),
                ("out", nn.Identity()),
            ]
        )
    ).eval()
    with torch.no_grad():
        net.fc1.weight.mul_(gain * 4)
    x = torch.randn(1, 6)
    pre = net.fc1(x)
    assert ((pre < -4) | (pre > 4)).any() if act is nn.Sigmoid else ((pre < -2) | (pre > 2)).any()
    _assert_matches_package(net, x, {f"fc1/{name}1": "fc1", "identity": "identity"})
    # and saturation matters here: a pure magnitude split (activation replaced by identity) differs
    plain = nn.Sequential(
        OrderedDict([(k, nn.Identity() if k == f"{name}1" else m) for k, m in net.named_children()])
    )
    a = backtrace_relevance_maps(net, x, _pred, {"identity": net.identity})["identity"]
    b = backtrace_relevance_maps(plain, x, _pred, {"identity": plain.identity})["identity"]
    assert not torch.allclose(a, b, rtol=1e-3)


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(5, 4, bias=False)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        out = self.bn(self.a(x))
        out += self.b(x)
        return self.head(out)


def test_residual_sum_and_batchnorm_rules():
    torch.manual_seed(2)
    net = _Residual()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
        net.bn.weight.uniform_(-2, 2)
        net.bn.bias.uniform_(-1, 1)
    net.eval()
    x = torch.randn(3, 5)
    maps = backtrace_relevance_maps(net, x, _pred, {"a": net.a, "b": net.b, "bn": net.bn, "head": net.head})
    with torch.no_grad():
        za, zb = net.a(x), net.b(x)
        zn = net.bn(za)
        out = net.head(zn + zb)
        r_out = _pred(out) * out
        w = net.head.weight
        r_sum = (
            w.abs() * (zn + zb).abs().unsqueeze(1) * (r_out / ((zn + zb).abs() @ w.abs().T)).unsqueeze(2)
        ).sum(1)
        share = zn.abs() / (zn.abs() + zb.abs())
        scale = net.bn.weight / torch.sqrt(net.bn.running_var + net.bn.eps)
        shift = zn - scale * za
        r_a = share * r_sum * (scale * za).abs() / ((scale * za).abs() + shift.abs())
    torch.testing.assert_close(maps["bn"], share * r_sum, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(maps["b"], (1 - share) * r_sum, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(maps["a"], r_a, rtol=1e-5, atol=1e-7)


def _bias_free(net: nn.Module) -> nn.Module:
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.bias is not None:
            nn.init.zeros_(m.bias)
    return net.eval()


def _monai_nets():
    from monai.networks.nets import DenseNet121, resnet18

    return [
        ("resnet18-2d", lambda: resnet18(spatial_dims=2, n_input_channels=1, num_classes=3), (2, 1, 32, 32)),
        (
            "resnet18-3d",
            lambda: resnet18(spatial_dims=3, n_input_channels=1, num_classes=3),
            (2, 1, 16, 16, 16),
        ),
        (
            "densenet121-2d",
            lambda: DenseNet121(spatial_dims=2, in_channels=1, out_channels=3),
            (2, 1, 32, 32),
        ),
        (
            "densenet121-3d",
            lambda: DenseNet121(spatial_dims=3, in_channels=1, out_channels=3),
            (1, 1, 32, 32, 32),
        ),
    ]


@pytest.mark.parametrize("name, make, shape", _monai_nets(), ids=[n for n, *_ in _monai_nets()])
def test_monai_nets_conserve_relevance_and_score_every_layer(name, make, shape):
    # no biases and fresh BatchNorm (shift 0): every DLB rule here conserves relevance, so the input
    # receives exactly the explained logit; a wrong sum / concat / pool / norm rule breaks that
    torch.manual_seed(0)
    net = _bias_free(make())
    x = torch.randn(shape)
    wrapped = nn.Sequential(nn.Identity(), net).eval()
    maps = backtrace_relevance_maps(wrapped, x, _pred, {"0": wrapped[0]})
    with torch.no_grad():
        out = net(x)
    expected = (out * _pred(out)).sum(1)
    torch.testing.assert_close(maps["0"].flatten(1).sum(1), expected, rtol=1e-4, atol=1e-6)

    rel = channel_relevance(net, [(x, torch.zeros(shape[0], dtype=torch.long))], "dlb", progress=False)
    layers = [n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    assert sorted(rel) == sorted(layers)
    for n in layers:
        m = net.get_submodule(n)
        c = m.out_features if isinstance(m, nn.Linear) else m.out_channels
        assert rel[n].shape == (c,) and torch.isfinite(rel[n]).all(), n
        assert rel[n].sum() > 0, n


def test_two_batches_of_four_equal_one_batch_of_eight():
    from monai.networks.nets import resnet18

    torch.manual_seed(0)
    net = resnet18(spatial_dims=2, n_input_channels=1, num_classes=3).eval()
    x, y = torch.randn(8, 1, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    whole = channel_relevance(net, [(x, y)], "dlb", progress=False)
    halves = channel_relevance(net, [(x[:4], y[:4]), (x[4:], y[4:])], "dlb", progress=False)
    assert whole.num_samples == halves.num_samples == 8
    for n in whole:
        torch.testing.assert_close(whole[n], halves[n], rtol=1e-5, atol=1e-9)


def test_pooling_rules_3d():
    # 3D max pooling with a tie, average pooling and adaptive average pooling against hand-computed splits
    x = torch.tensor([1.0, 3.0, 3.0, -2.0, 0.5, 0.0, 2.0, -1.0]).reshape(1, 1, 2, 2, 2)
    r = torch.tensor([[[[[6.0]]]]])
    seq = nn.Sequential(nn.Identity(), nn.MaxPool3d(2)).eval()
    got = backtrace_relevance_maps(seq, x, lambda o: r / o, {"0": seq[0]})["0"]
    torch.testing.assert_close(got, torch.where(x == 3.0, 3.0, 0.0))
    for pool in (nn.AvgPool3d(2), nn.AdaptiveAvgPool3d(1)):
        seq = nn.Sequential(nn.Identity(), pool).eval()
        got = backtrace_relevance_maps(seq, x, lambda o: r / o, {"0": seq[0]})["0"]
        torch.testing.assert_close(got, 6.0 * x.abs() / x.abs().sum())


class _Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.g = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.g


class _GatedNet(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 2)
        self.gate = _Gate()
        self.functional = functional

    def forward(self, x):
        h = self.fc1(x)
        h = h * torch.exp(h) if self.functional else self.gate(h)
        return self.fc2(h)


def test_layer_without_rule_raises_naming_it():
    x = torch.randn(2, 3)
    net = _GatedNet(False).eval()
    with pytest.raises(NotImplementedError, match=r"layer 'gate' \(_Gate\)"):
        backtrace(net, x, _pred, {"fc1": net.fc1})
    with pytest.raises(NotImplementedError, match="op .*exp"):
        channel_relevance(_GatedNet(True).eval(), [x], "dlb", progress=False)


def test_leaf_module_without_rule_is_named():
    class Scale(nn.Module):
        def forward(self, x):
            return 2 * x

    net = nn.Sequential(
        OrderedDict([("fc", nn.Linear(3, 4)), ("scale", Scale()), ("head", nn.Linear(4, 2))])
    ).eval()
    with pytest.raises(NotImplementedError, match=r"layer 'scale' \(Scale\)"):
        channel_relevance(net, [torch.randn(2, 3)], "dlb", progress=False)


def test_inplace_flags_restored_and_contrastive_rejected():
    from monai.networks.nets import resnet18

    net = resnet18(spatial_dims=2, n_input_channels=1, num_classes=2).eval()
    before = [m.inplace for m in net.modules() if hasattr(m, "inplace")]
    assert any(before)
    channel_relevance(net, [torch.randn(1, 1, 32, 32)], "dlb", progress=False)
    assert [m.inplace for m in net.modules() if hasattr(m, "inplace")] == before
    with pytest.raises(NotImplementedError, match="contrastive"):
        channel_relevance(net, [torch.randn(1, 1, 32, 32)], "dlb", mode="contrastive", progress=False)
    with pytest.raises(ValueError, match="unknown DL-Backtrace mode"):
        channel_relevance(net, [torch.randn(1, 1, 32, 32)], "dlb", mode="bogus", progress=False)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1, bias=False), (2, 2, 5, 5)),
        (nn.ConvTranspose3d(2, 3, 2, stride=2, bias=False), (2, 2, 3, 3, 3)),
        (nn.Conv1d(2, 3, 3, padding=1, groups=1, bias=False), (2, 2, 7)),
    ],
    ids=["convT2d", "convT3d", "conv1d"],
)
def test_conv_variants_conserve_without_bias(layer, shape):
    # with no bias every output unit hands all its relevance to its inputs: input total == start total
    net = nn.Sequential(nn.Identity(), layer).eval()
    x = torch.randn(shape)
    start = torch.rand_like(layer(x))
    got = backtrace_relevance_maps(net, x, lambda o: start / o, {"0": net[0], "1": net[1]})
    assert got["0"].shape == x.shape
    torch.testing.assert_close(got["1"], start)
    torch.testing.assert_close(got["0"].flatten(1).sum(1), start.flatten(1).sum(1), rtol=1e-5, atol=1e-6)


def _dense_share(w: torch.Tensor, a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """DLB dense rule, no bias: ``R_j = sum_i R_i |w_ij a_j| / sum_j |w_ij a_j|`` (a: [B, J], r: [B, I])."""
    z = w.abs().unsqueeze(0) * a.abs().unsqueeze(1)  # [B, I, J]
    return (z * (r / z.sum(2)).unsqueeze(2)).sum(1)


class _SEGateNet(nn.Module):
    """``y = h * sigmoid(g(h))``: the squeeze-excitation pattern, functional gate."""

    def __init__(self):
        super().__init__()
        self.fc1, self.g, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2, bias=False)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.sigmoid(self.g(h)) * h)


def test_gate_is_a_constant_relevance_takes_the_gated_path():
    torch.manual_seed(3)
    net = _SEGateNet().eval()
    x = torch.randn(3, 3)
    maps = backtrace_relevance_maps(net, x, _pred, {"fc1": net.fc1, "g": net.g})
    with torch.no_grad():
        h = net.fc1(x)
        y = torch.sigmoid(net.g(h)) * h
        out = net.fc2(y)
        expected = _dense_share(net.fc2.weight, y, _pred(out) * out)  # relevance of y, all of it to h
    torch.testing.assert_close(maps["fc1"], expected, rtol=1e-5, atol=1e-7)
    assert torch.equal(maps["g"], torch.zeros_like(maps["g"]))


class _ActNet(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 5, bias=False), nn.Linear(5, 3, bias=False)
        self.act = act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Functional(nn.Module):
    """A non-leaf wrapper so the functional op runs in a forward the DLB mode sees."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn
        self.inner = nn.Identity()

    def forward(self, x):
        return self.fn(self.inner(x))


def _acts():
    from monai.networks.blocks.activation import MemoryEfficientSwish, Mish, Swish

    return {
        "silu": nn.SiLU(),
        "gelu": nn.GELU(),
        "monai-swish": Swish(),
        "monai-memswish": MemoryEfficientSwish(),
        "monai-mish": Mish(),
        "F.silu": _Functional(nn.functional.silu),
        "F.gelu": _Functional(nn.functional.gelu),
        "F.mish": _Functional(nn.functional.mish),
        "x*sigmoid(x)": _Functional(lambda t: t * torch.sigmoid(t)),
        "relu_(inplace)": _Functional(lambda t: nn.functional.relu(t.clone(), inplace=True)),
    }


@pytest.mark.parametrize("name", list(_acts()))
def test_elementwise_activations_pass_relevance_through(name):
    torch.manual_seed(4)
    net = _ActNet(_acts()[name]).eval()
    x = torch.randn(3, 4)
    maps = backtrace_relevance_maps(net, x, _pred, {"fc1": net.fc1})
    with torch.no_grad():
        a = net.act(net.fc1(x))
        out = net.fc2(a)
        expected = _dense_share(net.fc2.weight, a, _pred(out) * out)
    torch.testing.assert_close(maps["fc1"], expected, rtol=1e-5, atol=1e-7)


def test_rearrange_and_scaling_move_relevance_with_the_elements():
    from einops.layers.torch import Rearrange

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Identity()
            self.rearrange = Rearrange("b c h w -> b (h w) c")

        def forward(self, x):
            return self.rearrange(self.inp(x)).permute(0, 2, 1) * 0.5

    net = Net().eval()
    x = torch.randn(2, 3, 2, 4)
    start = torch.rand(2, 3, 8)
    got = backtrace_relevance_maps(net, x, lambda o: start / o, {"inp": net.inp})["inp"]
    torch.testing.assert_close(got, start.reshape(2, 3, 2, 4))


@pytest.mark.parametrize("flash", [False, True], ids=["einsum", "sdpa"])
def test_attention_weights_are_constants_and_relevance_is_conserved(flash):
    from monai.networks.blocks import SABlock

    torch.manual_seed(5)
    att = SABlock(hidden_size=8, num_heads=2, qkv_bias=False, use_flash_attention=flash)
    nn.init.zeros_(att.out_proj.bias)
    net = nn.Sequential(nn.Identity(), att).eval()
    x = torch.randn(2, 5, 8)
    start = torch.rand(2, 5, 8)
    maps = backtrace_relevance_maps(net, x, lambda o: start / o, {"0": net[0], "qkv": att.qkv})
    # no bias anywhere: every rule on the way (linear, constant-weight product) hands on all relevance
    torch.testing.assert_close(maps["0"].sum((1, 2)), start.sum((1, 2)), rtol=1e-5, atol=1e-6)
    qkv = maps["qkv"].reshape(2, 5, 3, 8)  # qkv features are laid out (q|k|v, head, dim)
    assert torch.equal(qkv[:, :, :2], torch.zeros_like(qkv[:, :, :2]))  # queries and keys get none
    torch.testing.assert_close(qkv[:, :, 2].sum((1, 2)), start.sum((1, 2)), rtol=1e-5, atol=1e-6)


def _monai_gated_nets():
    from monai.networks.nets import EfficientNetBN, SEResNet50, ViT

    return [
        (
            "seresnet50",
            lambda: SEResNet50(spatial_dims=2, in_channels=1, num_classes=3, layers=(1, 1, 1, 1)),
            (2, 1, 32, 32),
        ),
        (
            "efficientnet-b0",
            lambda: EfficientNetBN(
                "efficientnet-b0", pretrained=False, spatial_dims=2, in_channels=1, num_classes=3
            ),
            (2, 1, 32, 32),
        ),
        (
            "vit",
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
    ]


@pytest.mark.parametrize("name, make, shape", _monai_gated_nets(), ids=[n for n, *_ in _monai_gated_nets()])
def test_se_swish_and_vit_nets_are_scored(name, make, shape):
    torch.manual_seed(0)
    net = make().eval()
    rel = channel_relevance(net, [(torch.randn(shape), torch.tensor([0, 1]))], "dlb", progress=False)
    layers = [n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    assert sorted(rel) == sorted(layers)
    se = [n for n in layers if "se_layer" in n or "_se_" in n]
    assert bool(se) == (name != "vit")
    for n in layers:
        assert torch.isfinite(rel[n]).all(), n
        if n in se:  # squeeze-excitation gates are constants: their layers get no relevance
            assert rel[n].sum() == 0, n
        else:
            assert rel[n].sum() > 0, n
