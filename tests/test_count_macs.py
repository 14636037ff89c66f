"""count_macs(): every layer call counted once, against a per-call hook count (the oracle)."""

from __future__ import annotations

import math

import torch
from monai.networks import nets
from torch import nn

from monai_iaprune.pruning import count_macs


def _conv_macs_per_call(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates (+ one add per output for a bias) of every conv call, by forward hooks."""
    total = [0]

    def hook(m, inputs, out):
        # transposed convs too, by torch-pruning's convention: a full kernel per *output* position (stride^d
        # times the true MACs of a stride-2 upsampling); count_macs keeps that convention
        per_output = m.in_channels // m.groups * math.prod(m.kernel_size) + (m.bias is not None)
        total[0] += out.numel() * per_output

    convs = (nn.Conv2d, nn.ConvTranspose2d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, convs)]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return total[0]


class _Reuse(nn.Module):
    """A conv run twice and registered under two names, and a conv never run."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.blocks = nn.ModuleList(
            [self.conv]
        )  # the same module under a second name (DynUNet's skip_layers)
        self.unused = nn.Conv2d(4, 16, 1)
        self.head = nn.Conv2d(4, 2, 1, bias=False)

    def forward(self, x):
        return self.head(self.conv(self.conv(x)))


def test_module_called_twice_registered_twice_and_never_called():
    model, x = _Reuse(), torch.randn(2, 4, 8, 8)
    expected = _conv_macs_per_call(model, x)
    assert expected == 2 * 2 * 64 * (4 * 9 + 1) * 4 + 2 * 64 * 4 * 2  # two calls of conv, one of head
    assert count_macs(model, x) == expected


def test_dynunet_counts_its_skip_layers_once():
    torch.manual_seed(0)
    net = nets.DynUNet(2, 1, 2, kernel_size=(3, 3, 3), strides=(1, 2, 2), upsample_kernel_size=(2, 2))
    x = torch.randn(1, 1, 32, 32)
    oracle = _conv_macs_per_call(net, x)
    # the rest is norms and activations: a few percent (torch-pruning's own sum over names gave 2x)
    assert oracle <= count_macs(net, x) <= 1.1 * oracle
