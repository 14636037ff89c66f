"""Baseline criteria: filter magnitude, Taylor (gradient x activation), random."""

from __future__ import annotations

import torch
from torch import nn

from monai_iaprune.relevance.hooks import OutputRecorder, no_param_grad
from monai_iaprune.relevance.layers import per_sample_channel_sum
from monai_iaprune.relevance.registry import SelectionFn, register_method


@register_method("magnitude", data_free=True)
def magnitude(
    model: nn.Module, inputs, select, layers: dict[str, nn.Module], p: int = 1, **_
) -> dict[str, torch.Tensor]:
    """Filter L``p`` norm of each output channel's weights (Li et al. 2017)."""
    out = {}
    for name, m in layers.items():
        w = m.weight.detach()
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            w = w.transpose(0, 1)
        out[name] = w.flatten(1).abs().pow(p).sum(1).pow(1.0 / p)
    return out


@register_method("random", data_free=True)
def random(
    model: nn.Module, inputs, select, layers: dict[str, nn.Module], seed: int = 0, **_
) -> dict[str, torch.Tensor]:
    """Uniform random scores (seeded, independent of the global RNG)."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(
            m.weight.shape[1 if isinstance(m, nn.modules.conv._ConvTransposeNd) else 0], generator=g
        )
        for name, m in layers.items()
    }


@register_method("taylor", shared_scale=True)
def taylor(
    model: nn.Module, inputs: torch.Tensor, select: SelectionFn, layers: dict[str, nn.Module], **_
) -> dict[str, torch.Tensor]:
    """First-order Taylor: per sample, ``sum over positions of gradient x activation`` (Molchanov et al. 2017).

    The collector takes its absolute value per sample and averages over samples.
    """
    with no_param_grad(model), OutputRecorder(layers) as rec, torch.enable_grad():
        x = inputs.detach().requires_grad_(True)
        output = model(x)
        sel = select(output)
        (output * sel).sum().backward()
        return {
            name: per_sample_channel_sum(layers[name], (rec.outputs[name] * rec.grads[name]).detach())
            for name in layers
            if name in rec.grads
        }
