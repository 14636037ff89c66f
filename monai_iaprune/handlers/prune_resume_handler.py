"""Trainer handler: save a resume checkpoint at every epoch start of a pruning run, and restore it on a rerun."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.utils import IgniteInfo, min_version, optional_import

from monai_iaprune.pruning.checkpoint import atomic_write, safe_load
from monai_iaprune.utils.ddp import is_main_process, unwrap_network
from monai_iaprune.utils.settings import as_bool

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["PruneResumeHandler", "RESUME_FORMAT"]

RESUME_FORMAT = "monai_iaprune.resume/1"


def _np_state(state: tuple) -> list:
    """A numpy ``RandomState.get_state()`` tuple as plain data (a safe load refuses numpy arrays)."""
    name, keys, pos, has_gauss, cached = state
    return [
        str(name),
        torch.as_tensor(np.asarray(keys, dtype=np.int64)),
        int(pos),
        int(has_gauss),
        float(cached),
    ]


def _np_unstate(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def _random_transforms(loader: Any) -> list[Any]:
    """The MONAI ``Randomizable`` transforms (and ``Compose``) of ``loader``'s dataset, in a stable order."""
    from monai.transforms import Compose, Randomizable

    found: list[Any] = []

    def walk(t: Any) -> None:
        if t is None or any(t is f for f in found):
            return
        if isinstance(t, Randomizable):
            found.append(t)
        if isinstance(t, Compose):
            for sub in t.transforms:
                walk(sub)

    walk(getattr(getattr(loader, "dataset", None), "transform", None))
    return found


class PruneResumeHandler:
    """
    PruneResumeHandler saves what a pruning run needs to continue after a crash, at the start of every trainer
    epoch (so after the stages and fine-tuning of the epoch before), and restores it when the trainer starts again.

    The file (written atomically, plain data only: it loads with ``weights_only=True``) holds the network's
    ``state_dict``, the pruning handler's ``state_dict()`` (stages done + ``pruned_structure``), the optimizer's
    ``state_dict``, the ``state_dict`` of every LR scheduler in ``lr_schedulers`` (so the resumed run continues the
    same learning-rate schedule), the trainer's epoch and iteration, the torch / numpy / Python RNG states and those
    of the training data's random transforms, and ``settings`` (checked to match on restore).

    Args:
        path: the resume file, e.g. ``models/pruned/resume.pt``.
        pruning_handler: the ``RelevancePruningHandler`` of the same trainer.
        resume: restore ``path`` when the trainer starts (``as_bool``); the file must exist.
        settings: plain values that must be equal on restore (method, ratio, stages, host checkpoint hash, ...).
        lr_schedulers: the trainer's learning-rate schedulers (e.g. the one an ``LrScheduleHandler`` steps), in a
            stable order; their states are saved and restored (the same number must be given on restore).

    Note:
        Attach it after a ``PruneReportHandler`` (which measures the unpruned network when the trainer starts) and
        before the ``RelevancePruningHandler`` (whose stage at epoch 0 is skipped when the restored history holds
        it). Set ``trainer.state.epoch`` / ``iteration`` to ``trainer_state()`` before ``trainer.run()`` so ignite
        continues from there. Only rank 0 writes; every rank restores the same file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        pruning_handler: Any,
        resume: bool = False,
        settings: dict[str, Any] | None = None,
        lr_schedulers: Sequence[Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.lr_schedulers = list(lr_schedulers or [])
        for s in self.lr_schedulers:
            if not (hasattr(s, "state_dict") and hasattr(s, "load_state_dict")):
                raise TypeError(f"lr_schedulers: {type(s).__name__} has no state_dict / load_state_dict")
        self.pruning_handler = pruning_handler
        self.resume = as_bool(resume, "resume")
        self.settings = dict(settings or {})
        self.logger = logging.getLogger(__name__)
        self.saved = 0
        self._state: dict[str, Any] | None = None
        self._attached: set[int] = set()
        if self.resume:
            self._state = self.load()

    def load(self) -> dict[str, Any]:
        """Read and check the resume file (raises FileNotFoundError / ValueError with the reason)."""
        if not self.path.is_file():
            raise FileNotFoundError(
                f"resume is true but there is no resume file {self.path}: the earlier run finished (its outputs are "
                "written) or never completed a stage; run without --resume true to start afresh"
            )
        state = safe_load(self.path)
        if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
            raise ValueError(f"{self.path} is not a monai_iaprune resume file ({RESUME_FORMAT})")
        differ = {
            k: (state["settings"].get(k), v)
            for k, v in self.settings.items()
            if state["settings"].get(k) != v
        }
        if differ:
            raise ValueError(
                f"resume file {self.path} was written with other settings {{name: (then, now)}} {differ}; "
                "rerun with the same settings or without --resume true"
            )
        saved = state.get("lr_schedulers", [])
        if len(saved) != len(self.lr_schedulers):
            raise ValueError(
                f"resume file {self.path} holds {len(saved)} LR scheduler state(s) but this run has "
                f"{len(self.lr_schedulers)}; rerun with the same trainer configuration or without --resume true"
            )
        return state

    def trainer_state(self) -> tuple[int, int] | None:
        """``(epoch, iteration)`` to continue from, None when not resuming."""
        return None if self._state is None else (int(self._state["epoch"]), int(self._state["iteration"]))

    def attach(self, engine: Engine) -> None:
        """
        Args:
            engine: the trainer the pruning handler is attached to.
        """
        if id(engine) in self._attached:
            return
        self._attached.add(id(engine))
        self.logger = engine.logger
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.restore)
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """At EPOCH_STARTED: save the state reached at the end of the previous epoch (rank 0)."""
        if not is_main_process():
            return
        network = unwrap_network(engine.network)
        optimizer = getattr(engine, "optimizer", None)
        state = {
            "format": RESUME_FORMAT,
            "settings": self.settings,
            "epoch": int(engine.state.epoch) - 1,  # ignite has counted the epoch starting now
            "iteration": int(engine.state.iteration),
            "network": {k: v.detach().cpu() for k, v in network.state_dict().items()},
            "pruning": self.pruning_handler.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "lr_schedulers": [s.state_dict() for s in self.lr_schedulers],
            "rng": self._rng_state(engine),
        }
        atomic_write(self.path, lambda f: torch.save(state, f), overwrite=True)
        self.saved += 1

    def restore(self, engine: Engine) -> None:
        """At STARTED: reshape the network to the saved structure, load weights, optimizer and RNG states."""
        state = self._state
        if state is None:
            return
        self.pruning_handler.load_state_dict(
            state["pruning"]
        )  # reshapes the network (parameters keep identity)
        network = unwrap_network(engine.network)
        device = next(network.parameters()).device
        network.load_state_dict({k: v.to(device) for k, v in state["network"].items()})
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None and state["optimizer"] is not None:
            try:
                optimizer.load_state_dict(state["optimizer"])
            except (
                ValueError
            ):  # depth pruning removed parameters: a new optimizer of the same class on the rest
                optimizer = type(optimizer)(
                    [p for p in network.parameters() if p.requires_grad], **optimizer.defaults
                )
                optimizer.load_state_dict(state["optimizer"])
                engine.optimizer = optimizer
        for scheduler, scheduler_state in zip(self.lr_schedulers, state.get("lr_schedulers", [])):
            scheduler.load_state_dict(scheduler_state)
        self._set_rng_state(engine, state["rng"])
        engine.state.pruning = self.pruning_handler.history
        engine.state.pruning_channel_histories = self.pruning_handler.channel_histories
        self.logger.info(
            f"resumed from {self.path}: epoch {state['epoch']}, {len(self.pruning_handler.history)} stage(s) done"
        )

    @staticmethod
    def _rng_state(engine: Engine) -> dict[str, Any]:
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _np_state(np.random.get_state()),
            "python": list(random.getstate()),
            "transforms": [_np_state(t.R.get_state()) for t in _random_transforms(engine.data_loader)],
        }

    @staticmethod
    def _set_rng_state(engine: Engine, rng: dict[str, Any]) -> None:
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(_np_unstate(rng["numpy"]))
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        transforms = _random_transforms(engine.data_loader)
        if len(transforms) != len(rng["transforms"]):
            raise ValueError("the training data's random transforms differ from the resumed run's")
        for t, s in zip(transforms, rng["transforms"]):
            t.R.set_state(_np_unstate(s))

    def finish(self) -> None:
        """Remove the resume file (call when the run's outputs are written)."""
        if is_main_process():
            self.path.unlink(missing_ok=True)
