"""Trainer handler: prune the network by channel relevance at chosen epochs, keeping training running."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import
from torch.nn.parallel import DistributedDataParallel

from monai_iaprune.handlers.relevance_collector import RelevanceCollector
from monai_iaprune.pruning.batchnorm import recalibrate_batchnorm
from monai_iaprune.pruning.checkpoint import apply_pruned_structure, pruned_structure
from monai_iaprune.pruning.optimizer import parameter_snapshot, remap_optimizer
from monai_iaprune.pruning.prune import prune
from monai_iaprune.relevance.collect import ChannelRelevance, channel_relevance
from monai_iaprune.relevance.distributed import all_reduce_relevance
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

_RESERVED_PRUNE_KWARGS = ("ratio", "ignored_layers", "relevance", "model", "example_inputs")


class RelevancePruningHandler:
    """
    RelevancePruningHandler acts as an Ignite handler that physically prunes the trainer's network by
    per-channel relevance at the end of chosen epochs, then lets training continue on the smaller network.

    Each stage: score channels (``channel_relevance`` on ``data``, or the evaluator-side ``collector``),
    remove the least relevant ones (``monai_iaprune.prune``), re-estimate BatchNorm statistics, remap the
    trainer's optimizer in place (new parameters, sliced Adam / SGD state), optionally re-evaluate, and log
    ``params``, ``macs`` and ``params_removed`` into ``engine.state.metrics``. Stage ``k`` of ``stages`` removes
    the fraction ``1 - (1 - ratio) ** (1 / stages)`` of the *current* parameters, so after all stages the
    fraction ``ratio`` of the original parameters is gone.

    Args:
        method: relevance method, one of ``monai_iaprune.relevance.METHODS``: ``"lrp"``, ``"ig"``, ``"dlb"``,
            ``"taylor"``, ``"magnitude"``, ``"random"``. Ignored when ``collector`` is given (its method is used).
        ratio: fraction of the original parameters to remove over all stages, strictly between 0 and 1.
        stages: number of pruning stages.
        prune_epochs: epochs (iterations if ``epoch_level=False``) at whose end a stage runs; default
            ``[1, ..., stages]``; must hold ``stages`` increasing integers >= 0, where 0 means when the trainer
            starts (a trained network is pruned before any fine-tuning epoch).
        data: iterable of batches for relevance and BatchNorm re-calibration; default the trainer's
            ``data_loader`` (limited by ``max_batches``).
        collector: a ``RelevanceCollector`` attached to an evaluator; its relevance is used, and its evaluator is
            run first when it has not collected on the network as it is now.
        target: what is explained: ``"label"``, ``"pred"``, a class index or a callable (see ``targets``).
        ignored_layers: names of modules never pruned (the output layers are always kept).
        prune_kwargs: more ``monai_iaprune.prune`` arguments (``target``, ``global_pruning``, ``round_to``,
            ``max_layer_ratio``, ``normalizer``, ...).
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
    ) -> None:
        if collector is None:
            get_method(method)  # raises for an unknown name, listing the registered ones
        check_ratio(ratio)
        check_int(stages, "stages")
        if prune_epochs is None:
            prune_epochs = list(range(1, stages + 1))
        prune_epochs = [int(e) for e in prune_epochs]
        if len(prune_epochs) != stages:
            raise ValueError(
                f"prune_epochs {prune_epochs} lists {len(prune_epochs)} epoch(s) but stages={stages}; make them agree"
            )
        if any(e < 0 for e in prune_epochs) or any(b <= a for a, b in zip(prune_epochs, prune_epochs[1:])):
            raise ValueError(f"prune_epochs {prune_epochs} must be strictly increasing integers >= 0")
        if collector is not None and not isinstance(collector, RelevanceCollector):
            raise TypeError(f"collector must be a RelevanceCollector, got {type(collector).__name__}")
        prune_kwargs = dict(prune_kwargs or {})
        clash = [k for k in _RESERVED_PRUNE_KWARGS if k in prune_kwargs]
        if clash:
            raise ValueError(
                f"prune_kwargs may not set {clash}: they are this handler's own arguments or computed per stage"
            )
        if key_metric is not None and evaluator is None:
            raise ValueError(f"key_metric={key_metric!r} needs an evaluator to compute it")
        check_int(max_batches, "max_batches", allow_none=True)
        if finetune_lr is not None and (isinstance(finetune_lr, bool) or not float(finetune_lr) > 0):
            raise ValueError(f"bad finetune_lr {finetune_lr!r}: need a positive learning rate or null")
        self.method = collector.method if collector is not None else method
        self.ratio = float(ratio)
        self.stages = stages
        self.prune_epochs = prune_epochs
        self.stage_ratio = 1.0 - (1.0 - self.ratio) ** (1.0 / stages)
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
        self.params_original: int | None = None
        self.last_relevance: ChannelRelevance | None = None

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: a MONAI ``SupervisedTrainer`` (anything with ``network``, ``optimizer`` and ``data_loader``).
        """
        if self._name is None:
            self.logger = engine.logger
        event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
        if engine.has_event_handler(self, event):
            return
        if 0 in self.prune_epochs and self.epoch_level:
            engine.add_event_handler(Events.STARTED, self)
        engine.add_event_handler(event, self)
        self.engine = engine
        max_epochs = getattr(engine.state, "max_epochs", None)
        if self.epoch_level and max_epochs is not None and max(self.prune_epochs) > max_epochs:
            self.logger.warning(
                f"prune_epochs {self.prune_epochs} go beyond max_epochs={max_epochs}: later stages will not run "
                f"and less than ratio={self.ratio} of the parameters will be removed"
            )

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
        """
        Args:
            engine: the trainer; a stage runs when its epoch (or iteration) is in ``prune_epochs``.
        """
        step = engine.state.epoch if self.epoch_level else engine.state.iteration
        if step not in self.prune_epochs or any(h["epoch"] == step for h in self.history):
            return
        wrapper = engine.network
        network = unwrap_network(wrapper)
        # DDP syncs buffers (BatchNorm statistics) only at the next forward: make rank 0's hold everywhere now
        broadcast_module(network, src=0)
        device = next(network.parameters()).device
        stage = self.prune_epochs.index(step) + 1
        if self.params_original is None:
            self.params_original = sum(p.numel() for p in network.parameters())

        t0 = time.perf_counter()
        relevance = self._relevance(engine, network)
        relevance_time = time.perf_counter() - t0
        self.last_relevance = relevance
        example = self.example_input(engine, relevance).to(device)

        t0 = time.perf_counter()
        snapshot = parameter_snapshot(network)
        result = prune(
            network,
            relevance,
            self.stage_ratio,
            example_inputs=example,
            ignored_layers=self.ignored_layers,
            **self.prune_kwargs,
        )
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
        self._update_optimizer(engine, snapshot, network, result.history)
        if isinstance(wrapper, DistributedDataParallel):
            self._rewrap(engine, wrapper, network)
        prune_time = time.perf_counter() - t0

        metric = None
        if self.evaluator is not None:
            self.evaluator.run(max(engine.state.epoch, 1))  # epoch 0: a stage when the trainer starts
            name = self.key_metric or getattr(self.evaluator.state, "key_metric_name", None)
            if name is None or name not in self.evaluator.state.metrics:
                raise KeyError(
                    f"evaluator has no metric {name!r} (has {sorted(self.evaluator.state.metrics)}); set key_metric"
                )
            metric = float(self.evaluator.state.metrics[name])

        params_removed = 1.0 - result.params_after / self.params_original
        record = {
            "stage": stage,
            "epoch": step,
            "ratio_target": self.stage_ratio,
            "params_before": result.params_before,
            "params_after": result.params_after,
            "macs_before": result.macs_before,
            "macs_after": result.macs_after,
            "params_removed": params_removed,
            "per_layer": result.as_dict()["per_layer"],
            "relevance_time_s": relevance_time,
            "prune_time_s": prune_time,
            "metric_pruned": metric,
            "method": relevance.method,
        }
        self.history.append(record)
        engine.state.metrics["params"] = result.params_after
        engine.state.metrics["macs"] = result.macs_after
        engine.state.metrics["params_removed"] = params_removed
        engine.state.pruning = self.history
        self.logger.info(
            f"pruning stage {stage}/{self.stages} at {'epoch' if self.epoch_level else 'iteration'} {step} "
            f"({relevance.method}): params {result.params_before} -> {result.params_after}, "
            f"MACs {result.macs_before:.4g} -> {result.macs_after:.4g}, {params_removed:.1%} of the original "
            f"parameters removed; relevance {relevance_time:.1f}s, pruning {prune_time:.1f}s"
            + (f", {name} after pruning {metric:.4f}" if metric is not None else "")
        )

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
            "params_original": self.params_original,
            "pruned_structure": pruned_structure(network) if network is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the stages done and, when attached, reshape the network to the saved pruned structure.

        Parameters keep their identity, so load this before the network and optimizer state dicts
        (e.g. ``CheckpointLoader(load_dict={"pruning": handler, "network": net, "optimizer": opt})``).
        """
        self.history = list(state_dict.get("history", []))
        self.params_original = state_dict.get("params_original")
        structure = state_dict.get("pruned_structure")
        if structure is not None and self.engine is not None:
            apply_pruned_structure(unwrap_network(self.engine.network), structure)
            self.engine.state.pruning = self.history
