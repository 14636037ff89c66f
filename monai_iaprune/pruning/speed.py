"""Make a (pruned) network faster on CPU for inference: fold BatchNorm into convolutions, memory format."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_BN = nn.modules.batchnorm._BatchNorm


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, BatchNorm name)`` pairs where the BatchNorm reads the conv output and nothing else does.

    Found on the ``torch.fx`` graph of ``model``; an empty list (with a warning) when ``model`` cannot be
    traced. Pre-activation BatchNorms (DenseNet's, which read a concatenation) are not paired.

    Args:
        model: the network.
    """
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # data-dependent control flow: leave the model as it is
        warnings.warn(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: {e}); no BatchNorm folded",
            stacklevel=2,
        )
        return []
    modules = dict(model.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN) or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv = modules.get(src.target)
        if isinstance(conv, nn.modules.conv._ConvNd) and not isinstance(
            conv, nn.modules.conv._ConvTransposeNd
        ):
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a conv into that conv (``fuse_conv_bn_eval``).

    The conv gets the folded weight and bias, the BatchNorm becomes ``nn.Identity``; module names of
    the convs stay the same. Only for inference: the folded model must not be trained further.

    Args:
        model: the network, modified in place; put in eval mode.

    Returns:
        The number of BatchNorm layers folded.
    """
    model.eval()
    pairs = conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if conv.weight.shape[0] != bn.num_features:
            raise ValueError(
                f"conv {conv_name!r} has {conv.weight.shape[0]} outputs but {bn_name!r} normalises {bn.num_features}"
            )
        _set_module(model, conv_name, fuse_conv_bn_eval(conv, bn))
        _set_module(model, bn_name, nn.Identity())
    return len(pairs)


def optimize_for_inference(
    model: nn.Module, fold_bn: bool = True, memory_format: str | None = None
) -> nn.Module:
    """Prepare a (pruned) network for fast CPU inference, in place.

    Args:
        model: the network; put in eval mode and modified in place.
        fold_bn: fold BatchNorm layers into the preceding convs (removes one memory pass per BatchNorm,
            which dominates at the small channel counts left after pruning).
        memory_format: ``None`` (keep), ``"channels_last"`` (``channels_last`` for 2D convs,
            ``channels_last_3d`` for 3D). Inputs should be converted the same way by the caller.

    Returns:
        ``model`` (for chaining). Run it under ``torch.inference_mode()``.
    """
    if memory_format not in (None, "channels_last"):
        raise ValueError(f"unknown memory_format {memory_format!r}; use None or 'channels_last'")
    model.eval()
    if fold_bn:
        fold_batchnorm(model)
    if memory_format == "channels_last":
        dims = {len(m.kernel_size) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}
        if len(dims) > 1:
            raise ValueError(f"mixed 2D/3D convs {sorted(dims)}: cannot choose one channels_last format")
        model.to(memory_format=torch.channels_last_3d if dims == {3} else torch.channels_last)
    return model


def to_memory_format(x: torch.Tensor, memory_format: str | None) -> torch.Tensor:
    """Convert an input batch the way ``optimize_for_inference(memory_format=...)`` converted the model."""
    if memory_format is None:
        return x
    return x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
