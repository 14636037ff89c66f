"""Depth pruning: block discovery, block relevance (oracle, LRP / DLB conservation), physical removal, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import MEDMNIST, require_file
from monai.networks.blocks.squeeze_and_excitation import SEResNetBottleneck
from monai.networks.nets import BasicUNet, DenseNet, DynUNet, ResNet, SegResNet, SwinUNETR, UNet, ViT
from torch import nn

from monai_iaprune.pruning.batchnorm import recalibrate_batchnorm
from monai_iaprune.pruning.checkpoint import apply_pruned_structure, load_pruned, safe_load, save_pruned
from monai_iaprune.pruning.depth import (
    DepthBudgetUnreachable,
    prune_depth,
    removed_block_names,
    replay_removed_blocks,
)
from monai_iaprune.relevance.blocks import (
    RemovedBlock,
    block_relevance,
    block_terms,
    find_blocks,
    removable_blocks,
)


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _resnet(sd):
    return ResNet("basic", [2, 1, 1, 1], [4, 4, 8, 8], spatial_dims=sd, n_input_channels=1, num_classes=3)


def _bottleneck(sd):
    return ResNet(
        "bottleneck", [2, 1, 1, 1], [2, 2, 4, 4], spatial_dims=sd, n_input_channels=1, num_classes=3
    )


def _se(sd):
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[sd]
    pool = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[sd]
    return nn.Sequential(
        conv(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(*[SEResNetBottleneck(sd, 16, 4, groups=1, reduction=2) for _ in range(2)]),
        pool(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def _unet(sd):
    return UNet(sd, 1, 2, channels=(4, 8, 8), strides=(2, 2), num_res_units=1)


def _segresnet(sd):
    return SegResNet(
        sd,
        init_filters=4,
        in_channels=1,
        out_channels=2,
        blocks_down=(1, 2),
        blocks_up=(1,),
        norm=("group", {"num_groups": 2}),
    )


def _dynunet(sd):
    return DynUNet(
        sd,
        4,
        2,
        kernel_size=[3, 3, 3],
        strides=[1, 2, 2],
        upsample_kernel_size=[2, 2],
        filters=[4, 8, 8],
        res_block=True,
    )


def _vit(sd):
    return ViT(
        1,
        img_size=16,
        patch_size=8,
        hidden_size=16,
        mlp_dim=16,
        num_layers=3,
        num_heads=2,
        classification=True,
        num_classes=3,
        spatial_dims=sd,
    )


def _swin(sd):
    return SwinUNETR(
        1, 2, depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1), feature_size=12, spatial_dims=sd, window_size=4
    )


def _densenet(sd):
    return DenseNet(sd, 1, 3, init_features=4, growth_rate=4, block_config=(2, 3), bn_size=2)


# (family, builder, spatial dims, input channels, spatial size, min blocks per stage for the oracle removal)
CASES = [
    ("resnet", _resnet, 2, 1, 16, 1),
    ("resnet", _resnet, 3, 1, 16, 1),
    ("resnet_bottleneck", _bottleneck, 2, 1, 16, 1),
    ("se", _se, 2, 1, 8, 1),
    ("se", _se, 3, 1, 8, 1),
    ("residual_unit", _unet, 2, 1, 16, 0),
    ("residual_unit", _unet, 3, 1, 16, 0),
    ("segresnet", _segresnet, 2, 1, 16, 1),
    ("segresnet", _segresnet, 3, 1, 8, 1),
    ("unet_res", _dynunet, 2, 4, 16, 1),
    ("unet_res", _dynunet, 3, 4, 8, 1),
    ("transformer", _vit, 2, 1, 16, 1),
    ("transformer", _vit, 3, 1, 16, 1),
    ("swin", _swin, 2, 1, 64, 1),
    ("dense", _densenet, 2, 1, 16, 1),
    ("dense", _densenet, 3, 1, 16, 1),
]
IDS = [f"{c[0]}-{c[2]}d" for c in CASES]


def _setup(builder, sd, cin, size):
    torch.manual_seed(0)
    net = builder(sd).eval()
    x = torch.rand(2, cin, *([size] * sd))  # non-negative: a block's final (leaky) ReLU then keeps its input
    return net, x


def _pred(output, label=None):
    output = _first(output)
    return torch.nn.functional.one_hot(output.argmax(1), output.shape[1]).movedim(-1, 1).float()


def _train_step(net, x):
    net.train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    loss = _first(net(x)).float().pow(2).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    net.eval()


def _block_in_shared_stage(net, min_blocks, family):
    """A removable block of ``family`` whose stage may lose it under ``min_blocks``."""
    found = find_blocks(net)
    for name, blk in removable_blocks(net).items():
        if blk.family.name == family and sum(b.stage == blk.stage for b in found.values()) - 1 >= min_blocks:
            return name
    raise AssertionError("no removable block in a stage with spare blocks")


@pytest.mark.parametrize("family,builder,sd,cin,size,min_blocks", CASES, ids=IDS)
def test_family_found_and_removal_keeps_shape_and_trains(family, builder, sd, cin, size, min_blocks):
    net, x = _setup(builder, sd, cin, size)
    blocks = removable_blocks(net)
    assert any(b.family.name == family for b in blocks.values())
    shape = _first(net(x)).shape
    rel = block_relevance(net, [x], "magnitude")
    result = prune_depth(
        net,
        rel,
        blocks=[_block_in_shared_stage(net, min_blocks, family)],
        example_inputs=x[:1],
        min_blocks_per_stage=min_blocks,
    )
    assert result.params_after < result.params_before and result.macs_after < result.macs_before
    removed = result.removed[0]
    assert isinstance(net.get_submodule(removed), RemovedBlock)
    assert not any(k.startswith(f"{removed}.") for k in net.state_dict())
    assert _first(net(x)).shape == shape
    _train_step(net, x)


@pytest.mark.parametrize("family,builder,sd,cin,size,min_blocks", CASES, ids=IDS)
def test_oracle_zero_branch(family, builder, sd, cin, size, min_blocks):
    """A block whose branch outputs constant zero gets zero relevance, and removing it changes nothing."""
    net, x = _setup(builder, sd, cin, size)
    name = _block_in_shared_stage(net, min_blocks, family)
    with torch.no_grad():
        for p in net.get_submodule(name).parameters():
            p.zero_()
    methods = ["lrp", "dlb", "taylor", "ig", "magnitude"]
    if family == "swin":
        methods = ["taylor", "magnitude"]  # keep the CPU test short; LRP on Swin is covered by conservation
    for method in methods:
        rel = (
            block_relevance(net, [x], method, target=_pred, n_steps=3)
            if method == "ig"
            else block_relevance(net, [x], method, target=_pred)
        )
        assert rel[name] == 0.0, (method, rel)
        assert len(rel) == 1 or any(v > 0 for v in rel.values()), (method, rel)
    before = _first(net(x))
    prune_depth(net, rel, blocks=[name], example_inputs=x[:1], min_blocks_per_stage=min_blocks)
    assert torch.allclose(_first(net(x)), before, atol=1e-5, rtol=1e-4)


# DL-Backtrace has no rule for SwinUNETR's functional layer_norm (relevance.backtrace raises; not a depth matter)
CONSERVATION = [
    (m, *c) for m in ("lrp", "dlb") for c in CASES if c[2] == 2 and not (m == "dlb" and c[0] == "swin")
]


@pytest.mark.parametrize(
    "method,family,builder,sd,cin,size,min_blocks", CONSERVATION, ids=[f"{c[0]}-{c[1]}" for c in CONSERVATION]
)
def test_conservation_at_joins(method, family, builder, sd, cin, size, min_blocks):
    """LRP / DLB: branch + skip relevance equals the join's relevance, and the last join's equals the block
    output's."""
    net, x = _setup(builder, sd, cin, size)
    with torch.no_grad():  # zero biases: the epsilon rule then conserves relevance through every layer
        for n, p in net.named_parameters():
            if n.endswith("bias"):
                p.zero_()
    terms = block_terms(net, x, _pred, method)
    assert set(terms) == set(removable_blocks(net))
    for name, t in terms.items():
        # tolerance scaled by the absolute relevance mass: terms of both signs cancel (by ~1e6 on untrained Swin)
        for (branch, skip, out), mass in zip(t["joins"], t["mass"]):
            assert ((branch + skip - out).abs() <= 1e-4 * out.abs() + 1e-6 * mass).all(), (
                name,
                branch + skip,
                out,
            )
        out_last, mass = t["joins"][-1][2], t["mass"][-1]
        assert ((t["output"] - out_last).abs() <= 1e-4 * out_last.abs() + 1e-6 * mass).all(), (
            name,
            t["output"],
        )
        assert out_last.abs().sum() > 0
    rel = block_relevance(net, [x], method, target=_pred)
    for name, t in terms.items():  # block relevance is |branch| per sample, averaged
        expect = sum(j[0] for j in t["joins"]).abs().mean().item()
        assert rel[name] == pytest.approx(expect, rel=1e-4, abs=1e-9)


def test_no_removable_block():
    net = BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 8, 4))
    with pytest.raises(ValueError, match="no removable block"):
        block_relevance(net, [torch.rand(1, 1, 16, 16)], "taylor")
    with pytest.raises(ValueError, match="no removable block"):
        prune_depth(net, {}, 0.1)
    dyn = DynUNet(
        2,
        1,
        2,
        kernel_size=[3, 3, 3],
        strides=[1, 2, 2],
        upsample_kernel_size=[2, 2],
        filters=[4, 8, 8],
        res_block=True,
    )
    with pytest.raises(ValueError, match="no removable block.*stride or channel change"):
        prune_depth(dyn, {}, 0.1)


def test_ratio_that_empties_a_stage_is_refused():
    net, x = _setup(_resnet, 2, 1, 16)
    rel = block_relevance(net, [x], "taylor", target=_pred)
    assert set(rel) == {"layer1.0", "layer1.1"}
    share = sum(p.numel() for n in rel for p in net.get_submodule(n).parameters()) / sum(
        p.numel() for p in net.parameters()
    )
    with pytest.raises(DepthBudgetUnreachable, match="layer1") as err:
        prune_depth(net, rel, ratio=0.99 * share, example_inputs=x[:1])
    assert isinstance(err.value, ValueError)  # callers catching ValueError keep working
    # what one block of layer1 holds: the most that may go with min_blocks_per_stage=1
    one = sum(p.numel() for p in net.get_submodule(min(rel, key=rel.get)).parameters())
    assert err.value.reachable == pytest.approx(one / sum(p.numel() for p in net.parameters()))
    capped = copy.deepcopy(net)
    got = prune_depth(capped, rel, ratio=err.value.reachable * (1 - 1e-9), example_inputs=x[:1])
    assert got.removed == [min(rel, key=rel.get)]
    assert 1 - got.params_after / got.params_before == pytest.approx(err.value.reachable)
    result = prune_depth(net, rel, ratio=0.99 * share, example_inputs=x[:1], min_blocks_per_stage=0)
    assert sorted(result.removed) == ["layer1.0", "layer1.1"] and result.stages["layer1"] == (2, 0)
    assert _first(net(x)).shape == (2, 3)


def _flat_table(net):
    """A latency table costing 1 ms per conv / linear layer at any width, 1 ms of overhead."""
    from monai_iaprune.pruning.latency_table import LatencyTable, LayerLatency

    layers = {
        n: LayerLatency([1], [1], [[1e-3]])
        for n, m in net.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    }
    return LatencyTable(layers, 1e-3, "test")


def test_latency_target_counts_removed_layers_as_free():
    from monai_iaprune.pruning.depth import latency_table_for

    net, x = _setup(_resnet, 2, 1, 16)
    table = _flat_table(net)
    total = len(table.layers) + 1  # ms: every layer and the overhead; each removable block holds 2 layers
    rel = block_relevance(net, None, "random")
    result = prune_depth(net, rel, target="latency", speedup=1.1, latency_table=table, example_inputs=x[:1])
    assert len(result.removed) == 1 and total / (total - 2) >= 1.1
    assert result.latency_estimated_speedup == pytest.approx(total / (total - 2))
    assert latency_table_for(table, net).estimate_model(net) == pytest.approx((total - 2) * 1e-3)
    assert table.estimate_model(net) == pytest.approx(total * 1e-3)  # the raw table counts the removed layers
    most = (total - 2) / (total - 4)  # the other layer1 block is all that is left to remove
    with pytest.raises(ValueError, match=f"estimated speed-up of {most:.2f}x"):
        prune_depth(net, block_relevance(net, None, "random"), target="latency", speedup=2.0,
                    latency_table=latency_table_for(table, net),
                    min_blocks_per_stage=0)  # fmt: skip
    with pytest.raises(ValueError, match="needs a latency_table"):
        prune_depth(net, rel, target="latency", speedup=1.5)
    with pytest.raises(ValueError, match="speedup > 1"):
        prune_depth(net, rel, target="latency", speedup=1.0, latency_table=table)


def test_ratio_picks_least_relevant_first():
    net, x = _setup(_vit, 2, 1, 16)
    rel = block_relevance(net, [x], "lrp", target=_pred)
    result = prune_depth(net, rel, ratio=0.05, example_inputs=x[:1])
    assert result.removed == [min(rel, key=rel.get)]
    assert result.params_removed >= 0.05 or len(result.removed) > 1


@pytest.mark.parametrize("builder", [_resnet, _densenet])
@pytest.mark.parametrize("order", ["width_then_depth", "depth_then_width"])
def test_with_width_pruning(builder, order):
    from monai_iaprune import prune
    from monai_iaprune.relevance import channel_relevance

    net, x = _setup(builder, 2, 1, 16)
    data = [(x, torch.tensor([0, 1]))]

    def width():
        prune(net, channel_relevance(net, data, "taylor", progress=False), 0.3, example_inputs=x[:1])

    def depth():
        prune_depth(net, block_relevance(net, data, "lrp"), 0.05, example_inputs=x[:1])

    steps = [width, depth] if order == "width_then_depth" else [depth, width]
    for step in steps:
        step()
    assert removed_block_names(net)
    assert _first(net(x)).shape == (2, 3)
    recalibrate_batchnorm(net, data)
    _train_step(net, x)


@pytest.mark.parametrize("builder", [_resnet, _densenet, _vit])
def test_checkpoint_replay(tmp_path, builder):
    net, x = _setup(builder, 2, 1, 16)
    rel = block_relevance(net, [x], "taylor", target=_pred)
    prune_depth(net, rel, 0.05, example_inputs=x[:1])
    path = save_pruned(net, tmp_path / "depth.pt")
    ckpt = safe_load(path)
    fresh = builder(2).eval()
    assert replay_removed_blocks(fresh, ckpt["pruned_structure"]) == removed_block_names(net)
    apply_pruned_structure(fresh, ckpt["pruned_structure"])
    fresh.load_state_dict(ckpt["state_dict"])
    torch.testing.assert_close(_first(fresh(x)), _first(net(x)))
    # load_pruned replays the removed blocks itself (apply_pruned_structure calls replay_removed_blocks)
    loaded = load_pruned(path, builder(2))
    assert removed_block_names(loaded) == removed_block_names(net)
    torch.testing.assert_close(_first(loaded(x)), _first(net(x)))


def test_real_data_end_to_end():
    path = require_file(MEDMNIST / "breastmnist.npz")
    d = np.load(path)
    x = torch.from_numpy(d["train_images"][:64]).float().div(255).unsqueeze(1)
    y = torch.from_numpy(d["train_labels"][:64, 0]).long()
    torch.manual_seed(0)
    net = ResNet("basic", [2, 2, 1, 1], [8, 8, 16, 16], spatial_dims=2, n_input_channels=1, num_classes=2)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    for xb, yb in batches * 2:
        opt.zero_grad()
        nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()
    net.eval()
    rel = block_relevance(net, batches, "lrp")
    assert rel.num_samples == 64 and all(np.isfinite(v) for v in rel.values())
    result = prune_depth(net, rel, 0.1, example_inputs=x[:1])
    assert result.removed and result.params_removed >= 0.1
    recalibrate_batchnorm(net, batches)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (64, 2) and torch.isfinite(out).all()
