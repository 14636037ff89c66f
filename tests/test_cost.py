"""channel_costs(): per-channel parameter and MAC savings equal a brute-force prune-and-recount."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from monai.networks import nets
from torch import nn

from monai_iaprune.pruning import count_macs, count_params
from monai_iaprune.pruning.cost import channel_costs
from monai_iaprune.pruning.monai_fixes import monai_pruning_fixes


def _brute_force(model: nn.Module, x: torch.Tensor, name: str, unit: int) -> tuple[int, float]:
    """Prune one position (in every channel group) of ``name``'s group on a copy and recount."""
    m = copy.deepcopy(model).eval()
    root = m.get_submodule(name)
    with monai_pruning_fixes(m):
        dg = tp.DependencyGraph().build_dependency(m, example_inputs=x)
        fn = dg.get_pruner_of_module(root).prune_out_channels
        n = dg.get_out_channels(root)
        group = dg.get_pruning_group(root, fn, idxs=[g * (n // unit) for g in range(unit)])
        group.prune()
    return count_params(model) - count_params(m), count_macs(model, x) - count_macs(m, x)


def _tiny_seq():
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 10, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(10, 3),
    )


CASES = {
    "sequential_2d": (_tiny_seq, (1, 1, 16, 16)),
    "densenet_2d": (
        lambda: nets.DenseNet(2, 1, 3, init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2),
        (1, 1, 32, 32),
    ),
    "densenet_3d": (
        lambda: nets.DenseNet(3, 1, 2, init_features=4, growth_rate=4, block_config=(2, 2), bn_size=2),
        (1, 1, 16, 16, 16),
    ),
    "unet_res_2d": (
        lambda: nets.UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2),
        (1, 1, 16, 16),
    ),
    "unet_res_3d": (
        lambda: nets.UNet(3, 1, 2, channels=(4, 8), strides=(2,), num_res_units=1),
        (1, 1, 8, 8, 8),
    ),
    "segresnet_3d": (
        lambda: nets.SegResNet(
            3, init_filters=16, in_channels=1, out_channels=2, blocks_down=(1, 1), blocks_up=(1,)
        ),
        (1, 1, 8, 8, 8),
    ),
    "resnet_basic_2d": (
        lambda: nets.ResNet(
            "basic", [1, 1, 1, 1], [4, 4, 8, 8], spatial_dims=2, n_input_channels=1, num_classes=2
        ),
        (1, 1, 16, 16),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cost_equals_brute_force(case):
    build, shape = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(shape)
    costs = channel_costs(model, x)
    assert costs
    for name, cost in costs.items():
        params, macs = _brute_force(model, x, name, cost.unit)
        assert cost.params * cost.unit == pytest.approx(params), name
        assert cost.macs * cost.unit == pytest.approx(macs), name
        assert name == cost.out_layers[0]


def test_costs_follow_couplings_and_ignore_layers():
    torch.manual_seed(0)
    model = nets.ResNet(
        "basic", [1, 1, 1, 1], [4, 4, 8, 8], spatial_dims=2, n_input_channels=1, num_classes=2
    ).eval()
    x = torch.randn(1, 1, 16, 16)
    costs = channel_costs(model, x, ignored_layers=["fc"])
    assert "fc" not in costs
    # the stem conv, the first block's second conv are summed by the residual: one group, both listed
    coupled = [c for c in costs.values() if len(c.out_layers) > 1]
    assert coupled and all(c.in_layers for c in coupled)
    with pytest.raises(KeyError):
        channel_costs(model, x, ignored_layers=["nope"])


def test_single_channel_layers_get_no_cost():
    """A layer pruned down to one channel (a re-scored sub-step after a deep stage) is not costed: removing its
    last channel is impossible and its zero-channel BatchNorm broke the MAC counter."""
    net = nn.Sequential(
        nn.Conv2d(1, 1, 3), nn.BatchNorm2d(1), nn.ReLU(), nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3),
    )  # fmt: skip
    costs = channel_costs(net, torch.randn(1, 1, 12, 12))
    assert "0" not in costs and costs["3"].macs > 0


def test_norm_macs_from_a_one_voxel_batch_one_shape():
    """SegResNetVAE-3D's VAE branch meets a GroupNorm at one voxel: the count needs no forward of the norm."""
    from monai_iaprune.pruning.cost import _module_macs

    norm = nn.GroupNorm(4, 4).to("meta")
    macs = _module_macs(norm, [torch.Size([1, 4, 1, 1, 1])], 4, 0)
    assert macs == _module_macs(norm, [torch.Size([1, 4, 2, 1, 1])], 4, 0) / 2 > 0
