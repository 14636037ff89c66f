"""LRP through AHNet's and EfficientNet's residual blocks: their sums split relevance (the canonizer).

Without it relevance is copied to both summands: NaN (overflow) on AHNet-3D, a 1e10-fold growth on EfficientNet-B0.
"""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import AHNet
from monai.networks.nets.ahnet import Bottleneck3x3x1, Pseudo3DLayer
from monai.networks.nets.efficientnet import MBConvBlock
from test_lrp import EPS, zero_bias
from torch import nn

from monai_iaprune.relevance import channel_relevance
from monai_iaprune.relevance.lrp import input_relevance


def _all(out: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(out)


def _downsample() -> nn.Module:  # AHNet._make_layer's projection shortcut (8 -> 4 * 4 channels)
    return nn.Sequential(nn.Conv3d(8, 16, 1, bias=False), nn.MaxPool3d(1, 1), nn.BatchNorm3d(16))


BLOCKS = {
    "pseudo3d": lambda: Pseudo3DLayer(3, 8, growth_rate=4, bn_size=2, dropout_prob=0.0),
    "bottleneck": lambda: Bottleneck3x3x1(3, 8, 4, downsample=_downsample()),
    "mbconv": lambda: _relu(MBConvBlock(3, 8, 8, 3, 1, [6, 6, 6], expand_ratio=4, se_ratio=0.25)),
}


def _relu(block: nn.Module) -> nn.Module:
    block._swish = (
        nn.ReLU()
    )  # MONAI's (memory-efficient) swish has no Pass rule: its gradient would scale relevance
    return block


@pytest.mark.parametrize("canonize", [True, False], ids=["canonized", "plain-gradient"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_sums_conserve_relevance(name, canonize):
    """With the canonizer the epsilon rule conserves relevance; the plain gradient of the sum copies it (oracle)."""
    model = zero_bias(BLOCKS[name]())
    x = torch.randn(1, 8, 6, 6, 6, dtype=torch.double)
    expected = model(x).sum()
    canonizers = "auto" if canonize else None
    rel = input_relevance(
        model, x, _all, composite="epsilon", canonizers=canonizers, epsilon=EPS, stabilizer=EPS
    )
    conserved = torch.allclose(rel.sum(), expected, rtol=1e-5)
    assert conserved == canonize, (float(rel.sum()), float(expected))


def test_ahnet_3d_lrp_relevance_is_finite():
    """AHNet-3D at 32^3: copied relevance doubled at ~20 residual sums and overflowed float32 (NaN at layer1)."""
    torch.manual_seed(0)
    net = AHNet(layers=(1, 1, 1, 1), spatial_dims=3, in_channels=1, out_channels=2, psp_block_num=1).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    y = torch.randint(0, 2, (1, 1, 32, 32, 32))
    rel = channel_relevance(net, [(x, y)], "lrp", progress=False)  # raises FloatingPointError on NaN / Inf
    assert all(torch.isfinite(r).all() for r in rel.values())
    assert rel["layer1.0.conv2"].abs().sum() > 0


@pytest.mark.parametrize("canonize", [True, False], ids=["canonized", "plain-gradient"])
def test_hovernet_residual_block_sums_conserve_relevance(canonize):
    """HoVerNet's residual block adds each dense layer's output to the running shortcut (copied relevance doubled
    per layer: NaN relevance on HoVerNet); with the canonizer the epsilon rule conserves relevance."""
    from monai.networks.nets.hovernet import _ResidualBlock

    torch.manual_seed(0)
    model = (
        zero_bias(_ResidualBlock(layers=3, num_features=8, in_channels=64, out_channels=16)).double().eval()
    )
    x = torch.randn(1, 64, 8, 8, dtype=torch.double)
    expected = model(x).sum()
    rel = input_relevance(
        model,
        x,
        _all,
        composite="epsilon",
        canonizers="auto" if canonize else None,
        epsilon=EPS,
        stabilizer=EPS,
    )
    assert torch.allclose(rel.sum(), expected, rtol=1e-5) == canonize, (float(rel.sum()), float(expected))
