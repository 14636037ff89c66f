"""Physical structured pruning of a network from per-channel relevance, through torch-pruning."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.utils import op_counter

from monai_iaprune.pruning.cost import channel_costs
from monai_iaprune.pruning.importance import CostAwareImportance, RelevanceImportance
from monai_iaprune.pruning.latency_table import LatencyTable, measure_latency_pair, measure_latency_table
from monai_iaprune.pruning.monai_fixes import (
    monai_pruning_fixes,
    pruning_setup,
    release_held_tensors,
)
from monai_iaprune.pruning.quiet import quiet_op_counter
from monai_iaprune.relevance.layers import PRUNABLE_TYPES, out_channels
from monai_iaprune.relevance.registry import METHODS
from monai_iaprune.utils.settings import check_int, check_number

TARGETS = ("params", "macs", "channels", "latency")
# above either, ``prune``'s ratio search counts its trials on meta copies (``meta_copy``): measured on the sweep's
# MONAI networks, 1 thread, macs target: SENet-3D (158M params) 31.8 -> 5.4 s, BasicUNet++-3D (2.6 GMACs) 9.1 -> 5.9
# s; below them the meta dispatch overhead makes small networks slower (DiNTS-2D 3.4 -> 5.8 s)
META_TRIAL_PARAMS = 20_000_000
META_TRIAL_MACS = 1e9
LATENCY_FEEDBACK_TOLERANCE = (
    0.05  # a measured speed-up within 5 % of the request ends the measured corrections
)


class CountsBeforeAfter:
    """Parameter / MACs counts before and after a pruning step and the fractions removed (one place for both
    width and depth results)."""

    params_before: int
    params_after: int
    macs_before: float
    macs_after: float

    @property
    def params_removed(self) -> float:
        return 1.0 - self.params_after / max(self.params_before, 1)

    @property
    def macs_removed(self) -> float:
        return 1.0 - self.macs_after / max(self.macs_before, 1.0)

    def counts(self) -> dict[str, float]:
        """``params_before/after/removed`` and ``macs_before/after/removed`` as a dict."""
        keys = [f"{count}_{when}" for count in ("params", "macs") for when in ("before", "after", "removed")]
        return {k: getattr(self, k) for k in keys}


@dataclass
class PruneResult(CountsBeforeAfter):
    """What ``prune`` did.

    Attributes:
        ratio: the requested fraction removed (of ``target``).
        target: ``"params"``, ``"macs"`` or ``"channels"``.
        params_before, params_after, macs_before, macs_after: counts on ``example_inputs``.
        channels: ``{layer name: (out channels before, out channels after)}`` for every conv / linear layer.
        channel_ratio: the torch-pruning channel ratio that reached the target.
        latency_trials: ``target="latency"``: ``[(table speed-up aimed at, measured speed-up)]`` of each
            selection timed by the measured corrections (``prune``'s ``latency_feedback``), in order.
        history: ``[(module name, "out" | "in", [removed indices])]`` in the order applied, so an
            optimizer or any per-parameter state can be sliced the same way.
    """

    ratio: float
    target: str
    params_before: int
    params_after: int
    macs_before: float
    macs_after: float
    channels: dict[str, tuple[int, int]]
    channel_ratio: float
    history: list[tuple[str, str, list[int]]] = field(default_factory=list)
    cost_aware: bool = False
    latency_before: float | None = None
    latency_after: float | None = None
    latency_estimated_speedup: float | None = None
    latency_trials: list[tuple[float, float]] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        """Measured speed-up (``target="latency"`` only)."""
        if self.latency_before is None or not self.latency_after:
            return None
        return self.latency_before / self.latency_after

    def as_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "target": self.target,
            **self.counts(),
            "channel_ratio": self.channel_ratio,
            "cost_aware": self.cost_aware,
            "latency_before": self.latency_before,
            "latency_after": self.latency_after,
            "speedup": self.speedup,
            "latency_estimated_speedup": self.latency_estimated_speedup,
            "latency_trials": [list(t) for t in self.latency_trials],
            "per_layer": [
                {"name": n, "channels_before": b, "channels_after": a} for n, (b, a) in self.channels.items()
            ],
        }


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> float:
    """MACs of one forward on ``example_inputs``: torch-pruning's per-layer counts, each layer counted once.

    torch-pruning sums its per-call counts over the module tree, so a layer registered under two names (DynUNet's
    ``skip_layers`` re-registers every encoder and decoder block: 2x the MACs) counts once per name; here every
    layer's calls count once, as a per-call hook count does.
    """
    with torch.no_grad(), quiet_op_counter():
        _, _, per_layer, _ = tp.utils.count_ops_and_params(model, example_inputs, layer_wise=True)
    counted = op_counter.is_supported_instance
    return float(sum(per_layer[m] or 0 for m in model.modules() if counted(m)))


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers live on the ``meta`` device (shapes only, no data copied).

    ``prune``'s ratio search counts what a trial selection removes on such copies: relevance scores, not weights,
    choose the channels, so the selection and its counts are the same as on a real copy, at no memory cost.
    """
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in memo:
            empty = torch.empty_like(t, device="meta")
            memo[id(t)] = (
                nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
            )
    return copy.deepcopy(model, memo)


def _layer_channels(model: nn.Module) -> dict[str, int]:
    return {n: out_channels(m) for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}


def check_prune_kwargs(kwargs: Mapping[str, Any], reserved: Iterable[str] = ()) -> None:
    """Raise ValueError for a key of ``kwargs`` that is no ``prune`` setting (or is ``reserved``), listing the
    accepted ones, or for a ``max_layer_ratio`` / ``round_to`` / ``tolerance`` out of its range."""
    import inspect

    accepted = [p for p in inspect.signature(prune).parameters if p not in ("model", "relevance", *reserved)]
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise ValueError(f"{unknown} are not settings of monai_iaprune.prune here; it accepts {accepted}")
    if "max_layer_ratio" in kwargs:
        check_number(kwargs["max_layer_ratio"], "max_layer_ratio", 0.0, 1.0, min_open=True, max_open=True)
    if "round_to" in kwargs:
        check_int(kwargs["round_to"], "round_to", 1, allow_none=True)
    if "tolerance" in kwargs:
        check_number(kwargs["tolerance"], "tolerance", 0.0, 1.0, max_open=True)


def _validate_ratio(ratio: float) -> None:
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 < float(ratio) < 1.0:
        raise ValueError(f"bad ratio {ratio!r}: the fraction to remove must lie strictly between 0 and 1")


def _apply(
    model: nn.Module,
    relevance: Mapping[str, torch.Tensor],
    channel_ratio: float,
    example_inputs: torch.Tensor,
    ignored: list[nn.Module],
    global_pruning: bool,
    round_to: int | None,
    max_layer_ratio: float,
    normalizer: str | None,
    group_reduction: str,
    extra_kwargs: dict[str, Any],
    unit_cost: Mapping[str, float] | None = None,
) -> list[tuple[str, str, list[int]]]:
    """Prune ``model`` in place at one torch-pruning channel ratio; return the history."""
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    scores = {}
    for name, r in relevance.items():
        if name not in modules:
            raise KeyError(f"relevance names layer {name!r}, which {type(model).__name__} does not have")
        m = modules[name]
        if r.numel() != out_channels(m):
            raise ValueError(
                f"relevance for {name!r} has {r.numel()} entries but the layer has {out_channels(m)} channels"
            )
        scores[m] = r
    imp = RelevanceImportance(scores, normalizer=normalizer, group_reduction=group_reduction)
    if unit_cost is not None:
        imp = CostAwareImportance(imp, {modules[n]: c for n, c in unit_cost.items() if n in modules})
    history: list[tuple[str, str, list[int]]] = []
    with monai_pruning_fixes(model):
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs,
            importance=imp,
            pruning_ratio=channel_ratio,
            global_pruning=global_pruning,
            max_pruning_ratio=max_layer_ratio,
            ignored_layers=ignored,
            round_to=None,  # rounding is done per channel group by _limit_group
            **extra_kwargs,
        )
        check = pruner.DG.check_pruning_group
        # torch-pruning drops a globally ranked group outright when every channel falls under the threshold
        # (making the reached ratio non-monotone in the channel ratio); _limit_group caps it instead
        pruner.DG.check_pruning_group = lambda group: True
        for group in pruner.step(interactive=True):
            group = _limit_group(pruner, group, max_layer_ratio, round_to)
            if group is None or not check(group):
                continue
            for dep, idxs in group:
                m = dep.target.module
                if isinstance(m, nn.Module) and m in names:
                    kind = "out" if dep.handler.__name__ == "prune_out_channels" else "in"
                    history.append((names[m], kind, sorted(int(i) for i in idxs)))
            group.prune()
    return history


def _limit_group(pruner: tp.pruner.MetaPruner, group, max_layer_ratio: float, round_to: int | None):
    """Cap a group's removal at ``max_layer_ratio`` and round what remains, per channel group.

    Layers with channel groups (GroupNorm, grouped convs) lose the same positions in every group
    (torch-pruning's convention), so rounding applies to the channels kept *per group*: with ``G`` groups
    the kept count per group is a multiple of ``round_to / gcd(round_to, G)``. torch-pruning 1.6.1 rounds
    the whole layer's count against the per-group removal instead, so a GroupNorm network (MONAI
    ``SegResNet``) is barely or never pruned once ``round_to`` is set.

    Returns:
        The group to prune (unchanged, or rebuilt with the least important positions), or ``None``.
    """
    dg = pruner.DG
    dep = group[0].dep
    module, fn = dep.target.module, dep.handler
    if pruner._is_atten_group(group)[0]:
        return group  # attention groups: head dims follow num_heads, left to torch-pruning
    n = dg.get_out_channels(module) if dg.is_out_channel_pruning_fn(fn) else dg.get_in_channels(module)
    groups = pruner._get_channel_groups(group)
    if n is None or n % groups:
        return group
    size = n // groups
    removed = len(set(group[0].idxs)) // groups
    keep_min = max(1, size - math.floor(max_layer_ratio * size + 1e-9))
    step = round_to // math.gcd(round_to, groups) if round_to else 1
    keep = max(size - removed, keep_min)
    keep -= keep % step
    if keep < keep_min:
        keep = step * math.ceil(keep_min / step)
    if keep >= size:
        return None
    if keep == size - removed:
        return group
    imp = pruner.estimate_importance(dg.get_pruning_group(module, fn, list(range(n))))
    if imp is None:
        return None
    per_position = imp.view(groups, -1).mean(0) if groups > 1 else imp
    positions = torch.argsort(per_position)[: size - keep].tolist()
    return dg.get_pruning_group(module, fn, sorted(p + g * size for g in range(groups) for p in positions))


def resolve_normalizer(normalizer: str | None, relevance: Any = None, target: str = "params") -> str | None:
    """The per-layer normaliser ``prune`` uses: ``"auto"`` resolved from ``relevance.method`` and ``target``.

    Args:
        normalizer: ``"auto"`` or one of ``RelevanceImportance.NORMALIZERS``.
        relevance: a ``ChannelRelevance`` (its ``method`` decides ``"auto"``) or a plain mapping.
        target: what the pruning ratio counts (``prune``'s ``target``): raw scores only for ``"params"``.
    """
    if normalizer != "auto":
        if normalizer not in RelevanceImportance.NORMALIZERS:
            raise ValueError(
                f"unknown normalizer {normalizer!r}; use 'auto' or one of {RelevanceImportance.NORMALIZERS}"
            )
        return normalizer
    spec = METHODS.get(getattr(relevance, "method", None))
    if target == "params" and spec is not None and spec.shared_scale:
        return None
    return "mean"


def prune(
    model: nn.Module,
    relevance: Mapping[str, torch.Tensor],
    ratio: float = 0.5,
    *,
    target: str = "params",
    example_inputs: torch.Tensor | None = None,
    global_pruning: bool = True,
    ignored_layers: Iterable[nn.Module | str] | None = None,
    round_to: int | None = None,
    max_layer_ratio: float = 0.9,
    normalizer: str | None = "auto",
    group_reduction: str = "mean",
    tolerance: float = 0.01,
    pruner_kwargs: dict[str, Any] | None = None,
    cost_aware: bool | None = None,
    speedup: float | None = None,
    latency_table: LatencyTable | None = None,
    device: torch.device | str | None = None,
    threads: int | None = None,
    latency_feedback: int = 2,
) -> PruneResult:
    """Remove the least relevant channels of ``model`` in place.

    Args:
        model: the network; pruned in place (its parameters are replaced by smaller ones).
        relevance: ``{layer name: 1-D per-output-channel scores}``, e.g. from ``channel_relevance``.
            Layers with no entry keep a neutral score inside their dependency group, and are left alone
            when no member of their group is scored.
        ratio: fraction of ``target`` to remove, strictly between 0 and 1 (ignored for ``"latency"``).
        target: ``"params"`` (fraction of parameters, default), ``"macs"``, ``"channels"`` (torch-pruning's
            own channel ratio) or ``"latency"`` (a ``speedup`` estimated from a measured ``LatencyTable``,
            then checked by timing the pruned network: ``PruneResult.speedup``).
        example_inputs: one input batch to trace the network; default ``relevance.example_input``.
        global_pruning: rank channels across layers (default) or prune every layer by the same ratio.
        ignored_layers: modules (or their names) never pruned; the layers producing the network output
            (classifier heads, segmentation output convs) are always added.
        round_to: keep channel counts multiples of this (helps CPU kernels; ``8`` for GPU inference, where
            other counts fall off cuDNN's fast kernels; see BENCHMARKS.md).
        max_layer_ratio: the most of one layer's channels that may go (default 0.9: at least 10 % of each
            layer stays). Raw scores ranked across layers strip single layers to 1-2 channels at >= 90 %
            of parameters removed when this is 0.99, and the network then predicts one class; with 0.9 the
            same scores keep their accuracy (BENCHMARKS.md, MedMNIST benchmark).
        normalizer: per-layer normalisation before channels are ranked across layers (see
            ``RelevanceImportance``). ``"auto"`` (default): with ``target="params"``, ``None`` (raw scores)
            for the methods registered with ``shared_scale=True`` (the attributions ``"lrp"``, ``"ig"``,
            ``"taylor"``), whose per-channel values are shares of one explained output, so a wide layer's channels each carry little and go first — that removes
            parameters where they cost least accuracy, but keeps most MACs (deep layers hold the
            parameters, early layers the MACs); ``"mean"`` for every other method and for
            ``target="macs"`` / ``"channels"``, where raw scores strip the cheap-per-MAC deep layers
            and collapse (criteria study in BENCHMARKS.md).
        group_reduction: see ``RelevanceImportance``.
        tolerance: accepted gap between the reached and requested fraction for params / MACs targets.
        pruner_kwargs: extra ``MetaPruner`` arguments (e.g. ``num_heads``); MONAI-specific ones are added.
        cost_aware: rank channels by relevance per unit of what removing them saves (``channel_costs``:
            parameters, MACs; or seconds from the latency table), the greedy order of a knapsack keeping
            the most relevance under the budget, and never stop short of the budget (the removed fraction
            is at least ``ratio`` and at most about ``tolerance / 4`` above it, see
            ``_search_channel_ratio``). Default ``None``: on for ``"macs"`` and ``"latency"`` (where a
            raw global ranking strips cheap wide late layers and keeps most MACs), off for ``"params"`` and
            ``"channels"`` (unchanged behaviour). With it, ``normalizer="auto"`` keeps raw scores for the
            shared-scale methods, as for ``"params"``: the knapsack needs values in one unit across layers.
        speedup: ``target="latency"`` only: the requested estimated speed-up, > 1.
        latency_table: ``target="latency"``: a ``measure_latency_table`` result for ``model`` at
            ``example_inputs``; default: measured (or read from the cache) on ``device`` / ``threads``.
        device, threads: where latency is measured (default the model's device; CPU threads as set).
        latency_feedback: ``target="latency"``: measured corrections of the table's selection. The pruned
            selection is timed against the unpruned network; while its measured speed-up is more than 5 % off the
            request, the speed-up aimed at in the table is scaled by requested / measured and the selection
            searched again, at most this many times (or until the table cannot reach the corrected aim); the
            selection measured closest to the request is kept (``PruneResult.latency_trials``). 0: the table's
            estimate alone.

    Why a greedy ratio order rather than HALP's group knapsack: the global ranking *is* torch-pruning's
    (MetaPruner with an ``Importance``), so ``round_to``, ``max_layer_ratio`` and channel groups keep
    working through ``_limit_group``; per-channel costs are constant within a group (``channel_costs``
    is linear in removed channels), where the greedy order is optimal for the fractional knapsack and
    off by at most one channel's value for the 0/1 one.

    Returns:
        ``PruneResult`` with counts before and after, channels per layer and the pruning history.
    """
    latency_device = device
    if target not in TARGETS:
        raise ValueError(f"unknown pruning target {target!r}; use one of {TARGETS}")
    if target == "latency":
        if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not float(speedup) > 1.0:
            raise ValueError(f"target='latency' needs a speedup > 1, got {speedup!r}")
        ratio = 1.0 - 1.0 / float(speedup)
    elif speedup is not None:
        raise ValueError("speedup applies to target='latency' only")
    _validate_ratio(ratio)
    if cost_aware is None:
        cost_aware = target in ("macs", "latency")
    if cost_aware and target == "channels":
        raise ValueError("cost_aware needs a params, macs or latency budget, not target='channels'")
    normalizer = resolve_normalizer(normalizer, relevance, "params" if cost_aware else target)
    check_prune_kwargs({"max_layer_ratio": max_layer_ratio, "round_to": round_to, "tolerance": tolerance})
    check_int(latency_feedback, "latency_feedback", 0)
    if not relevance:
        raise ValueError(
            "relevance is empty: no layer has scores to rank (channel_relevance found no layer?)"
        )
    if example_inputs is None:
        example_inputs = getattr(relevance, "example_input", None)
        if example_inputs is None:
            raise ValueError("pass example_inputs (one input batch) to trace the network")
    device = next(model.parameters()).device
    example_inputs = example_inputs.to(device)
    for name, r in relevance.items():
        if not torch.isfinite(torch.as_tensor(r)).all():
            raise FloatingPointError(f"NaN/Inf relevance for layer {name!r}: refusing to prune on it")
    was_training = model.training
    model.eval()
    # torch-pruning traces the autograd graph: layers of frozen parameters (requires_grad=False) before any trainable
    # one leave no grad_fn and would silently stay unpruned; trace with every parameter trainable, restore after
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    model.requires_grad_(True)
    try:
        return _prune_traced(
            model, relevance, ratio, target, speedup, example_inputs, ignored_layers, pruner_kwargs,
            global_pruning, round_to, max_layer_ratio, normalizer, group_reduction, tolerance, cost_aware,
            latency_table, latency_device, threads, latency_feedback,
        )  # fmt: skip
    finally:
        params = dict(model.named_parameters())
        for n in frozen:
            if n in params:
                params[n].requires_grad_(False)
        model.train(was_training)


def _prune_traced(
    model, relevance, ratio, target, speedup, example_inputs, ignored_layers, pruner_kwargs,
    global_pruning, round_to, max_layer_ratio, normalizer, group_reduction, tolerance, cost_aware,
    latency_table, latency_device, threads, latency_feedback=0,
) -> PruneResult:  # fmt: skip
    """``prune`` after its argument checks, with every parameter trainable and the model in eval mode."""
    release_held_tensors(model)  # e.g. DynUNet heads from the relevance pass: the trials deep-copy the model
    unpool = [n for n, m in model.named_modules() if isinstance(m, nn.modules.pooling._MaxUnpoolNd)]
    if (
        unpool
    ):  # Quicknat: the unpooling indices come from the encoder's pooling, a coupling torch-pruning never sees
        raise NotImplementedError(
            f"{type(model).__name__} is not supported: its MaxUnpool layers {unpool[:3]} reuse the indices of an "
            "encoder max-pooling, which torch-pruning does not couple to the decoder channels (docs/networks.md)"
        )
    modules = dict(model.named_modules())
    ignored: list[nn.Module] = []
    for item in ignored_layers or []:
        if isinstance(item, str):
            if item not in modules:
                raise KeyError(f"ignored layer {item!r} is not a module of {type(model).__name__}")
            item = modules[item]
        ignored.append(item)
    ignored, extra = pruning_setup(model, example_inputs, ignored, pruner_kwargs)
    channels_before = _layer_channels(model)
    params_before = count_params(model)
    macs_before = count_macs(model, example_inputs)
    unit_cost = None
    latency_before = None
    if target == "latency":
        if latency_device is None:
            latency_device = example_inputs.device
        if latency_table is None:
            latency_table = measure_latency_table(
                model, example_inputs, device=latency_device, threads=threads
            )
        latency_estimate_before = latency_table.estimate_model(model)
        unpruned = copy.deepcopy(model)  # timed beside every pruned selection (interleaved)
    if cost_aware:
        try:
            costs = channel_costs(
                model,
                example_inputs,
                ignored_layers=ignored,
                pruner_kwargs=pruner_kwargs,
                skip_uncountable=True,
            )  # a group that cannot be costed (ViT attention qkv) is left unpruned: CostAwareImportance skips it
        except RuntimeError as e:  # the graph itself cannot be traced for costs
            raise RuntimeError(
                f"the cost of a channel of {type(model).__name__} cannot be counted: pruning one channel gives a "
                f"network that does not run ({str(e).splitlines()[0]}); use target='params' (docs/networks.md)"
            ) from e
        unit_cost = {}
        for c in costs.values():
            value = {"params": c.params, "macs": c.macs}.get(target)
            if value is None:
                value = latency_table.channel_cost(c)
            unit_cost.update(dict.fromkeys(c.out_layers, value))
    options = (global_pruning, round_to, max_layer_ratio, normalizer, group_reduction, extra, unit_cost)

    # trial selections are counted on meta copies where real copies cost more than meta's per-op overhead (big
    # weights to clone, heavy forwards to count), until one fails there; then on real copies
    shapes_only = [params_before >= META_TRIAL_PARAMS or macs_before >= META_TRIAL_MACS]

    def trial(p: float, real: bool = False) -> tuple[nn.Module, float, list]:
        if not real and shapes_only[0]:
            try:
                return _trial(p, meta_copy(model), example_inputs.to("meta"))
            except Exception:  # a network that needs real values in its forward: count on a real copy
                shapes_only[0] = False
        return _trial(p, copy.deepcopy(model), example_inputs)

    def _trial(p: float, m: nn.Module, x: torch.Tensor) -> tuple[nn.Module, float, list]:
        mods = dict(m.named_modules())
        ign = [mods[n] for n, mod in modules.items() if mod in ignored]
        hist = _apply(m, relevance, p, x, ign, *options)
        if target == "params":
            reached = 1.0 - count_params(m) / params_before
        elif target == "latency":
            reached = 1.0 - latency_table.estimate_model(m) / latency_estimate_before
        else:
            try:
                reached = 1.0 - count_macs(m, x) / macs_before
            except (
                RuntimeError
            ) as e:  # a coupling torch-pruning's groups missed (ViT attention heads under macs)
                raise RuntimeError(
                    f"pruning {type(model).__name__} at channel ratio {p:.3f} gave a network that does not run "
                    f"({str(e).splitlines()[0]}): a channel coupling is not mapped (docs/networks.md)"
                ) from e
        return m, reached, hist

    def search(goal: float) -> float:
        return _search_channel_ratio(
            lambda p: trial(p)[1], goal, target, max_layer_ratio, tolerance, at_least=cost_aware
        )

    latency_trials: list[tuple[float, float]] = []
    if target == "channels":
        channel_ratio = float(ratio)
    else:
        try:
            channel_ratio = search(float(ratio))
        except ValueError as e:
            if target == "latency":
                raise ValueError(
                    f"speedup {speedup} is not reachable (estimated from the latency table): {e}"
                ) from None
            raise
    if target == "latency" and latency_feedback:

        def measured_speedup(p: float) -> float:
            before, after = measure_latency_pair(
                unpruned, trial(p, real=True)[0], example_inputs, device=latency_device, threads=threads
            )
            return before / after

        channel_ratio, latency_trials = _measured_corrections(
            measured_speedup, search, channel_ratio, float(speedup), latency_feedback
        )
    history = _apply(model, relevance, channel_ratio, example_inputs, ignored, *options)
    latency_after = estimated_speedup = None
    if target == "latency":
        estimated_speedup = latency_estimate_before / latency_table.estimate_model(model)
        latency_before, latency_after = measure_latency_pair(
            unpruned, copy.deepcopy(model), example_inputs, device=latency_device, threads=threads
        )
    channels_after = _layer_channels(model)
    emptied = [n for n, c in channels_after.items() if c == 0]
    if emptied:
        raise ValueError(f"pruning emptied layer(s) {emptied}: lower the ratio or max_layer_ratio")
    return PruneResult(
        ratio=float(ratio),
        target=target,
        params_before=params_before,
        params_after=count_params(model),
        macs_before=macs_before,
        macs_after=count_macs(model, example_inputs),
        channels={n: (channels_before[n], channels_after.get(n, 0)) for n in channels_before},
        channel_ratio=channel_ratio,
        history=history,
        cost_aware=bool(cost_aware),
        latency_before=latency_before,
        latency_after=latency_after,
        latency_estimated_speedup=estimated_speedup,
        latency_trials=latency_trials,
    )


def _measured_corrections(
    measured_speedup, search, channel_ratio: float, speedup: float, steps: int
) -> tuple[float, list[tuple[float, float]]]:
    """Correct a latency-table selection by timing it: ``(channel ratio kept, [(aim, measured)])``.

    ``measured_speedup(p)`` times the selection at channel ratio ``p``; ``search(fraction)`` finds the channel
    ratio removing ``fraction`` of the table's seconds. The aim starts at ``speedup`` and is scaled by
    ``speedup / measured`` after each timing more than ``LATENCY_FEEDBACK_TOLERANCE`` off; the selection measured
    closest to ``speedup`` (in log space) is returned.
    """
    aim, tried = speedup, []
    for i in range(steps + 1):
        measured = measured_speedup(channel_ratio)
        tried.append((abs(math.log(measured / speedup)), channel_ratio, (aim, measured)))
        if abs(measured / speedup - 1.0) <= LATENCY_FEEDBACK_TOLERANCE or i == steps:
            break
        aim *= speedup / measured
        if aim <= 1.0:
            break
        try:
            channel_ratio = search(1.0 - 1.0 / aim)
        except ValueError:  # the table cannot reach the corrected aim: keep the best measured so far
            break
    best = min(tried, key=lambda t: t[0])
    return best[1], [t[2] for t in tried]


def _search_channel_ratio(
    reached_at, ratio: float, target: str, max_layer_ratio: float, tolerance: float, at_least: bool = False
) -> float:
    """Find the torch-pruning channel ratio that removes ``ratio`` of ``target``.

    Regula falsi (Illinois variant) on ``-log(1 - removed)`` against ``-log(1 - channel ratio)``, which is
    close to linear (params and MACs fall about quadratically with the kept width), so a few trials reach
    ``tolerance / 4``; if the removed fraction jumps over the request, the smallest ratio above it is used.
    With ``at_least`` (a budget) only ratios removing at least ``ratio`` are returned.

    Raises:
        ValueError: even a channel ratio of 0.99 (every layer capped at ``max_layer_ratio``) removes less than
            ``ratio - tolerance``.
    """

    def u_of(p: float) -> float:
        return -math.log1p(-p)

    goal = u_of(ratio)
    # the global channel ratio is not the per-layer cap: at a global 0.9 the ranking may leave layers below their
    # cap (VNet-3D, SwinUNETR-3D with taylor), so the search goes on to 0.99; every layer still keeps its share
    u_max = u_of(max(max_layer_ratio, 0.99))
    lo_u, lo_f = 0.0, -goal
    hi_u: float | None = None
    hi_f = 0.0
    side = 0
    u = min(goal / 2.0, u_max)  # uniform width pruning removes about 1 - (1 - p)^2 of params / MACs
    for _ in range(16):
        p = -math.expm1(-u)
        reached = reached_at(p)
        if abs(reached - ratio) <= tolerance / 4 and (reached >= ratio or not at_least):
            return p
        f = u_of(min(reached, 1.0 - 1e-9)) - goal
        if f < 0:
            lo_u, lo_f = u, f
            if side == -1 and hi_u is not None:
                hi_f /= 2.0
            side = -1
        else:
            hi_u, hi_f = u, f
            if side == 1:
                lo_f /= 2.0
            side = 1
        if hi_u is None:
            if u >= u_max:
                if reached < ratio - (0.0 if at_least else tolerance):
                    raise ValueError(
                        f"ratio {ratio} of {target} cannot be reached: removing up to max_layer_ratio={max_layer_ratio} "
                        f"of every layer's channels removes only {reached:.3f} (ignored and output layers are kept); "
                        "lower the ratio"
                    )
                return p
            grow = goal / max(f + goal, 1e-6)  # secant through the origin
            u = min(u * min(max(grow, 1.05), 4.0), u_max)
            continue
        if hi_u - lo_u < 1e-3:
            break
        u = lo_u + (hi_u - lo_u) * (-lo_f) / (hi_f - lo_f)
    if hi_u is None:
        return -math.expm1(-lo_u)
    return -math.expm1(-hi_u)
