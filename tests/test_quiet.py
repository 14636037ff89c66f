"""quiet_op_counter: torch-pruning's MACs counter stops printing its ptflops warning for shared modules."""

from __future__ import annotations

import torch
import torch_pruning as tp
from monai.networks import nets
from torch_pruning.utils import op_counter

from monai_iaprune.pruning import count_macs, quiet_op_counter
from monai_iaprune.pruning.quiet import PTFLOPS_REDEFINED


def _dynunet() -> torch.nn.Module:
    # DynUNet's skip_layers re-reference its blocks: nn.Module.apply reaches them twice
    return nets.DynUNet(
        2, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2], upsample_kernel_size=[2, 2], filters=[4, 8, 16]
    )


def _count(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(tp.utils.count_ops_and_params(model, x)[0])


def test_message_printed_without_and_silenced_with(capsys):
    model, x = _dynunet().eval(), torch.randn(1, 1, 16, 16)
    macs = _count(model, x)
    noisy = capsys.readouterr().out
    assert noisy.count(PTFLOPS_REDEFINED) >= 10  # one line per shared module, each call
    with quiet_op_counter():
        assert _count(model, x) == macs  # the count itself is unchanged
    assert PTFLOPS_REDEFINED not in capsys.readouterr().out
    _count(model, x)  # restored afterwards
    assert PTFLOPS_REDEFINED in capsys.readouterr().out
    assert "print" not in vars(op_counter)
    # the library's counter is quiet (and counts DynUNet's re-registered modules once: fewer MACs)
    assert 0 < count_macs(model, x) < macs
    assert PTFLOPS_REDEFINED not in capsys.readouterr().out


def test_other_messages_pass_through_and_nesting(capsys):
    with quiet_op_counter(), quiet_op_counter():
        op_counter.print(PTFLOPS_REDEFINED + " for the moduleConv2d")
        op_counter.print("Warning: module Foo is treated as a zero-op.")
    out = capsys.readouterr().out
    assert PTFLOPS_REDEFINED not in out and "zero-op" in out
    assert "print" not in vars(op_counter)
