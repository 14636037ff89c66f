"""Trainer handler: prune the network by channel relevance at chosen epochs, keeping training running."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import
from torch.nn.parallel import DistributedDataParallel

from monai_iaprune.handlers.relevance_collector import RelevanceCollector
from monai_iaprune.pruning.batchnorm import recalibrate_batchnorm
from monai_iaprune.pruning.checkpoint import apply_pruned_structure, pruned_structure
from monai_iaprune.pruning.depth import DepthPruneResult, prune_depth
from monai_iaprune.pruning.latency_table import LatencyTable, measure_latency_table
from monai_iaprune.pruning.optimizer import parameter_snapshot, remap_optimizer
from monai_iaprune.pruning.prune import PruneResult, check_prune_kwargs, prune
from monai_iaprune.relevance.blocks import (
    BLOCK_METHODS,
    block_relevance,
    no_removable_message,
    removable_blocks,
)
from monai_iaprune.relevance.collect import ChannelRelevance, channel_relevance
from monai_iaprune.relevance.distributed import all_reduce_block_relevance, all_reduce_relevance
from monai_iaprune.relevance.registry import get_method
from monai_iaprune.utils.batch import split_batch
from monai_iaprune.utils.ddp import (
    all_reduce_batchnorm,
    broadcast_module,
    check_same_structure,
    rewrap_ddp,
    unwrap_network,
)
from monai_iaprune.utils.settings import as_bool, check_int, check_ratio

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:  # annotations only
    from ignite.engine import Engine

    from monai_iaprune.relevance.collect import ChannelRelevance

__all__ = ["RelevancePruningHandler"]

_RESERVED_PRUNE_KWARGS = (
    "ratio",
    "ignored_layers",
    "relevance",
    "model",
    "example_inputs",
    "speedup",
    "cost_aware",
    "latency_table",
)
PRUNE_TARGETS = ("params", "macs", "latency")


class RelevancePruningHandler:
    """
    RelevancePruningHandler acts as an Ignite handler that physically prunes the trainer's network by
    per-channel relevance at the end of chosen epochs, then lets training continue on the smaller network.

    Each stage: score channels (``channel_relevance`` on ``data``, or the evaluator-side ``collector``),
    remove the least relevant ones (``monai_iaprune.prune``), re-estimate BatchNorm statistics, remap the
    trainer's optimizer in place (new parameters, sliced Adam / SGD state), optionally re-evaluate, and log
    ``params``, ``macs``, ``params_removed`` and ``macs_removed`` into ``engine.state.metrics``. The budget is
    ``ratio`` of the original ``prune_target`` (parameters or MACs), or a ``speedup`` for ``"latency"``. A stage
    runs ``steps`` sub-steps (relevance re-scored on the current network, pruned, BatchNorm re-estimated; no
    training in between); each sub-step removes ``1 - (1 - ratio) ** (1 / (stages * steps))`` of the *current*
    ``prune_target`` (speed-up ``speedup ** (1 / (stages * steps))``), so after all stages ``ratio`` of the
    original is gone (``speedup`` reached, as estimated from the latency table). With ``depth_ratio > 0`` a
    stage first removes whole blocks (``block_relevance`` -> ``prune_depth``), then prunes channels.

    Args:
        method: relevance method, one of ``monai_iaprune.relevance.METHODS``: ``"lrp"``, ``"ig"``, ``"dlb"``,
            ``"taylor"``, ``"magnitude"``, ``"random"``. Ignored when ``collector`` is given (its method is used).
        ratio: fraction of the original ``prune_target`` (parameters or MACs) to remove by channel pruning over all
            stages, strictly between 0 and 1; ignored for ``prune_target="latency"``.
        stages: number of pruning stages.
        prune_target: what the budget counts: ``"params"`` (default), ``"macs"`` or ``"latency"`` (then
            ``speedup``). Not to be confused with ``target``, what relevance explains.
        speedup: ``prune_target="latency"`` only: the requested speed-up over all stages, > 1, estimated from a
            per-layer latency table measured once on the example input on the network's device (and cached).
        cost_aware: rank channels by relevance per unit of the budget's cost (``monai_iaprune.prune``); None
            (default): the library default (on for ``"macs"`` / ``"latency"``, off for ``"params"``).
        steps: sub-steps per stage, >= 1: relevance recomputed on the current pruned network and BatchNorm
            re-estimated between them, without training; 1 (default) is one prune per stage.
        latency_cache_dir: where the latency table is cached (``latency_table.json``); None: the library default
            (``$MONAI_IAPRUNE_CACHE`` or ``~/.cache/monai_iaprune``).
        depth_ratio: fraction of the original ``prune_target`` to remove by removing whole blocks over all
            stages (``prune_depth``; MACs for ``"latency"``), in ``[0, 1)``; 0 (default): no depth pruning. Stage
            ``k`` removes ``1 - (1 - depth_ratio) ** (1 / stages)`` of the current network in blocks before its
            channel step, whose ``ratio`` share then applies to what is left.
        depth_method: block relevance method (``relevance.blocks.BLOCK_METHODS``); None: ``method``.
        min_blocks_per_stage: blocks every stage of the network keeps (``prune_depth``).
        prune_epochs: epochs (iterations if ``epoch_level=False``) at whose end a stage runs; default
            ``[1, ..., stages]``; must hold ``stages`` increasing integers >= 0, where 0 means when the trainer
            starts (a trained network is pruned before any fine-tuning epoch).
        data: iterable of batches for relevance and BatchNorm re-calibration; default the trainer's
            ``data_loader`` (limited by ``max_batches``).
        collector: a ``RelevanceCollector`` attached to an evaluator; its relevance is used, and its evaluator is
            run first when it has not collected on the network as it is now.
        target: what is explained: ``"label"``, ``"pred"``, a class index or a callable (see ``targets``).
        ignored_layers: names of modules never pruned (the output layers are always kept).
        prune_kwargs: more ``monai_iaprune.prune`` arguments (``global_pruning``, ``round_to``,
            ``max_layer_ratio``, ``normalizer``, ``tolerance``, ...); a ``target`` here is taken as ``prune_target``
            (``"channels"`` too) when ``prune_target`` is left at ``"params"``.
        relevance_kwargs: passed to the relevance method (e.g. ``composite`` for LRP, ``n_steps`` for IG).
        recalibrate_bn: re-estimate BatchNorm running statistics on ``data`` after each stage.
        fresh_optimizer: after each stage give the trainer a new optimizer of its optimizer's class and settings
            on the pruned parameters instead of remapping the old one's state (LR schedulers keep the old one).
        finetune_lr: after each stage set this learning rate on every parameter group; None keeps it.
        evaluator: an evaluator to run right after each stage; its key metric is recorded as ``metric_pruned``.
        key_metric: name of that metric in ``evaluator.state.metrics``; default the evaluator's key metric.
        image_key, label_key: keys of dict batches.
        max_batches: at most this many batches of ``data`` for relevance and BatchNorm re-calibration (with a
            ``collector``, for re-calibration only: the collector explains the evaluator's batches).
        epoch_level: prune at ``EPOCH_COMPLETED`` (True, default) or ``ITERATION_COMPLETED``.

    Each ``history`` record holds the stage's ``prune_target``, the ``budget`` requested (stage fraction or
    speed-up), params / MACs before and after, the removed fractions of the original (``params_removed``,
    ``macs_removed``), the latency measured before and after when ``prune_target="latency"``, one entry per
    sub-step in ``steps_detail``, and for depth pruning the removed blocks (``depth``, ``removed_blocks``).
    The channel indices each width sub-step removed (``PruneResult.history``, in order) are kept apart in
    ``channel_histories`` (also ``engine.state.pruning_channel_histories`` and the ``state_dict``): with them
    ``pruning.feature_distillation.kept_channels`` maps every kept channel to the unpruned network's.

    Note:
        The evaluator is expected to share the trainer's network object (as MONAI bundles do); it is pruned in
        place. A ``CheckpointSaver`` keeps working; add this handler to its ``save_dict`` (e.g.
        ``{"network": net, "optimizer": opt, "pruning": handler}``) so the checkpoint records the pruned
        structure, which ``monai_iaprune.pruning.checkpoint.load_pruned`` (and a ``CheckpointLoader`` that
        loads ``"pruning"`` before ``"network"``) needs. A "best metric" checkpoint from before a stage holds
        the unpruned architecture.

        Under ``torch.distributed`` (one process per rank, the trainer's network wrapped in
        ``DistributedDataParallel``, ``data`` / the evaluator's loader sharded by a ``DistributedSampler``) every
        rank scores its shard and the relevance is all-reduced (weighted by samples; the collector all-reduces
        its sums and counts), so all ranks prune the same channels. After pruning the ranks' architectures are
        compared (an error names the differing layers), BatchNorm statistics re-estimated per rank are averaged
        over ranks, parameters and buffers are broadcast from rank 0, and a new ``DistributedDataParallel`` with
        the old wrapper's settings replaces ``engine.network`` (and the evaluators' network where they shared
        the old wrapper). Every rank must attach this handler and run the same stages; the evaluator runs on
        every rank (its metrics are synchronised by ignite). ``data`` needs at least one batch on every rank.
        Objects that still hold the old wrapper (e.g. a config item) must not be used for training any more.
        ``last_relevance`` keeps the (all-reduced) relevance of the latest stage.
    """

    def __init__(
        self,
        method: str = "lrp",
        ratio: float = 0.5,
        stages: int = 1,
        prune_epochs: Sequence[int] | None = None,
        data: Iterable | None = None,
        collector: RelevanceCollector | None = None,
        target: Any = "label",
        ignored_layers: Sequence[str] | None = None,
        prune_kwargs: dict | None = None,
        relevance_kwargs: dict | None = None,
        recalibrate_bn: bool = True,
        fresh_optimizer: bool = False,
        finetune_lr: float | None = None,
        evaluator: Any = None,
        key_metric: str | None = None,
        image_key: str = "image",
        label_key: str = "label",
        max_batches: int | None = None,
        epoch_level: bool = True,
        name: str | None = None,
        prune_target: str = "params",
        speedup: float | None = None,
        cost_aware: bool | None = None,
        steps: int = 1,
        latency_cache_dir: str | None = None,
        depth_ratio: float = 0.0,
        depth_method: str | None = None,
        min_blocks_per_stage: int = 1,
    ) -> None:
        if collector is not None and not isinstance(collector, RelevanceCollector):
            raise TypeError(f"collector must be a RelevanceCollector, got {type(collector).__name__}")
        if collector is None:
            get_method(method)  # raises for an unknown name, listing the registered ones
        check_ratio(ratio)
        check_int(stages, "stages")
        check_int(steps, "steps")
        check_int(min_blocks_per_stage, "min_blocks_per_stage", 0)
        prune_kwargs = dict(prune_kwargs or {})
        # before prune_target existed: prune_kwargs={"target": ...}
        legacy_target = prune_kwargs.pop("target", None)
        if legacy_target is not None and prune_target == "params":
            prune_target = legacy_target
            if prune_target not in (*PRUNE_TARGETS, "channels"):
                raise ValueError(
                    f"bad prune_kwargs target {prune_target!r}: use prune_target, one of {PRUNE_TARGETS}"
                )
        elif legacy_target is not None and legacy_target != prune_target:
            raise ValueError(
                f"prune_kwargs target={legacy_target!r} disagrees with prune_target={prune_target!r}; set prune_target only"
            )
        elif prune_target not in PRUNE_TARGETS:
            raise ValueError(
                f"bad prune_target {prune_target!r}: use one of {PRUNE_TARGETS} (what the pruning budget counts)"
            )
        if prune_target == "latency":
            if isinstance(speedup, bool) or not isinstance(speedup, (int, float)) or not float(speedup) > 1.0:
                raise ValueError(
                    f"bad speedup {speedup!r}: prune_target='latency' needs a requested speed-up > 1"
                )
            speedup = float(speedup)
        elif speedup is not None:
            raise ValueError(
                f"speedup={speedup!r} applies to prune_target='latency' only (prune_target={prune_target!r})"
            )
        if isinstance(cost_aware, str) and cost_aware.strip().lower() in ("none", "null", ""):
            cost_aware = None
        if cost_aware is not None:
            cost_aware = as_bool(cost_aware, "cost_aware")
            if cost_aware and prune_target == "channels":
                raise ValueError("cost_aware needs a params, macs or latency budget, not target='channels'")
        if (
            isinstance(depth_ratio, bool)
            or not isinstance(depth_ratio, (int, float))
            or not 0.0 <= depth_ratio < 1.0
        ):
            raise ValueError(
                f"bad depth_ratio {depth_ratio!r}: the fraction removed as whole blocks must lie in [0, 1)"
            )
        method = collector.method if collector is not None else method
        block_method = method if depth_method is None else depth_method
        if (depth_method is not None or depth_ratio > 0) and block_method not in BLOCK_METHODS:
            raise ValueError(
                f"bad depth_method {block_method!r}"
                + (" (from method)" if depth_method is None else "")
                + f": block relevance methods are {sorted(BLOCK_METHODS)}; set depth_method"
            )
        if latency_cache_dir is not None and not isinstance(latency_cache_dir, (str, os.PathLike)):
            raise ValueError(f"bad latency_cache_dir {latency_cache_dir!r}: need a folder path or null")
        if prune_epochs is None:
            prune_epochs = list(range(1, stages + 1))
        prune_epochs = [int(e) for e in prune_epochs]
        if len(prune_epochs) != stages:
            raise ValueError(
                f"prune_epochs {prune_epochs} lists {len(prune_epochs)} epoch(s) but stages={stages}; make them agree"
            )
        if any(e < 0 for e in prune_epochs) or any(b <= a for a, b in zip(prune_epochs, prune_epochs[1:])):
            raise ValueError(f"prune_epochs {prune_epochs} must be strictly increasing integers >= 0")
        clash = [k for k in _RESERVED_PRUNE_KWARGS if k in prune_kwargs]
        if clash:
            raise ValueError(
                f"prune_kwargs may not set {clash}: they are this handler's own arguments or computed per stage"
                " (use prune_target, speedup, cost_aware)"
            )
        try:
            check_prune_kwargs(prune_kwargs, reserved=(*_RESERVED_PRUNE_KWARGS, "target"))
        except ValueError as e:
            raise ValueError(f"bad prune_kwargs: {e}") from e
        if collector is None:
            get_method(method).check_settings(relevance_kwargs or {})
        if key_metric is not None and evaluator is None:
            raise ValueError(f"key_metric={key_metric!r} needs an evaluator to compute it")
        check_int(max_batches, "max_batches", allow_none=True)
        if finetune_lr is not None and (isinstance(finetune_lr, bool) or not float(finetune_lr) > 0):
            raise ValueError(f"bad finetune_lr {finetune_lr!r}: need a positive learning rate or null")
        self.method = method
        self.ratio = float(ratio)
        self.stages = stages
        self.prune_epochs = prune_epochs
        self.stage_ratio = 1.0 - (1.0 - self.ratio) ** (1.0 / stages)
        self.step_ratio = 1.0 - (1.0 - self.ratio) ** (1.0 / (stages * steps))
        self.prune_target = prune_target
        self.speedup = speedup
        self.stage_speedup = speedup ** (1.0 / stages) if speedup is not None else None
        self.step_speedup = speedup ** (1.0 / (stages * steps)) if speedup is not None else None
        self.cost_aware = cost_aware
        self.steps = steps
        self.latency_cache_dir = None if latency_cache_dir is None else str(latency_cache_dir)
        self.depth_ratio = float(depth_ratio)
        self.depth_stage_ratio = 1.0 - (1.0 - self.depth_ratio) ** (1.0 / stages)
        self.depth_method = block_method
        self.min_blocks_per_stage = min_blocks_per_stage
        self.latency_table: LatencyTable | None = None
        self.macs_original: float | None = None
        self.data = data
        self.collector = collector
        self.target = target
        self.ignored_layers = list(ignored_layers or [])
        self.prune_kwargs = prune_kwargs
        self.relevance_kwargs = dict(relevance_kwargs or {})
        self.recalibrate_bn = as_bool(recalibrate_bn, "recalibrate_bn")
        self.fresh_optimizer = as_bool(fresh_optimizer, "fresh_optimizer")
        self.finetune_lr = None if finetune_lr is None else float(finetune_lr)
        self.evaluator = evaluator
        self.key_metric = key_metric
        self.image_key = image_key
        self.label_key = label_key
        self.max_batches = max_batches
        self.epoch_level = epoch_level
        self.logger = logging.getLogger(name)
        self._name = name
        self.engine: Engine | None = None
        self.history: list[dict[str, Any]] = []
        self.channel_histories: list[list[tuple[str, str, list[int]]]] = []
        self.params_original: int | None = None
        self.last_relevance: ChannelRelevance | None = None

    def attach(self, engine: Engine) -> None:
        """Attach to a MONAI ``SupervisedTrainer`` (or anything with network, optimizer and data_loader)."""
        if self._name is None:
            self.logger = engine.logger
        event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
        if engine.has_event_handler(self, event):
            return
        if 0 in self.prune_epochs and self.epoch_level:
            engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(event, self)
        if getattr(engine, "network", None) is not None:
            self.check_network(engine.network)
        self.engine = engine
        max_epochs = getattr(engine.state, "max_epochs", None)
        if self.epoch_level and max_epochs is not None and max(self.prune_epochs) > max_epochs:
            self.logger.warning(
                f"prune_epochs {self.prune_epochs} go beyond max_epochs={max_epochs}: later stages will not run "
                f"and less than ratio={self.ratio} of the parameters will be removed"
            )

    def check_network(self, network: torch.nn.Module) -> RelevancePruningHandler:
        """Raise before any training when ``depth_ratio > 0`` and ``network`` has no removable block (the library's
        ``no_removable_message``); returns the handler, so a config can call it as an expression."""
        if self.depth_ratio > 0:
            net = unwrap_network(network)
            if not removable_blocks(net):
                raise ValueError(f"depth_ratio={self.depth_ratio}: {no_removable_message(net)}")
        return self

    def _data(self, engine: Engine) -> Iterable:
        data = self.data if self.data is not None else getattr(engine, "data_loader", None)
        if data is None:
            raise ValueError(
                "no data for relevance / BatchNorm re-calibration: pass data= or use a trainer with a data_loader"
            )
        return data

    def _relevance(self, engine: Engine, network: torch.nn.Module) -> ChannelRelevance:
        if self.collector is not None:
            if not self.collector.is_current(network):
                if self.collector.engine is None:
                    raise RuntimeError(
                        "the RelevanceCollector is not attached to an evaluator: call collector.attach(evaluator)"
                    )
                self.logger.info("running the evaluator to collect relevance on the current network")
                self.collector.engine.run(max(engine.state.epoch, 1))
            return self.collector.relevance  # already all-reduced over ranks when the evaluator completed
        relevance = channel_relevance(
            network,
            self._data(engine),
            self.method,
            target=self.target,
            image_key=self.image_key,
            label_key=self.label_key,
            max_batches=self.max_batches,
            progress=False,
            **self.relevance_kwargs,
        )
        return all_reduce_relevance(relevance)  # identity outside torch.distributed

    def example_input(self, engine: Engine, relevance: ChannelRelevance | None = None) -> torch.Tensor:
        """One input sample to trace the network: ``relevance``'s (or the collector's) example, else ``data``'s."""
        if relevance is not None and relevance.example_input is not None:
            return relevance.example_input
        if self.collector is not None and self.collector.example_input is not None:
            return self.collector.example_input
        for batch in self._data(engine):
            return torch.as_tensor(split_batch(batch, self.image_key, self.label_key)[0][:1]).float()
        raise ValueError("no example input to trace the network: the data yielded no batch")

    def __call__(self, engine: Engine) -> None:
        """Run a stage when the trainer's epoch (or iteration) is in ``prune_epochs``."""
        step = engine.state.epoch if self.epoch_level else engine.state.iteration
        if step not in self.prune_epochs or any(h["epoch"] == step for h in self.history):
            return
        network = unwrap_network(engine.network)
        # DDP syncs buffers (BatchNorm statistics) only at the next forward: make rank 0's hold everywhere now
        broadcast_module(network, src=0)
        device = next(network.parameters()).device
        stage = self.prune_epochs.index(step) + 1
        if self.params_original is None:
            self.params_original = sum(p.numel() for p in network.parameters())

        relevance_time = prune_time = 0.0
        depth = None
        if self.depth_ratio > 0:
            t0 = time.perf_counter()
            depth = self._depth_step(engine, network, device)
            prune_time += time.perf_counter() - t0
        results: list[PruneResult] = []
        for _ in range(self.steps):
            t0 = time.perf_counter()
            relevance = self._relevance(engine, network)
            relevance_time += time.perf_counter() - t0
            self.last_relevance = relevance
            t0 = time.perf_counter()
            results.append(self._width_step(engine, network, relevance, device))
            prune_time += time.perf_counter() - t0
            self.channel_histories.append([(n, k, list(i)) for n, k, i in results[-1].history])
        result = results[-1]

        metric = None
        if self.evaluator is not None:
            self.evaluator.run(max(engine.state.epoch, 1))  # epoch 0: a stage when the trainer starts
            name = self.key_metric or getattr(self.evaluator.state, "key_metric_name", None)
            if name is None or name not in self.evaluator.state.metrics:
                raise KeyError(
                    f"evaluator has no metric {name!r} (has {sorted(self.evaluator.state.metrics)}); set key_metric"
                )
            metric = float(self.evaluator.state.metrics[name])

        record = self._record(stage, step, depth, results, relevance_time, prune_time, metric)
        self.history.append(record)
        engine.state.metrics["params"] = result.params_after
        engine.state.metrics["macs"] = result.macs_after
        engine.state.metrics["params_removed"] = record["params_removed"]
        engine.state.metrics["macs_removed"] = record["macs_removed"]
        engine.state.pruning = self.history
        engine.state.pruning_channel_histories = self.channel_histories
        self.logger.info(
            f"pruning stage {stage}/{self.stages} at {'epoch' if self.epoch_level else 'iteration'} {step} "
            f"({relevance.method}, {self.prune_target} budget, {self.steps} step(s)"
            + (f", {len(depth.removed)} block(s) removed" if depth is not None else "")
            + f"): params {record['params_before']} -> {result.params_after}, "
            f"MACs {record['macs_before']:.4g} -> {result.macs_after:.4g}, {record['params_removed']:.1%} of the "
            f"original parameters and {record['macs_removed']:.1%} of the MACs removed"
            + (f", speed-up {record['speedup']:.3g} measured" if record.get("speedup") else "")
            + f"; relevance {relevance_time:.1f}s, pruning {prune_time:.1f}s"
            + (f", {name} after pruning {metric:.4f}" if metric is not None else "")
        )

    def _after_prune(self, engine: Engine, network: torch.nn.Module, snapshot: Any, history: Any) -> None:
        """After any physical change: same structure on all ranks, BatchNorm re-estimated, optimizer remapped,
        DDP re-wrapped."""
        check_same_structure(network)  # no-op outside torch.distributed
        if self.recalibrate_bn:
            recalibrate_batchnorm(
                network,
                self._data(engine),
                max_batches=self.max_batches,
                image_key=self.image_key,
                label_key=self.label_key,
            )
            all_reduce_batchnorm(network)
        broadcast_module(network, src=0)  # removes any floating-point drift between ranks
        self._update_optimizer(engine, snapshot, network, history)
        wrapper = engine.network
        if isinstance(wrapper, DistributedDataParallel):
            self._rewrap(engine, wrapper, network)

    def _width_step(
        self, engine: Engine, network: torch.nn.Module, relevance: ChannelRelevance, device: torch.device
    ) -> PruneResult:
        """One channel-pruning sub-step at the sub-step budget, then ``_after_prune``."""
        example = self.example_input(engine, relevance).to(device)
        kwargs = dict(self.prune_kwargs)
        if self.prune_target != "params":
            kwargs["target"] = self.prune_target
        if self.cost_aware is not None:
            kwargs["cost_aware"] = self.cost_aware
        if self.prune_target == "latency":
            kwargs.update(speedup=self.step_speedup, latency_table=self._latency_table(network, example))
        snapshot = parameter_snapshot(network)
        result = prune(
            network,
            relevance,
            self.step_ratio,
            example_inputs=example,
            ignored_layers=self.ignored_layers,
            **kwargs,
        )
        self._after_prune(engine, network, snapshot, result.history)
        return result

    def _latency_table(self, network: torch.nn.Module, example: torch.Tensor) -> LatencyTable:
        """The latency table, measured once (on the network as it is at the first latency stage) and cached."""
        if self.latency_table is None:
            self.latency_table = measure_latency_table(
                network, example, device=example.device, cache_dir=self.latency_cache_dir, progress=False
            )
        return self.latency_table

    def _depth_step(self, engine: Engine, network: torch.nn.Module, device: torch.device) -> DepthPruneResult:
        """Remove this stage's share of ``depth_ratio`` in whole blocks (``block_relevance`` on the handler's data)."""
        example = self.example_input(engine).to(device)
        scores = block_relevance(
            network,
            self._data(engine),
            self.depth_method,
            target=self.target,
            image_key=self.image_key,
            label_key=self.label_key,
            max_batches=self.max_batches,
        )
        scores = all_reduce_block_relevance(scores)  # identity outside torch.distributed
        snapshot = parameter_snapshot(network)
        result = prune_depth(
            network,
            scores,
            self.depth_stage_ratio,
            target="params" if self.prune_target == "params" else "macs",
            example_inputs=example,
            min_blocks_per_stage=self.min_blocks_per_stage,
        )
        self._after_prune(engine, network, snapshot, result.history)
        return result

    def _record(
        self,
        stage: int,
        step: int,
        depth: DepthPruneResult | None,
        results: list[PruneResult],
        relevance_time: float,
        prune_time: float,
        metric: float | None,
    ) -> dict[str, Any]:
        """The stage's ``history`` record (plain data)."""
        first, last = results[0], results[-1]
        params_before = depth.params_before if depth is not None else first.params_before
        macs_before = depth.macs_before if depth is not None else first.macs_before
        if self.macs_original is None:  # the first stage's count (an extra forward would move BN stats)
            self.macs_original = macs_before
        latency = self.prune_target == "latency"
        per_layer = [
            {"name": n, "channels_before": first.channels[n][0], "channels_after": c[1]}
            for n, c in last.channels.items()
            if n in first.channels
        ]
        record: dict[str, Any] = {
            "stage": stage,
            "epoch": step,
            "prune_target": self.prune_target,
            "budget": {"speedup": self.stage_speedup} if latency else {self.prune_target: self.stage_ratio},
            "ratio_target": self.stage_ratio,
            "steps": self.steps,
            "params_before": params_before,
            "params_after": last.params_after,
            "macs_before": macs_before,
            "macs_after": last.macs_after,
            "params_removed": 1.0 - last.params_after / self.params_original,
            "macs_removed": 1.0 - last.macs_after / max(self.macs_original, 1.0),
            "params_removed_stage": 1.0 - last.params_after / max(params_before, 1),
            "macs_removed_stage": 1.0 - last.macs_after / max(macs_before, 1.0),
            "steps_detail": [
                {
                    k: v
                    for k, v in r.as_dict().items()
                    if k != "per_layer" and (latency or not k.startswith(("latency", "speedup")))
                }
                for r in results
            ],
            "per_layer": per_layer,
            "relevance_time_s": relevance_time,
            "prune_time_s": prune_time,
            "metric_pruned": metric,
            "method": self.last_relevance.method if self.last_relevance is not None else self.method,
        }
        if latency:
            estimated = 1.0
            for r in results:
                estimated *= r.latency_estimated_speedup or 1.0
            record.update(
                latency_ms_before=first.latency_before * 1000.0 if first.latency_before is not None else None,
                latency_ms_after=last.latency_after * 1000.0 if last.latency_after is not None else None,
                latency_estimated_speedup=estimated,
            )
            if first.latency_before and last.latency_after:
                record["speedup"] = first.latency_before / last.latency_after
        if depth is not None:
            d = depth.as_dict()
            d.pop("relevance", None)
            record["depth"] = {**d, "ratio": self.depth_stage_ratio}
            record["removed_blocks"] = [
                {"name": n, "relevance": depth.relevance.get(n)} for n in depth.removed
            ]
        return record

    def _update_optimizer(
        self, engine: Engine, snapshot: Any, network: torch.nn.Module, history: Any
    ) -> None:
        """Point the trainer's optimizer at the pruned parameters (remapped state, or a fresh one) at ``finetune_lr``."""
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is None:
            return
        if self.fresh_optimizer:
            optimizer = type(optimizer)(
                [p for p in network.parameters() if p.requires_grad], **optimizer.defaults
            )
            engine.optimizer = optimizer
        else:
            remap_optimizer(optimizer, snapshot, network, history)
        if self.finetune_lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = self.finetune_lr

    def _rewrap(self, engine: Engine, old: DistributedDataParallel, network: torch.nn.Module) -> None:
        """Build a new DDP wrapper around the pruned ``network`` and hand it to every engine that held ``old``."""
        new = rewrap_ddp(old, network)
        engines = [engine, self.evaluator, self.collector.engine if self.collector is not None else None]
        for e in engines:
            if e is not None and getattr(e, "network", None) is old:
                e.network = new

    def state_dict(self) -> dict[str, Any]:
        """What a ``CheckpointSaver`` stores: the stages done and the network's pruned structure."""
        network = unwrap_network(self.engine.network) if self.engine is not None else None
        return {
            "history": list(self.history),
            "channel_histories": [list(h) for h in self.channel_histories],
            "params_original": self.params_original,
            "macs_original": self.macs_original,
            "pruned_structure": pruned_structure(network) if network is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the stages done and, when attached, reshape the network to the saved pruned structure.

        Parameters keep their identity, so load this before the network and optimizer state dicts
        (e.g. ``CheckpointLoader(load_dict={"pruning": handler, "network": net, "optimizer": opt})``).
        """
        self.history = list(state_dict.get("history", []))
        self.channel_histories = [
            [(str(n), str(k), [int(i) for i in idx]) for n, k, idx in h]
            for h in state_dict.get("channel_histories", [])
        ]
        self.params_original = state_dict.get("params_original")
        self.macs_original = state_dict.get("macs_original")
        structure = state_dict.get("pruned_structure")
        if structure is not None and self.engine is not None:
            apply_pruned_structure(unwrap_network(self.engine.network), structure)
            self.engine.state.pruning = self.history
            self.engine.state.pruning_channel_histories = self.channel_histories
