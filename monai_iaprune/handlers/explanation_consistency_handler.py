"""Trainer handler: add an explanation-consistency term (pruned student vs unpruned teacher) to the training loss."""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from monai_iaprune.pruning.explanation_consistency import ExplanationConsistencyLoss
from monai_iaprune.pruning.feature_distillation import FeatureDistillationLoss, kept_channels

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import(
        "ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine", as_type="decorator"
    )

__all__ = ["ExplanationConsistencyHandler"]


class ExplanationConsistencyHandler:
    """
    ExplanationConsistencyHandler acts as an Ignite handler that adds ``weight * consistency`` to a MONAI
    ``SupervisedTrainer``'s loss, where ``consistency`` (``pruning.explanation_consistency``) is the distance
    between the trained network's input attribution maps and those of a frozen copy of the unpruned network.

    It runs at ``IterationEvents.LOSS_COMPLETED``, which the trainer fires after computing
    ``engine.state.output[Keys.LOSS]`` and before ``backward()``; it reads ``Keys.IMAGE`` / ``Keys.LABEL`` from
    ``engine.state.output``, replaces ``Keys.LOSS`` by the sum, and stores the unweighted term as
    ``engine.state.output["explanation_consistency"]`` (per iteration) and its running mean over the epoch as
    ``engine.state.metrics["explanation_consistency"]``.

    With a ``RelevancePruningHandler`` in the same trainer the teacher must be the *unpruned* network: by default
    it is a deep copy of ``engine.network`` taken at the start of epoch ``teacher_epoch`` (default 1, before the
    first training step; ``EPOCH_STARTED`` of an epoch comes after every ``EPOCH_COMPLETED`` handler of the
    previous one), so ``teacher_epoch`` must not be later than the first pruning epoch. The term is added from
    epoch ``start_epoch`` on (default ``teacher_epoch``); set it to the epoch after the first pruning stage to
    spend no time while student and teacher are still the same network.

    With ``feature_weight > 0`` it also adds ``feature_weight * FeatureDistillationLoss`` (kept-channel feature
    distillation, ``pruning.feature_distillation``): every kept channel's output on the training forward is pulled
    to the teacher's output of the same channel. The channel map comes from the pruning handler's
    ``engine.state.pruning_channel_histories`` (refreshed after each stage; identity before the first); the
    unweighted term is stored as ``engine.state.output["feature_distillation"]`` and its epoch mean in
    ``engine.state.metrics["feature_distillation"]``. In ``benchmarks/explanations.py`` it (with logit
    distillation) kept LRP agreement better than the map term on 5 of 6 settings. ``weight`` may then be 0 (no map term).

    Args:
        weight: weight of the map term in the loss (> 0; or 0 when ``feature_weight`` > 0).
        explainer: differentiable explainer the student is fitted with: ``"grad_x_input"`` (default) or ``"ig"``
            (few steps, ``explainer_kwargs={"n_steps": 4}``). Evaluate agreement with another one (captum IG,
            LRP: ``report.explanations``), since the student is trained to match this one.
        teacher: the unpruned network to match; default a frozen deep copy of the trainer's network taken at
            ``teacher_epoch``. A given teacher is used as is (not copied; its parameters get no gradient).
        teacher_epoch: epoch at whose start the teacher copy is taken when ``teacher`` is None.
        start_epoch: first epoch in which the term is added (default ``teacher_epoch``).
        target: what is explained (``relevance.targets``): ``"label"`` (default), ``"pred"``, a class index, ...
        distance: ``"pearson"`` (default) or ``"cosine"``, see ``map_distance``.
        distill_weight: weight of an extra logit distillation term from the teacher (0: off), on the trainer's
            ``Keys.PRED``.
        temperature: distillation temperature.
        explainer_kwargs: passed to the explainer (``n_steps``, ``baseline``).
        feature_weight: weight of the kept-channel feature distillation term (0: off).
        name: logger name; default the engine's logger.

    Note:
        The extra pass is a forward and a double backward of the student (``grad_x_input``), about 2-3x a
        training step's cost, plus a forward and backward of the teacher. Under ``DistributedDataParallel`` the
        explanation pass runs on the wrapped module and its gradients are all-reduced with the task loss's in
        the trainer's backward (each rank's term is the mean over its own shard, as the task loss is). The
        feature term costs one teacher forward per batch (the student's outputs come from the training forward);
        under DDP its hooks sit on the wrapped module, each rank normalises it by its own shard and DDP averages
        the gradients: the step is that of the mean of the ranks' terms, not of the term over the union of the
        shards (tested against a hand-written step, 2 processes). The teacher is not part of ``state_dict``; after resuming past ``teacher_epoch`` pass
        ``teacher`` explicitly.
    """

    def __init__(
        self,
        weight: float,
        explainer: str = "grad_x_input",
        teacher: nn.Module | None = None,
        teacher_epoch: int = 1,
        start_epoch: int | None = None,
        target: Any = "label",
        distance: str = "pearson",
        distill_weight: float = 0.0,
        temperature: float = 1.0,
        explainer_kwargs: dict | None = None,
        feature_weight: float = 0.0,
        name: str | None = None,
    ) -> None:
        if (
            isinstance(feature_weight, bool)
            or not isinstance(feature_weight, (int, float))
            or not float(feature_weight) >= 0
            or feature_weight == float("inf")
        ):
            raise ValueError(f"feature_weight must be a finite number >= 0, got {feature_weight!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not float(weight) >= 0:
            raise ValueError(f"weight must be a number > 0, got {weight!r}")
        if not float(weight) > 0 and not float(feature_weight) > 0:
            raise ValueError(f"weight must be a number > 0 (or 0 with feature_weight > 0), got {weight!r}")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module or None, got {type(teacher).__name__}")
        if isinstance(teacher_epoch, bool) or not isinstance(teacher_epoch, int) or teacher_epoch < 1:
            raise ValueError(f"teacher_epoch must be a positive integer, got {teacher_epoch!r}")
        start_epoch = teacher_epoch if start_epoch is None else start_epoch
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 1:
            raise ValueError(f"start_epoch must be a positive integer, got {start_epoch!r}")
        if teacher is None and start_epoch < teacher_epoch:
            raise ValueError(
                f"start_epoch={start_epoch} comes before teacher_epoch={teacher_epoch}: there is no teacher yet"
            )
        self.weight = float(weight)
        self.teacher_epoch = teacher_epoch
        self.start_epoch = start_epoch
        # validates explainer, distance, distill_weight, temperature; the teacher is set below or at teacher_epoch
        self.loss = ExplanationConsistencyLoss(
            teacher if teacher is not None else nn.Identity(),
            explainer=explainer,
            target=target,
            distance=distance,
            distill_weight=distill_weight,
            temperature=temperature,
            explainer_kwargs=explainer_kwargs,
        )
        self.teacher = teacher
        self.feature_weight = float(feature_weight)
        self.features: FeatureDistillationLoss | None = None
        self._features_key: tuple | None = None
        self.logger = logging.getLogger(name)
        self._name = name
        self._sum, self._count = 0.0, 0
        self._fsum = 0.0

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: a MONAI ``SupervisedTrainer`` (fires ``IterationEvents.LOSS_COMPLETED``).
        """
        if self._name is None:
            self.logger = engine.logger
        if engine.has_event_handler(self, IterationEvents.LOSS_COMPLETED):
            return
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        if self.feature_weight > 0:
            engine.add_event_handler(Events.ITERATION_STARTED, self.hook_features)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)

    def set_teacher(self, network: nn.Module) -> None:
        """Match a frozen deep copy of ``network`` (unwrapped from ``DataParallel`` / DDP) from now on.

        For callers that prune before the first epoch (``prune_epochs`` starting at 0): take the copy of the
        trained network before the trainer runs, since ``teacher_epoch`` 1 would already see the pruned one.
        """
        if isinstance(network, (DataParallel, DistributedDataParallel)):
            network = network.module
        teacher = copy.deepcopy(network).eval()
        teacher.requires_grad_(False)
        self.teacher = self.loss.teacher = teacher
        if self.features is not None:
            self.features.detach()
        self.features, self._features_key = None, None

    def hook_features(self, engine: Engine) -> None:
        """Before the training forward: hook the student's layers for the feature term, with the channel map of the
        pruning stages done so far (rebuilt when a stage pruned or the network object changed)."""
        if engine.state.epoch < self.start_epoch or self.teacher is None:
            return
        student = engine.network
        if isinstance(student, (DataParallel, DistributedDataParallel)):
            student = student.module
        histories = list(getattr(engine.state, "pruning_channel_histories", None) or [])
        key = (id(student), len(histories), sum(len(h) for h in histories))
        if key != self._features_key:
            if self.features is None:
                self.features = FeatureDistillationLoss(self.teacher)
            self.features.kept = kept_channels(self.teacher, *histories)
            self.features.attach(student)
            self._features_key = key

    def epoch_started(self, engine: Engine) -> None:
        """Take the teacher copy at ``teacher_epoch`` and reset the epoch's running mean."""
        self._sum, self._count, self._fsum = 0.0, 0, 0.0
        if self.teacher is None and engine.state.epoch == self.teacher_epoch:
            self.set_teacher(engine.network)
            self.logger.info(
                f"explanation consistency: teacher copied at the start of epoch {engine.state.epoch}"
            )

    def epoch_completed(self, engine: Engine) -> None:
        """Log the epoch's mean terms (only in epochs where they were added)."""
        if self._count:
            self.logger.info(
                f"explanation consistency: epoch {engine.state.epoch} mean term {self._sum / self._count:.4f} "
                f"(weight {self.weight:g}, {self.loss.explainer}, {self._count} iterations)"
                + (
                    f", feature distillation {self._fsum / self._count:.4f} (weight {self.feature_weight:g})"
                    if self.feature_weight > 0
                    else ""
                )
            )

    def __call__(self, engine: Engine) -> None:
        """
        Args:
            engine: the trainer, between loss computation and ``backward()``.
        """
        if engine.state.epoch < self.start_epoch:
            return
        if self.teacher is None:
            raise RuntimeError(
                f"no teacher at epoch {engine.state.epoch}: the copy is taken at the start of epoch "
                f"{self.teacher_epoch} (resumed later?); pass teacher= explicitly"
            )
        student = engine.network
        if isinstance(student, (DataParallel, DistributedDataParallel)):
            # the maps pass runs on the wrapped module: its parameter gradients join the task loss's in the
            # trainer's one backward, where DDP's reducer all-reduces their sum (a second DDP forward would not)
            student = student.module
        out = engine.state.output
        value = 0.0
        if self.weight > 0:
            term = self.loss(student, out[Keys.IMAGE], out[Keys.LABEL], student_output=out.get(Keys.PRED))
            out[Keys.LOSS] = out[Keys.LOSS] + self.weight * term
            value = float(term.detach())
            out["explanation_consistency"] = value
        if self.feature_weight > 0:
            if self.features is None:  # attached after this iteration started: from the next one on
                self.hook_features(engine)
            else:
                image = out[Keys.IMAGE]
                fterm = self.features(image)
                out[Keys.LOSS] = out[Keys.LOSS] + self.feature_weight * fterm
                out["feature_distillation"] = float(fterm.detach())
                self._fsum += out["feature_distillation"]
        self._sum, self._count = self._sum + value, self._count + 1
        engine.state.metrics["explanation_consistency"] = self._sum / self._count
        if self.feature_weight > 0:
            engine.state.metrics["feature_distillation"] = self._fsum / self._count
