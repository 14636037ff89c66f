"""What removing one output channel of each prunable dependency group saves: parameters and MACs."""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.utils import op_counter

from monai_iaprune.pruning.monai_fixes import monai_pruning_fixes, pruner_kwargs_for, trace_kwargs
from monai_iaprune.relevance.layers import PRUNABLE_TYPES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelCost:
    """The saving of removing one output channel of a dependency group (averaged over its pruning unit).

    Attributes:
        params: parameters removed per channel (producer's out channel, every consumer's in channel, norms).
        macs: MACs removed per channel at the example input, as ``count_macs`` counts them.
        unit: channels removed together (1, or the channel groups of a GroupNorm / grouped conv: torch-pruning
            removes the same position in every group, so ``params`` and ``macs`` are that saving / ``unit``).
        out_layers: conv / linear layers whose output channels the group removes (the root first).
        in_layers: conv / linear layers whose input channels the group removes.
    """

    params: float
    macs: float
    unit: int = 1
    out_layers: tuple[str, ...] = ()
    in_layers: tuple[str, ...] = ()


def _channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1


def _module_macs(module: nn.Module, inputs: list[torch.Size], in_channels: int | None, removed: int) -> int:
    """torch-pruning's MAC count of ``module`` over its recorded calls, with inputs of ``in_channels`` channels.

    ``in_channels=None`` (a layer without a fixed input width, e.g. an activation): each input loses ``removed``.
    """
    hook = op_counter.MODULES_MAPPING.get(type(module))
    if hook is None:
        return 0
    total = 0
    for shape in inputs:
        shape = list(shape)
        dim = _channel_dim(module) % len(shape)
        shape[dim] = shape[dim] - removed if in_channels is None else in_channels
        x = torch.empty(shape, device="meta")
        module.__flops__ = 0
        # a norm keeps its input's shape; running it would check sizes a batch-1 trace can fail (GroupNorm over
        # one voxel per group, SegResNetVAE-3D's VAE branch: "Expected more than 1 value per channel")
        norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
        hook(module, (x,), x if norm else module(x))
        total += int(module.__flops__)
        del module.__flops__
    return total


class _Calls:
    """Input shapes of every MAC-counted module call on one forward, by module and by autograd node."""

    def __init__(self, model: nn.Module):
        self.by_module: dict[nn.Module, list[torch.Size]] = {}
        self.by_grad_fn: dict[Any, tuple[nn.Module, torch.Size]] = {}
        counted = tuple(op_counter.MODULES_MAPPING)
        self._handles = [
            m.register_forward_hook(self._record) for m in model.modules() if isinstance(m, counted)
        ]

    def _record(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not args or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        self.by_module.setdefault(module, []).append(args[0].shape)
        if output.grad_fn is not None:
            self.by_grad_fn[output.grad_fn] = (module, args[0].shape)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _group_saving(
    pruner: tp.pruner.MetaPruner, group, calls: _Calls, names: Mapping[Any, str]
) -> ChannelCost:
    dg = pruner.DG
    per_module: dict[nn.Module, list] = {}
    touched_fns = set()
    out_layers, in_layers = [], []
    for dep, idxs in group:
        node = dep.target
        if isinstance(node.module, nn.Module) and node.module in names:
            per_module.setdefault(node.module, []).append((dep.handler, list(idxs)))
        if node.grad_fn is not None:
            touched_fns.add(node.grad_fn)
        if isinstance(node.module, PRUNABLE_TYPES):
            (out_layers if dg.is_out_channel_pruning_fn(dep.handler) else in_layers).append(
                names[node.module]
            )
    params = 0
    macs = 0
    for module, edits in per_module.items():
        pruned = copy.deepcopy(module)
        for fn, idxs in edits:
            fn(pruned, idxs)
        params += sum(p.numel() for p in module.parameters()) - sum(p.numel() for p in pruned.parameters())
        inputs = calls.by_module.get(module, [])
        if inputs:
            new_in = dg.get_pruner_of_module(module).get_in_channels(pruned)
            removed = max(len(i) for _, i in edits)
            saved = _module_macs(module, inputs, dg.get_in_channels(module), 0) - _module_macs(
                pruned, inputs, new_in, removed
            )
            macs += saved
    # parameter-free counted layers (activations, pooling, upsampling) are autograd nodes of the graph: each
    # loses the group's channels on input and output
    for grad_fn in touched_fns:
        module, shape = calls.by_grad_fn.get(grad_fn, (None, None))
        if module is None or module in per_module:
            continue
        deps = [(d, i) for d, i in group if d.target.grad_fn is grad_fn]
        removed = len(deps[0][1])
        saved = _module_macs(module, [shape], None, 0) - _module_macs(module, [shape], None, removed)
        macs += saved
    unit = max(1, pruner._get_channel_groups(group))
    return ChannelCost(
        params / unit, macs / unit, unit, tuple(dict.fromkeys(out_layers)), tuple(dict.fromkeys(in_layers))
    )


def channel_costs(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    ignored_layers: Iterable[nn.Module | str] | None = None,
    pruner_kwargs: dict[str, Any] | None = None,
    skip_uncountable: bool = False,
) -> dict[str, ChannelCost]:
    """Parameters and MACs saved by removing one output channel of every prunable dependency group.

    The groups are torch-pruning's (``DependencyGraph``, as ``MetaPruner`` forms them for ``prune``): a
    channel removed at the root conv / linear is also removed from every coupled producer (residual sums),
    every consumer's input (concatenations mapped by offset), norms and activations. Each member's saving is
    counted with torch-pruning's own pruning function on a copy of that member and torch-pruning's MAC
    counter at the member's recorded input shape, so the sum equals what ``count_params`` / ``count_macs``
    report after pruning that channel. The model is traced once on a ``meta`` copy (shapes only), so the
    count costs no real forward pass.

    Args:
        model: the network (not modified).
        example_inputs: one input batch at the size the MACs are counted for.
        ignored_layers: modules (or names) whose groups are left out, as ``prune``'s ``ignored_layers``.
        pruner_kwargs: extra ``MetaPruner`` arguments; MONAI-specific ones are added (``pruner_kwargs_for``).
        skip_uncountable: leave out (with a warning) a group whose one-channel removal gives members that no
            longer fit together (a ``ViT`` attention ``qkv``: torch-pruning maps its einops split onto ``out_proj``
            inconsistently) instead of raising; a cost-aware ``prune`` then leaves that group unpruned.

    Returns:
        ``{root layer name: ChannelCost}``; the root is the first conv / linear of the group, as channel
        relevance names it, and ``ChannelCost.out_layers`` lists every coupled layer.
    """
    meta = copy.deepcopy(model).to("meta").eval()
    x = example_inputs.to("meta")
    originals = dict(model.named_modules())
    modules = dict(meta.named_modules())
    ignored = []
    for item in ignored_layers or []:
        name = item if isinstance(item, str) else next((n for n, m in originals.items() if m is item), None)
        if name not in modules:
            raise KeyError(f"ignored layer {item!r} is not a module of {type(model).__name__}")
        ignored.append(modules[name])
    extra = pruner_kwargs_for(meta)
    extra.update(trace_kwargs(meta, x))
    extra.update(pruner_kwargs or {})
    ignored += extra.pop("ignored_layers", [])
    names = {m: n for n, m in modules.items()}
    calls = _Calls(meta)
    with monai_pruning_fixes(meta):
        try:
            pruner = tp.pruner.MetaPruner(
                meta,
                (
                    x,
                ),  # a bare tensor is first tried as model(*x), an unbatched forward the hooks would record
                importance=tp.importance.MagnitudeImportance(),
                ignored_layers=ignored,
                **extra,
            )
        finally:
            calls.remove()  # before members are copied: the hooks hold the recorded autograd nodes
        costs = {}
        dg = pruner.DG
        for full in dg.get_all_groups(
            ignored_layers=pruner.ignored_layers, root_module_types=pruner.root_module_types
        ):
            dep = full[0].dep
            root = dep.target.module
            if not isinstance(root, PRUNABLE_TYPES) or not dg.is_out_channel_pruning_fn(dep.handler):
                continue
            n = dg.get_out_channels(root)
            unit = max(1, pruner._get_channel_groups(full))
            if not n or n % unit or n // unit < 2:
                continue  # a group down to one channel (per channel group) keeps it: nothing to cost, and
                # removing it would leave zero-channel norms the MAC counter cannot run
            group = dg.get_pruning_group(root, dep.handler, [g * (n // unit) for g in range(unit)])
            try:
                costs[names[root]] = _group_saving(pruner, group, calls, names)
            except RuntimeError as e:
                if not skip_uncountable:
                    raise
                logger.warning(
                    f"the cost of one channel of the group rooted at {names[root]!r} cannot be counted (its pruned "
                    f"members do not fit: {str(e).splitlines()[0]}); the group is left unpruned under a cost target"
                )
    return costs
