"""Depth pruning: replace the least relevant removable blocks by the identity, physically.

Width pruning leaves every layer, norm and kernel launch in place; removing whole blocks removes them. A removable
block (``relevance.blocks``) becomes a ``RemovedBlock`` (an ``nn.Identity``) on its parent module, so its
parameters and buffers leave the model and its state dict. A DenseNet ``_DenseLayer`` is removed the same way (its
dense block then passes the features on without concatenating new ones) and the channels it used to add are cut
from every consumer: the first norm / conv of each later dense layer of the block, and the transition (or final
norm and classifier) after the block, with torch-pruning's per-layer pruning functions.

A pruned checkpoint records each removed block as a module of type ``RemovedBlock`` in ``pruned_structure``;
``replay_removed_blocks(network_def, structure)`` re-creates them on a fresh network before the structure is
applied (see ``pruning.checkpoint.load_pruned``).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from monai_iaprune.pruning.latency_table import LatencyTable
from monai_iaprune.pruning.prune import CountsBeforeAfter, count_macs, count_params
from monai_iaprune.relevance.blocks import (
    Block,
    RemovedBlock,
    find_blocks,
    no_removable_message,
    removable_blocks,
)

__all__ = [
    "DepthBudgetUnreachable",
    "DepthPruneResult",
    "latency_table_for",
    "prune_depth",
    "remove_block",
    "removed_block_names",
    "replay_removed_blocks",
]

_REMOVED_TYPE = f"{RemovedBlock.__module__}.{RemovedBlock.__qualname__}"
_PASS_TYPES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Identity,
    nn.Flatten,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.dropout._DropoutNd,
)


class DepthBudgetUnreachable(ValueError):
    """``prune_depth``'s ratio / speed-up needs more blocks than may be removed.

    Attributes:
        reachable: the share of the target that removing every allowed block would save (``ratio`` units; for
            ``target="latency"`` the share of the estimated seconds). ``prune_depth`` with a ratio just below it
            removes exactly those blocks, e.g. the depth part of a depth + width budget capped at what depth can do.
    """

    def __init__(self, reachable: float, message: str) -> None:
        super().__init__(message)
        self.reachable = float(reachable)


@dataclass
class DepthPruneResult(CountsBeforeAfter):
    """What ``prune_depth`` did.

    Attributes:
        ratio: the requested fraction of ``target`` removed.
        target: ``"params"``, ``"macs"`` or ``"latency"``.
        removed: the removed blocks' names, least relevant first.
        relevance: ``{removed block: its relevance}``.
        stages: ``{stage: (blocks before, blocks after)}`` for every stage with a removable block.
        method: the block relevance method (``block_relevance.method``) when known.
        history: ``[(module name, "out" | "in", [removed indices])]`` of the layers re-sliced after a removed
            DenseNet layer (its consumers), in ``PruneResult.history``'s format for ``remap_optimizer``.
        params_before, params_after, macs_before, macs_after: counts (MACs on ``example_inputs``; 0 without).
        latency_estimated_speedup: ``target="latency"``: estimated speed-up from the latency table.
    """

    ratio: float
    target: str
    removed: list[str]
    relevance: dict[str, float]
    stages: dict[str, tuple[int, int]]
    params_before: int
    params_after: int
    macs_before: float = 0.0
    macs_after: float = 0.0
    method: str | None = None
    history: list[tuple[str, str, list[int]]] = field(default_factory=list)
    latency_estimated_speedup: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for reports and ``save_pruned(extra=...)``)."""
        return {
            "ratio": self.ratio,
            "target": self.target,
            "method": self.method,
            "removed_blocks": list(self.removed),
            "relevance": dict(self.relevance),
            "stages": {s: list(v) for s, v in self.stages.items()},
            "latency_estimated_speedup": self.latency_estimated_speedup,
            **self.counts(),
        }


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` wherever the module ``name`` is referenced (DynUNet also holds its blocks in ``skip_layers``)."""
    old = model.get_submodule(name)
    for m in list(model.modules()):
        for key, value in m._modules.items():
            if value is old:
                m._modules[key] = new


def _leaves_after(model: nn.Module, name: str) -> list[tuple[str, nn.Module]]:
    """Leaf modules registered after the subtree ``name`` (registration order is execution order in DenseNet)."""
    out, after = [], False
    for n, m in model.named_modules():
        if n == name:
            after = True
            continue
        if after and not n.startswith(f"{name}.") and next(m.children(), None) is None:
            out.append((n, m))
    return out


def _slice_consumers(
    leaves: Sequence[tuple[str, nn.Module]], idxs: list[int], where: str, history: list | None = None
) -> None:
    """Cut input channels ``idxs`` from the leading channel-wise layers of ``leaves`` up to the first conv / linear
    (each cut appended to ``history`` as ``(name, "out" | "in", idxs)``)."""
    record = history.append if history is not None else (lambda entry: None)
    for n, m in leaves:
        if isinstance(m, RemovedBlock) or isinstance(m, _PASS_TYPES):
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            tp.prune_batchnorm_out_channels(m, idxs)
            record((n, "out", list(idxs)))
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm) and not m.affine:
            m.num_features -= len(idxs)
        elif isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.groups == 1:
            tp.prune_conv_in_channels(m, idxs)
            record((n, "in", list(idxs)))
            return
        elif isinstance(m, nn.Linear):
            tp.prune_linear_in_channels(m, idxs)
            record((n, "in", list(idxs)))
            return
        else:
            raise ValueError(
                f"cannot re-slice {n!r} ({type(m).__name__}) after removing a dense layer ({where}): only "
                "BatchNorm, non-affine InstanceNorm, activations, pooling and a following conv / linear are handled"
            )
    raise ValueError(f"no conv / linear consumer found after the dense layer {where!r}")


@torch.no_grad()
def remove_block(model: nn.Module, name: str, history: list | None = None) -> None:
    """Replace the removable block ``name`` by ``RemovedBlock``; for a DenseNet layer, cut its channels downstream.

    ``history``, when given, receives the downstream cuts (``PruneResult.history`` format, for ``remap_optimizer``).

    Raises:
        ValueError: ``name`` is not a removable block of ``model``.
    """
    blocks = removable_blocks(model)
    if name not in blocks:
        found = find_blocks(model)
        why = found[name].reason if name in found else "no such block of a supported family"
        raise ValueError(f"{name!r} is not a removable block of {type(model).__name__}: {why}")
    block = blocks[name]
    if block.family.dense:
        layers = block.module.layers
        convs = [m for m in layers.modules() if isinstance(m, nn.modules.conv._ConvNd)]
        c_in, growth = convs[0].in_channels, convs[-1].out_channels
        idxs = list(range(c_in, c_in + growth))
        parent = model.get_submodule(block.stage) if block.stage else model
        later = False
        for child_name, child in parent.named_children():
            full = f"{block.stage}.{child_name}" if block.stage else child_name
            if full == name:
                later = True
            elif later and not isinstance(child, RemovedBlock):
                leaves = [
                    (f"{full}.{n}", m) for n, m in child.named_modules() if next(m.children(), None) is None
                ]
                _slice_consumers(leaves, idxs, name, history)
        _slice_consumers(_leaves_after(model, block.stage), idxs, name, history)
    _set_module(model, name, RemovedBlock())


def removed_block_names(model: nn.Module) -> list[str]:
    """Names of the blocks ``prune_depth`` / ``remove_block`` replaced in ``model``."""
    return [n for n, m in model.named_modules() if isinstance(m, RemovedBlock)]


def replay_removed_blocks(model: nn.Module, structure: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Re-create on a fresh ``network_def`` the blocks a recorded ``pruned_structure`` lists as removed.

    Call before ``apply_pruned_structure`` (the structure of a dense layer's consumers is then applied as recorded).

    Args:
        model: a freshly built network of the unpruned definition.
        structure: ``pruning.checkpoint.pruned_structure(pruned_model)``.

    Returns:
        the names replaced.
    """
    names = [n for n, rec in structure.items() if rec.get("type") == _REMOVED_TYPE]
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(
            f"removed blocks {missing[:3]} do not exist in {type(model).__name__}: other network_def"
        )
    for n in sorted(names, key=lambda s: s.count(".")):  # outer blocks first
        if not isinstance(dict(model.named_modules()).get(n), RemovedBlock):
            _set_module(model, n, RemovedBlock())
    return names


def _example(example_inputs: Any, relevance: Any) -> torch.Tensor | None:
    if example_inputs is None:
        example_inputs = getattr(relevance, "example_input", None)
    return example_inputs


def _output_shape(model: nn.Module, x: torch.Tensor) -> Any:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was)
    return _shapes(out)


def _shapes(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return [_shapes(o) for o in out]
    return None


def _shape_keeping(model: nn.Module, blocks: dict[str, Block], x: torch.Tensor) -> set[str]:
    """Blocks whose traced output shape equals their input's (dense: same but for the added channels)."""
    shapes: dict[str, tuple] = {}
    handles = []
    for name, blk in blocks.items():

        def hook(m, args, out, _name=name):
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                shapes[_name] = (tuple(args[0].shape), tuple(out.shape))

        handles.append(blk.module.register_forward_hook(hook))
    try:
        _output_shape(model, x)
    finally:
        for h in handles:
            h.remove()
    ok = set()
    for name, blk in blocks.items():
        if name not in shapes:
            continue  # never ran on this input: leave it
        s_in, s_out = shapes[name]
        if blk.family.dense:
            ok |= {name} if s_in[:1] + s_in[2:] == s_out[:1] + s_out[2:] else set()
        elif s_in == s_out:
            ok.add(name)
    return ok


def latency_table_for(table: LatencyTable, model: nn.Module) -> LatencyTable:
    """``table`` without the layers ``model`` no longer has (inside removed blocks), so that
    ``estimate_model`` counts them, and the activation time of their outputs, as 0 s rather than at full width.

    Pass the result to ``prune(target="latency", latency_table=...)`` to width-prune a depth-pruned network.
    Work of a removed block that follows no conv / linear output of its own stays in the table's constant
    overhead, so the estimated speed-up of depth pruning may still be low (measure it).
    """
    present = {n for n, _ in model.named_modules()}
    layers = {n: t for n, t in table.layers.items() if n in present}
    return dataclasses.replace(table, layers=layers)


def _seconds(table: LatencyTable, model: nn.Module) -> float:
    return latency_table_for(table, model).estimate_model(model)


def _amount(model: nn.Module, target: str, x: torch.Tensor | None, table: LatencyTable | None) -> float:
    if target == "params":
        return float(count_params(model))
    if target == "macs":
        return float(count_macs(model, x))
    return _seconds(table, model)


def _cost(
    model: nn.Module,
    name: str,
    block: Block,
    target: str,
    x: torch.Tensor | None,
    base: float,
    table: LatencyTable | None = None,
) -> float:
    """How much of ``target`` removing ``name`` alone saves (exact params for residual blocks)."""
    if target == "params" and not block.family.dense:
        return float(count_params(block.module))
    trial = copy.deepcopy(model)
    remove_block(trial, name)
    return float(base - _amount(trial, target, x, table))


def _stage_counts(model: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for blk in find_blocks(model).values():
        counts[blk.stage] = counts.get(blk.stage, 0) + 1
    return counts


def prune_depth(
    model: nn.Module,
    block_relevance: Mapping[str, float],
    ratio: float | None = None,
    *,
    target: str = "params",
    example_inputs: torch.Tensor | None = None,
    min_blocks_per_stage: int = 1,
    blocks: Sequence[str] | None = None,
    speedup: float | None = None,
    latency_table: LatencyTable | None = None,
) -> DepthPruneResult:
    """Remove the least relevant removable blocks of ``model`` (in place) until ``ratio`` of ``target`` is gone.

    Blocks are taken in order of increasing relevance; a block is skipped while its stage (its parent module)
    would keep fewer than ``min_blocks_per_stage`` blocks (counting every block of a supported family there,
    removable or not). Removal stops as soon as the removed share reaches ``ratio`` (it may overshoot by one
    block).

    Args:
        model: the network; modified in place.
        block_relevance: ``{block name: relevance}`` (``relevance.blocks.block_relevance``); only these blocks
            are candidates.
        ratio: fraction of ``target`` to remove, in ``[0, 1)``. Either ``ratio``, ``speedup`` or ``blocks``.
        target: ``"params"``, ``"macs"`` (needs ``example_inputs``) or ``"latency"`` (needs ``speedup`` and
            ``latency_table``).
        example_inputs: one input batch; checks that every candidate keeps shapes and that the output shape is
            unchanged, and counts MACs. Default ``block_relevance.example_input`` when present.
        min_blocks_per_stage: blocks every stage keeps.
        blocks: remove exactly these blocks instead of choosing by ``ratio`` (stage rule still applies).
        speedup: ``target="latency"``: the estimated speed-up to reach, > 1 (removes ``1 - 1 / speedup`` of the
            estimated seconds).
        latency_table: ``target="latency"``: ``measure_latency_table`` of ``model`` (unpruned by depth); a layer
            inside a removed block costs 0 s, its outputs' activation time too (see ``latency_table_for``).

    Returns:
        ``DepthPruneResult``.

    Raises:
        ValueError: no removable block; a relevance entry that names no removable block; a ratio out of range or
            one that cannot be reached without leaving a stage with fewer than ``min_blocks_per_stage`` blocks
            (the stage is named; ``DepthBudgetUnreachable``, carrying the reachable share); an unknown target.
    """
    if target not in ("params", "macs", "latency"):
        raise ValueError(f"target must be 'params', 'macs' or 'latency', got {target!r}")
    if target == "latency":
        if latency_table is None:
            raise ValueError("target='latency' needs a latency_table (pruning.measure_latency_table)")
        if speedup is not None:
            if not speedup > 1.0:
                raise ValueError(f"target='latency' needs a speedup > 1, got {speedup!r}")
            if ratio is not None:
                raise ValueError("pass either ratio or speedup")
            ratio = 1.0 - 1.0 / float(speedup)
    elif speedup is not None:
        raise ValueError("speedup applies to target='latency' only")
    if (ratio is None) == (blocks is None):
        raise ValueError("pass either ratio (or speedup) or blocks")
    if ratio is not None and not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if min_blocks_per_stage < 0:
        raise ValueError(f"min_blocks_per_stage must be >= 0, got {min_blocks_per_stage}")
    x = _example(example_inputs, block_relevance)
    if target == "macs" and x is None:
        raise ValueError("target='macs' needs example_inputs")
    candidates = removable_blocks(model)
    if not candidates:
        raise ValueError(no_removable_message(model))
    stale = [n for n in (blocks if blocks is not None else block_relevance) if n not in candidates]
    if stale:
        raise ValueError(
            f"{len(stale)} block(s) are not removable blocks of {type(model).__name__} (e.g. {stale[:3]}): "
            "block relevance must be collected on this model"
        )
    out_shape = None
    if x is not None:
        keep = _shape_keeping(model, candidates, x)
        candidates = {n: b for n, b in candidates.items() if n in keep}
        out_shape = _output_shape(model, x)
    params_before = count_params(model)
    macs_before = count_macs(model, x) if x is not None else 0.0
    seconds_before = _seconds(latency_table, model) if latency_table is not None else None
    base = {"params": float(params_before), "macs": float(macs_before)}.get(target, seconds_before)
    counts = _stage_counts(model)
    before_counts = dict(counts)

    if blocks is not None:
        order = list(blocks)
        for n in order:
            if n not in candidates:
                raise ValueError(f"block {n!r} changes shapes on example_inputs and cannot be removed")
        by_stage: dict[str, int] = {}
        for n in order:
            by_stage[candidates[n].stage] = by_stage.get(candidates[n].stage, 0) + 1
        for stage, k in by_stage.items():
            if counts[stage] - k < min_blocks_per_stage:
                raise ValueError(
                    f"removing {k} block(s) of stage {stage!r} would leave {counts[stage] - k} of "
                    f"{counts[stage]} (min_blocks_per_stage={min_blocks_per_stage})"
                )
        chosen = order
    else:
        goal = ratio * base
        ranked = sorted((n for n in block_relevance if n in candidates), key=lambda n: block_relevance[n])
        chosen, saved, blocked = [], 0.0, []
        for n in ranked:
            if saved >= goal:
                break
            stage = candidates[n].stage
            if counts[stage] - 1 < min_blocks_per_stage:
                blocked.append(stage)
                continue
            counts[stage] -= 1
            chosen.append(n)
            saved += _cost(model, n, candidates[n], target, x, base, latency_table)
        if saved < goal and goal > 0:
            stages = sorted(set(blocked))
            where = (
                f"it would leave stage(s) {stages} with fewer than min_blocks_per_stage={min_blocks_per_stage} "
                "block(s)"
                if stages
                else "the removable blocks do not hold that much"
            )
            raise DepthBudgetUnreachable(
                saved / base,
                f"depth ratio {ratio} of {target} cannot be reached by removing blocks of {type(model).__name__} "
                f"(at most {saved / base:.3f}"
                + (
                    f", an estimated speed-up of {1 / max(1 - saved / base, 1e-9):.2f}x"
                    if target == "latency"
                    else ""
                )
                + f"): {where}",
            )
    history: list[tuple[str, str, list[int]]] = []
    for n in chosen:
        remove_block(model, n, history)
    if out_shape is not None and _output_shape(model, x) != out_shape:
        raise RuntimeError(
            f"depth pruning changed the output shape of {type(model).__name__}: a bug, please report"
        )
    after_counts = _stage_counts(model)
    candidate_stages = {b.stage for b in candidates.values()}
    stages = {s: (k, after_counts.get(s, 0)) for s, k in before_counts.items() if s in candidate_stages}
    return DepthPruneResult(
        ratio=float(ratio) if ratio is not None else float("nan"),
        target=target,
        removed=list(chosen),
        relevance={n: float(block_relevance[n]) for n in chosen if n in block_relevance},
        stages=stages,
        params_before=params_before,
        params_after=count_params(model),
        macs_before=macs_before,
        macs_after=count_macs(model, x) if x is not None else 0.0,
        method=getattr(block_relevance, "method", None),
        history=history,
        latency_estimated_speedup=(
            seconds_before / _seconds(latency_table, model) if seconds_before is not None else None
        ),
    )
