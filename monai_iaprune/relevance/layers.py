"""Which layers have prunable output channels, and how to read a per-channel value off their outputs."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)


def prunable_layers(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """Return ``{qualified name: module}`` for every conv / linear layer of ``model`` (or the named subset).

    Raises:
        KeyError: a requested name is not a module of ``model``.
        TypeError: a requested module is not a conv / linear layer (no output channels to score).
    """
    modules = dict(model.named_modules())
    if names is None:
        return {n: m for n, m in modules.items() if isinstance(m, PRUNABLE_TYPES)}
    out = {}
    for name in names:
        if name not in modules:
            raise KeyError(f"layer {name!r} is not a module of {type(model).__name__}")
        if not isinstance(modules[name], PRUNABLE_TYPES):
            raise TypeError(
                f"layer {name!r} is a {type(modules[name]).__name__}, which has no prunable output channels; "
                "only Conv1d/2d/3d, ConvTranspose and Linear layers are scored"
            )
        out[name] = modules[name]
    return out


def out_channels(module: nn.Module) -> int:
    """Number of output channels of a conv / linear layer."""
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    raise TypeError(f"{type(module).__name__} has no output channels")


def channel_dim(module: nn.Module) -> int:
    """The dimension of the layer's output that indexes its channels (1 for convs, -1 for linear)."""
    return -1 if isinstance(module, nn.Linear) else 1


def per_sample_channel_sum(module: nn.Module, value: torch.Tensor) -> torch.Tensor:
    """Sum a layer-output-shaped tensor over everything but batch and channel: ``[B, C]``."""
    if isinstance(module, nn.Linear):
        if value.ndim == 2:
            return value
        return value.reshape(value.shape[0], -1, value.shape[-1]).sum(1)
    return value.reshape(value.shape[0], value.shape[1], -1).sum(-1)
