"""Each torch-pruning fix for MONAI networks: the unfixed call fails, the fixed one works."""

from __future__ import annotations

import contextlib
import copy
import sys

import pytest
import torch
import torch_pruning as tp
from monai.networks import nets
from torch import nn
from torch_pruning.dependency import index_mapping, shape_infer
from torch_pruning.dependency.group import Group

from monai_iaprune import channel_relevance, prune
from monai_iaprune.pruning import monai_fixes as F

PRUNE_MODULE = sys.modules["monai_iaprune.pruning.prune"]


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _magnitude_pruner(model, x, ratio, ignored, **kw):
    return tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        **kw,
    )


def _unet():
    return nets.UNet(
        spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32), strides=(2, 2), num_res_units=2
    )


def test_unet_concat_width_crash_without_fix_issue_387():
    x = torch.randn(1, 1, 32, 32)
    with pytest.raises(TypeError, match="NoneType"):
        tp.DependencyGraph().build_dependency(_unet(), example_inputs=x)
    model = _unet()
    with F.concat_width_fix():
        _magnitude_pruner(model, x, 0.5, [model.model[-1]]).step()
    assert model.eval()(x).shape == (1, 2, 32, 32)
    assert _params(model) < _params(_unet())


def test_basicunet_inplace_activation_breaks_pruning_without_fix():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32)
    net = nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2, features=(8, 8, 16, 16, 32, 8))
    broken = copy.deepcopy(net)
    with F.concat_width_fix():  # width fix alone: the instance norms are not traced, their parameters stay
        _magnitude_pruner(broken, x, 0.5, [broken.final_conv]).step()
    with pytest.raises((RuntimeError, ValueError)):
        broken.eval()(x)
    inplace = [m for m in net.modules() if getattr(m, "inplace", False) is True]
    assert inplace, "BasicUNet is expected to use in-place activations"
    with F.monai_pruning_fixes(net):
        assert not any(m.inplace for m in inplace)
        _magnitude_pruner(net, x, 0.5, [net.final_conv]).step()
    assert all(m.inplace for m in inplace), "in-place flags must be restored"
    assert net.eval()(x).shape == (1, 2, 32, 32)


def test_fixes_restore_torch_pruning_on_exit():
    saved = (shape_infer.infer_out_channels_recursively, index_mapping.update_index_mapping, Group.prune)
    with pytest.raises(KeyError), F.monai_pruning_fixes(_unet()):
        assert shape_infer.infer_out_channels_recursively is not saved[0]
        raise KeyError("boom")
    assert (
        shape_infer.infer_out_channels_recursively,
        index_mapping.update_index_mapping,
        Group.prune,
    ) == saved


def _segresnet(filters: int):
    torch.manual_seed(0)
    return nets.SegResNet(spatial_dims=2, in_channels=1, out_channels=2, init_filters=filters)


def test_segresnet_groupnorm_round_to():
    x = torch.randn(1, 1, 32, 32)
    plain = _segresnet(16)
    before = _params(plain)
    # torch-pruning rounds the whole layer against the per-group removal: nothing is pruned
    _magnitude_pruner(plain, x, 0.7, [plain.conv_final], round_to=8).step()
    assert 1 - _params(plain) / before < 0.05

    net = _segresnet(16)
    rel = channel_relevance(net, None, "magnitude", progress=False)
    result = prune(net, rel, 0.5, example_inputs=x, round_to=8)
    assert abs(result.params_removed - 0.5) <= 0.02
    for name, m in net.named_modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0, name
        if isinstance(m, nn.Conv2d) and not name.startswith("conv_final"):
            assert m.out_channels % 8 == 0, (name, m.out_channels)
    assert net.eval()(x).shape == (1, 2, 32, 32)


def test_global_pruning_caps_layers_instead_of_skipping_them():
    x = torch.randn(1, 1, 32, 32)
    removed = {}
    for ratio in (0.7, 0.9):
        plain = _segresnet(8)
        _magnitude_pruner(plain, x, ratio, [plain.conv_final], max_pruning_ratio=0.95).step()
        removed[ratio] = 1 - _params(plain) / _params(_segresnet(8))
    assert removed[0.9] < removed[0.7], "torch-pruning drops fully sub-threshold groups (non-monotone)"

    net = _segresnet(8)
    rel = channel_relevance(net, None, "magnitude", progress=False)
    ours = {}
    for ratio in (0.7, 0.9):
        m = copy.deepcopy(net)
        PRUNE_MODULE._apply(m, rel, ratio, x, [m.conv_final], True, None, 0.75, "mean", "mean", {})
        ours[ratio] = 1 - _params(m) / _params(net)
        for name, mod in m.named_modules():
            if isinstance(mod, nn.Conv2d):  # max_layer_ratio=0.75: a quarter of each layer stays
                assert mod.out_channels >= dict(net.named_modules())[name].out_channels // 4, name
    assert ours[0.9] >= ours[0.7]


def test_vit_heads_for_every_attention_block():
    vit = nets.ViT(
        in_channels=1,
        img_size=(32, 32),
        patch_size=(8, 8),
        hidden_size=48,
        mlp_dim=96,
        num_layers=2,
        num_heads=4,
        spatial_dims=2,
    )
    kwargs = F.pruner_kwargs_for(vit)
    assert kwargs["num_heads"] == {b.attn.qkv: 4 for b in vit.blocks}
    assert "ignored_layers" not in kwargs


def test_swinunetr_transformer_must_be_ignored():
    x = torch.randn(1, 1, 64, 64)

    def swin():
        torch.manual_seed(0)
        return nets.SwinUNETR(
            in_channels=1,
            out_channels=2,
            feature_size=12,
            spatial_dims=2,
            depths=(1, 1, 1, 1),
            num_heads=(3, 3, 3, 3),
        )

    plain = swin()
    with pytest.raises((RuntimeError, IndexError)):  # index mapping or the pruned forward breaks
        with F.monai_pruning_fixes(plain):
            heads = {"num_heads": F._attention_heads(plain)}
            _magnitude_pruner(plain, x, 0.5, [plain.out], **heads).step()
        plain.eval()(x)

    net = swin()
    kwargs = F.pruner_kwargs_for(net)
    assert kwargs["ignored_layers"] == [net.swinViT]
    rel = channel_relevance(net, None, "magnitude", progress=False)
    result = prune(net, rel, 0.5, example_inputs=x)
    assert result.params_removed >= 0.4
    assert net.eval()(x).shape == (1, 2, 64, 64)


def _small_densenet():
    torch.manual_seed(0)
    return nets.DenseNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=3,
        init_features=8,
        growth_rate=4,
        block_config=(2, 2),
        bn_size=2,
    )


def test_cached_concat_mapping_gives_the_same_pruning(monkeypatch):
    x = torch.randn(1, 1, 32, 32)
    calls = {"n": 0}
    original = shape_infer.infer_in_channels_recursively

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(shape_infer, "infer_in_channels_recursively", counting)
    runs = {}
    for cached in (True, False):
        if not cached:
            monkeypatch.setattr(F, "cached_concat_mapping", contextlib.nullcontext)
        net = _small_densenet()
        rel = channel_relevance(net, None, "random", progress=False)
        calls["n"] = 0
        result = prune(net, rel, 0.4, example_inputs=x)
        runs[cached] = (result.history, result.channels, calls["n"], net.eval()(x))
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] == runs[False][1]
    torch.testing.assert_close(runs[True][3], runs[False][3])
    assert runs[True][2] < runs[False][2] / 2


class _BroadcastGate(nn.Module):
    """``x * sigmoid(bn(conv(x)))`` with a one-channel gate, as MONAI ``AttentionBlock`` (``AttentionUnet``)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.psi = nn.Sequential(nn.Conv2d(4, 1, 1), nn.BatchNorm2d(1), nn.Sigmoid())
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        return self.out(x * self.psi(x))


@pytest.mark.parametrize("fixed", [True, False])
def test_broadcast_gate_is_not_coupled_to_the_gated_channels(monkeypatch, fixed):
    if not fixed:
        monkeypatch.setattr(F, "broadcast_inputs_decoupled", contextlib.nullcontext)
    net = _BroadcastGate().eval()
    x = torch.randn(1, 1, 8, 8)
    with F.monai_pruning_fixes(net):
        dg = tp.DependencyGraph().build_dependency(net, example_inputs=x)
        group = dg.get_pruning_group(net.conv, tp.prune_conv_out_channels, idxs=[0, 1])
        coupled = {dep.target.module for dep, _ in group if dg.is_out_channel_pruning_fn(dep.handler)}
        if not fixed:  # torch-pruning couples the gate: channel 0 empties its one-channel norm
            assert net.psi[1] in coupled
            group.prune()
            assert net.psi[0].weight.shape[0] == 0
            with pytest.raises(RuntimeError):
                net(x)
            return
        assert net.psi[0] not in coupled and net.psi[1] not in coupled
        group.prune()
    assert (net.conv.out_channels, net.psi[0].in_channels, net.psi[1].num_features) == (2, 2, 1)
    assert net(x).shape == (1, 2, 8, 8)


@pytest.mark.parametrize("sd", [2, 3])
def test_attention_unet_prunes_to_half_the_macs(sd):
    torch.manual_seed(0)
    net = nets.AttentionUnet(sd, 1, 2, channels=(8, 16, 32), strides=(2, 2))
    x = torch.randn(1, 1, *(16,) * sd)
    rel = channel_relevance(net, None, "magnitude", progress=False)
    result = prune(net, rel, 0.5, example_inputs=x, target="macs")
    assert result.macs_removed >= 0.49
    assert all(m.num_features == 1 for n, m in net.named_modules() if n.endswith("psi.1"))
    assert net.eval()(x).shape == x.shape[:1] + (2,) + x.shape[2:]


class _SharedHead(nn.Module):
    """One head run on two features, only the last call returned (``DAF3D``'s ``predict2`` in eval mode)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(1, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        self.head(torch.relu(self.a(x)))  # a deep-supervision prediction, used in training only
        return self.head(torch.relu(self.b(x)))


def test_every_call_of_a_shared_layer_couples_its_producers():
    torch.manual_seed(0)
    net = _SharedHead()
    x = torch.randn(1, 1, 8, 8)
    nn.init.uniform_(
        net.a.weight, 1.0, 2.0
    )  # a's channels rank above b's: a global ranking would prune only b
    rel = channel_relevance(net, None, "magnitude", progress=False)
    result = prune(net, rel, 0.4, example_inputs=x)
    assert result.params_removed >= 0.3
    assert net.a.out_channels == net.b.out_channels == net.head.in_channels < 8
    assert net.eval()(x).shape == (1, 2, 8, 8)


class _SpatialSlice3d(nn.Module):
    """``FactorizedReduceBlock`` (``DiNTS``): a strided conv of ``x`` and one of ``x[:, :, 1:, 1:, 1:]``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(1, 6, 3, padding=1)
        self.conv_1, self.conv_2 = nn.Conv3d(6, 2, 1, stride=2), nn.Conv3d(6, 2, 1, stride=2)

    def forward(self, x):
        x = self.a(x)
        return torch.cat([self.conv_1(x), self.conv_2(x[:, :, 1:, 1:, 1:])], 1)


@pytest.mark.parametrize("fixed", [True, False])
def test_spatial_slice_of_a_5d_tensor_keeps_channel_indices(monkeypatch, fixed):
    if not fixed:
        monkeypatch.setattr(F, "spatial_slice_fix", contextlib.nullcontext)
    torch.manual_seed(0)
    net = _SpatialSlice3d().eval()
    weight = net.conv_2.weight.detach().clone()
    x = torch.randn(1, 1, 4, 4, 4)
    with F.monai_pruning_fixes(net):
        dg = tp.DependencyGraph().build_dependency(net, example_inputs=x)
        group = dg.get_pruning_group(net.a, tp.prune_conv_out_channels, idxs=[0, 1])
        pruned = {dep.target.module: sorted(idxs) for dep, idxs in group}
        group.prune()
    # oracle: the slice is spatial, so conv_2 loses the same input channels as conv_1
    assert (pruned.get(net.conv_2) == [0, 1]) == fixed
    if not fixed:  # conv_2 kept its 6 input channels behind a 4-channel slice
        with pytest.raises(RuntimeError, match="channels"):
            net(x)
        return
    torch.testing.assert_close(net.conv_2.weight, weight[:, 2:])
    assert net(x).shape == (1, 4, 2, 2, 2)


class _PerChannelGroupNorm(nn.Module):
    """conv -> ``GroupNorm(C, C)`` -> conv, MedNeXt's normalisation."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = (
            nn.Conv2d(1, 4, 3, padding=1),
            nn.GroupNorm(4, 4),
            nn.Conv2d(4, 2, 1),
        )

    def forward(self, x):
        return self.head(self.norm(self.conv(x)))


@pytest.mark.parametrize("fixed", [True, False])
def test_per_channel_group_norm_prunes_as_a_per_channel_norm(monkeypatch, fixed):
    if not fixed:
        monkeypatch.setattr(F, "per_channel_group_norms", contextlib.nullcontext)
    torch.manual_seed(0)
    net, x = _PerChannelGroupNorm().eval(), torch.randn(1, 1, 8, 8)
    with (
        torch.no_grad()
    ):  # oracle: the kept channels are normalised as before, the head loses input channel 0
        h = net.norm(net.conv(x))[:, 1:]
        expected = nn.functional.conv2d(h, net.head.weight[:, 1:], net.head.bias)
    with F.monai_pruning_fixes(net):
        pruner = _magnitude_pruner(net, x, 0.25, [net.head])
        group = pruner.DG.get_pruning_group(net.conv, tp.prune_conv_out_channels, idxs=[0])
        assert pruner._get_channel_groups(group) == (1 if fixed else 4)
        group.prune()
    if not fixed:  # GroupNorm(3 channels, 4 groups)
        with pytest.raises(RuntimeError, match="divisible"):
            net(x)
        return
    assert (net.norm.num_channels, net.norm.num_groups) == (3, 3)
    torch.testing.assert_close(net(x), expected)
