"""Prune any MONAI model-zoo bundle with the generic overlay ``monai_iaprune/configs/prune_overlay.json``.

The overlay is merged on top of the host bundle's ``configs/train.json`` and runs
``prune_host_bundle`` with the host's own objects (network, trainer, evaluator, key metric), found through the
model-zoo key conventions (``network``, ``train#trainer``, ``validate#evaluator``, ``validate#key_metric``, ...);
``--host_<role> @<key>`` overrides point it at other keys. Every check runs before any work, and the host's
trained checkpoint (``models/model.pt``) is only read: its bytes are compared at the end.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.handlers import CheckpointSaver
from monai.inferers import SlidingWindowInferer
from monai.utils import IgniteInfo, convert_to_tensor, fall_back_tuple, min_version, optional_import
from torch import nn

from monai_iaprune.bundle import check_prune_settings, check_writable, load_state_dict, save_pruned_model
from monai_iaprune.handlers.relevance_collector import RelevanceCollector, _image_label, unwrap_network
from monai_iaprune.pruning.batchnorm import recalibrate_batchnorm
from monai_iaprune.pruning.checkpoint import atomic_write, load_pruned
from monai_iaprune.pruning.optimizer import parameter_snapshot, remap_optimizer
from monai_iaprune.pruning.prune import count_macs, count_params, prune
from monai_iaprune.relevance.collect import channel_relevance
from monai_iaprune.relevance.layers import PRUNABLE_TYPES, out_channels
from monai_iaprune.relevance.registry import METHODS
from monai_iaprune.report.prune_report import measure_latency, package_versions, write_prune_report

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = [
    "HOST_KEYS",
    "HostConfigError",
    "PATCH_MODES",
    "PatchOutputTransform",
    "check_host_config",
    "evaluate_pruned",
    "prune_host_bundle",
]

logger = logging.getLogger(__name__)

PATCH_MODES = ("center", "foreground", "sliding")

# overlay key -> (what the overlay uses it for, an override example for a bundle that names it differently)
HOST_KEYS: dict[str, tuple[str, str]] = {
    "bundle_root": ("the bundle folder (all paths start there)", '--bundle_root "."'),
    "host_network": (
        "the trained network (model-zoo key `network`, i.e. `$@network_def.to(@device)`)",
        "--host_network @net",
    ),
    "host_trainer": (
        "the SupervisedTrainer used to fine-tune (model-zoo key `train#trainer`)",
        "--host_trainer @trainer",
    ),
    "host_train_dataloader": (
        "the training data for BatchNorm re-calibration (default: the trainer's data_loader)",
        "--host_train_dataloader @train_loader",
    ),
    "host_evaluator": (
        "the SupervisedEvaluator that measures the key metric and feeds relevance (model-zoo key `validate#evaluator`)",
        "--host_evaluator @evaluator",
    ),
    "host_key_metric": (
        "the key metric (model-zoo key `validate#key_metric`; `$None`: the evaluator's own key metric)",
        "--host_key_metric '$None'",
    ),
    "host_ckpt_dir": (
        "the folder of the host's trained checkpoint",
        "--host_ckpt_dir \"$@bundle_root + '/models'\"",
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# host config checks
# ---------------------------------------------------------------------------------------------------------------
class HostConfigError(KeyError):
    """The host bundle lacks a config key the prune overlay needs (the message names the key and the override)."""

    def __str__(self) -> str:  # KeyError would print the repr of the multi-line message
        return str(self.args[0]) if self.args else ""


def _active_parser() -> Any | None:
    """The ``ConfigParser`` evaluating the calling config expression (MONAI passes no handle to expressions)."""
    from monai.bundle import ConfigParser

    frame = inspect.currentframe()
    try:
        while frame is not None:
            obj = frame.f_locals.get("self")
            if isinstance(obj, ConfigParser):
                return obj
            frame = frame.f_back
    finally:
        del frame
    return None


def missing_host_keys(parser: Any, keys: Mapping[str, tuple[str, str]] = HOST_KEYS) -> list[str]:
    """Explain every overlay key of ``keys`` that is absent or refers to a config id the host does not define.

    Args:
        parser: the ``monai.bundle.ConfigParser`` holding host config + overlay (+ command-line overrides).
        keys: ``{overlay key: (role, override example)}``.

    Returns:
        One message per problem (empty when everything is defined).
    """
    from monai.bundle import ReferenceResolver

    problems = []
    for key, (role, example) in keys.items():
        if key not in parser:
            problems.append(f"`{key}` is not set: it is {role}; set it with {example}")
            continue
        raw = parser[key]
        refs = ReferenceResolver.match_refs_pattern(raw) if isinstance(raw, str) else {}
        for ref in (r.replace("::", "#") for r in refs):  # MONAI reports ids with its legacy separator
            if ref not in parser:
                problems.append(
                    f"the host bundle defines no `{ref}`, which the prune overlay reads as `{key}` ({role}); "
                    f"point it at the host's own key, e.g. {example}"
                )
    return problems


def check_host_config(keys: Mapping[str, tuple[str, str]] = HOST_KEYS) -> None:
    """Raise ``HostConfigError`` (a ``KeyError``) naming each host key the overlay needs but the host bundle lacks (and its override).

    Called as the first expression of the overlay's ``prune`` list, before anything is instantiated, so a bundle
    with other key names fails in a second with the fix instead of deep inside MONAI's reference resolution.
    Outside a running ``ConfigParser`` it does nothing.

    Args:
        keys: ``{overlay key: (role, override example)}``; default ``HOST_KEYS``.
    """
    parser = _active_parser()
    if parser is None:
        return
    problems = missing_host_keys(parser, keys)
    if problems:
        raise HostConfigError(
            "the host bundle does not follow the model-zoo key layout the prune overlay expects:\n  - "
            + "\n  - ".join(problems)
        )


# ---------------------------------------------------------------------------------------------------------------
# relevance on the evaluator, patches for sliding-window segmentation
# ---------------------------------------------------------------------------------------------------------------
class PatchOutputTransform:
    """``engine.state.output -> (image, label)`` cut to patches the network accepts (sliding-window inference).

    A segmentation evaluator with a ``SlidingWindowInferer`` feeds full-size volumes; the network itself only ever
    saw ``roi_size`` patches, so relevance is computed on patches of that size.

    Args:
        roi_size: patch size; non-positive entries mean the full image size along that axis.
        mode: ``"center"`` (one central patch per image), ``"foreground"`` (one patch centred on the label's
            foreground bounding box, the centre when the label has none or is absent), or ``"sliding"`` (every
            patch of a non-overlapping grid that covers the image).
        max_patches: with ``"sliding"``, at most this many patches per image (evenly spread over the grid).
        output_transform: reads ``(image, label)`` from the engine output; default the evaluator's
            ``"image"`` / ``"label"`` entries.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        mode: str = "foreground",
        max_patches: int | None = None,
        output_transform: Callable[[Any], tuple[Any, Any]] = _image_label,
    ) -> None:
        if mode not in PATCH_MODES:
            raise ValueError(f"unknown patch_mode {mode!r}; use one of {PATCH_MODES}")
        if max_patches is not None and max_patches < 1:
            raise ValueError(f"max_patches must be a positive integer or None, got {max_patches!r}")
        self.roi_size = roi_size
        self.mode = mode
        self.max_patches = max_patches
        self.output_transform = output_transform

    @staticmethod
    def _foreground(label: torch.Tensor) -> torch.Tensor:
        """Boolean foreground ``[*spatial]`` of one sample's label (index map ``[1, *sp]`` or one-hot ``[K, *sp]``)."""
        if label.shape[0] > 1:
            return label.argmax(0) > 0
        return label[0] > 0

    def _starts(
        self, spatial: Sequence[int], roi: Sequence[int], label: torch.Tensor | None
    ) -> list[tuple[int, ...]]:
        if self.mode == "sliding":
            from monai.data.utils import dense_patch_slices

            slices = dense_patch_slices(tuple(spatial), tuple(roi), tuple(roi))
            starts = [tuple(s.start for s in sl) for sl in slices]
            if self.max_patches is not None and len(starts) > self.max_patches:
                step = len(starts) / self.max_patches
                starts = [starts[int(i * step)] for i in range(self.max_patches)]
            return starts
        centre = [s // 2 for s in spatial]
        if self.mode == "foreground" and label is not None:
            fg = self._foreground(label)
            if fg.any():
                idx = fg.nonzero()
                centre = [int((lo + hi) // 2) for lo, hi in zip(idx.min(0).values, idx.max(0).values)]
        return [tuple(min(max(c - r // 2, 0), s - r) for c, r, s in zip(centre, roi, spatial))]

    def __call__(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            output: ``engine.state.output`` of the evaluator.
        """
        image, label = self.output_transform(output)
        image = convert_to_tensor(image, track_meta=False)
        label = None if label is None else convert_to_tensor(label, track_meta=False)
        spatial = tuple(image.shape[2:])
        roi = tuple(fall_back_tuple(self.roi_size, spatial))
        if len(roi) != len(spatial):
            raise ValueError(f"patch size {roi} does not match the image's spatial shape {spatial}")
        pad = [max(r - s, 0) for r, s in zip(roi, spatial)]
        if any(pad):  # the inferer pads small images with zeros as well
            widths = [w for p in reversed(pad) for w in (p // 2, p - p // 2)]
            image = F.pad(image, widths)
            label = None if label is None else F.pad(label, widths)
            spatial = tuple(image.shape[2:])
        images, labels = [], []
        for b in range(image.shape[0]):
            lab = None if label is None or label.ndim != image.ndim else label[b]
            for start in self._starts(spatial, roi, lab):
                window = (slice(None),) + tuple(slice(s, s + r) for s, r in zip(start, roi))
                images.append(image[b][window])
                if label is not None:
                    labels.append(label[b][window] if label.ndim == image.ndim else label[b])
        return torch.stack(images), (torch.stack(labels) if label is not None else None)


@contextmanager
def _collecting(evaluator: Any, collector: RelevanceCollector, max_batches: int | None) -> Iterator[None]:
    """Feed ``collector`` from ``evaluator``'s iterations (at most ``max_batches``) for the duration of the block."""
    seen = 0

    def explain(engine: Any) -> None:
        nonlocal seen
        if max_batches is None or seen < max_batches:
            collector(engine)
            seen += 1

    collector.reset()
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, explain)
    try:
        yield
    finally:
        evaluator.remove_event_handler(explain, Events.ITERATION_COMPLETED)


def _handler_owner(handler: Any) -> Any:
    if hasattr(handler, "_parent"):  # ignite wraps filtered handlers (Events.X(every=n)) and keeps a weakref
        handler = handler._parent()
    return getattr(handler, "__self__", None)


def checkpoint_savers(engines: Iterable[Any]) -> list[CheckpointSaver]:
    """Every MONAI ``CheckpointSaver`` attached to any of ``engines`` (trainer, evaluator)."""
    found: list[CheckpointSaver] = []
    for engine in engines:
        for handlers in getattr(engine, "_event_handlers", {}).values():
            for h, _, _ in handlers:
                owner = _handler_owner(h)
                if isinstance(owner, CheckpointSaver) and owner not in found:
                    found.append(owner)
    return found


@contextmanager
def savers_paused(engines: Iterable[Any]) -> Iterator[None]:
    """Detach the ``CheckpointSaver`` handlers of ``engines`` for the block (our own measurement passes).

    Without this, the host's key-metric saver would store the *unpruned* network as the "best" checkpoint when the
    evaluator runs before pruning; only evaluations during fine-tuning should feed it.
    """
    removed: list[tuple[Any, Any, list]] = []
    for engine in engines:
        for event, handlers in getattr(engine, "_event_handlers", {}).items():
            kept = [entry for entry in handlers if not isinstance(_handler_owner(entry[0]), CheckpointSaver)]
            if len(kept) != len(handlers):
                removed.append((engine, event, list(handlers)))
                engine._event_handlers[event] = kept
    try:
        yield
    finally:
        for engine, event, handlers in removed:
            engine._event_handlers[event] = handlers


# ---------------------------------------------------------------------------------------------------------------
# the workflow
# ---------------------------------------------------------------------------------------------------------------
def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _metric_name(evaluator: Any, key_metric: str | Mapping | None) -> str:
    if isinstance(key_metric, Mapping):
        if not key_metric:
            raise ValueError("host_key_metric is an empty dict; give the host's validate#key_metric or null")
        return str(next(iter(key_metric)))
    if isinstance(key_metric, str) and key_metric:
        return key_metric
    if key_metric not in (None, ""):
        raise TypeError(
            f"host_key_metric must be a metric dict, a name or null, got {type(key_metric).__name__}"
        )
    name = getattr(evaluator.state, "key_metric_name", None)
    if name is None:
        raise ValueError(
            "the host evaluator has no key metric (key_val_metric); set host_key_metric to a metric name"
        )
    return str(name)


def _evaluate(evaluator: Any, name: str, engines: Sequence[Any]) -> float:
    with savers_paused(engines):
        evaluator.run()
    metrics = evaluator.state.metrics
    if name not in metrics:
        raise KeyError(
            f"the host evaluator computed no metric {name!r} (it has {sorted(metrics)}); set host_key_metric"
        )
    return float(metrics[name])


def _finetune(trainer: Any, epochs: int) -> None:
    """Run the host trainer for ``epochs`` more epochs (continuing its epoch count)."""
    if epochs <= 0:
        return
    trainer.state.max_epochs = int(trainer.state.epoch or 0) + int(epochs)
    trainer.run()


def _channels(network: nn.Module) -> dict[str, int]:
    return {n: out_channels(m) for n, m in network.named_modules() if isinstance(m, PRUNABLE_TYPES)}


def _patch_size(evaluator: Any, patch_size: Sequence[int] | int | None) -> Sequence[int] | int | None:
    if patch_size is not None:
        return patch_size
    inferer = getattr(evaluator, "inferer", None)
    return inferer.roi_size if isinstance(inferer, SlidingWindowInferer) else None


def prune_host_bundle(
    network: nn.Module,
    trainer: Any,
    evaluator: Any,
    host_checkpoint: str | os.PathLike,
    pruned_checkpoint: str | os.PathLike,
    report_dir: str | os.PathLike,
    pruned_torchscript: str | os.PathLike | None = None,
    method: str = "lrp",
    ratio: float = 0.5,
    stages: int = 1,
    finetune_epochs: int = 1,
    stage_epochs: int = 1,
    key_metric: str | Mapping | None = None,
    train_dataloader: Iterable | None = None,
    target: Any = "label",
    relevance_kwargs: dict | None = None,
    prune_kwargs: dict | None = None,
    relevance_batches: int | None = None,
    calibration_batches: int | None = 8,
    patch_size: Sequence[int] | int | None = None,
    patch_mode: str = "foreground",
    max_patches: int | None = None,
    fresh_optimizer: bool = False,
    finetune_lr: float | None = None,
    latency_repeats: int = 20,
    overwrite: bool = False,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load the host's trained checkpoint, prune it by relevance, fine-tune with the host's trainer, report.

    Steps: check everything; load ``host_checkpoint`` into ``network``; for each stage run the host ``evaluator``
    with a ``RelevanceCollector`` (its key metric before the first stage is ``metric_before``), prune the stage's
    share of the parameters, re-estimate BatchNorm statistics on ``train_dataloader`` and remap the trainer's
    optimizer (``stage_epochs`` of fine-tuning between stages); evaluate (``metric_pruned``); fine-tune with the
    host trainer for ``finetune_epochs``; evaluate (``metric_after``); write the pruned checkpoint, the
    TorchScript export and ``prune_report.json`` / ``.md``; check ``host_checkpoint`` still has the same bytes.

    Args:
        network: the host's network (``@network``), shared by ``trainer`` and ``evaluator``; pruned in place.
        trainer: the host's ``SupervisedTrainer`` (``@train#trainer``).
        evaluator: the host's ``SupervisedEvaluator`` (``@validate#evaluator``).
        host_checkpoint: the trained weights (``models/model.pt``): a state dict or ``{"model": state_dict}``;
            read only.
        pruned_checkpoint: where the pruned network goes (``save_pruned`` format; load it with
            ``monai_iaprune.bundle.load_network(network_def, path)``).
        report_dir: folder of ``prune_report.json`` / ``prune_report.md``.
        pruned_torchscript: where the TorchScript export goes; None: no export.
        method: relevance method (``"lrp"``, ``"ig"``, ``"dlb"``, ``"taylor"``, ``"magnitude"``, ``"random"``).
        ratio: fraction of the parameters to remove over all stages, strictly between 0 and 1.
        stages: number of prune steps; stage k removes ``1 - (1 - ratio) ** (1 / stages)`` of the current ones.
        finetune_epochs: host-trainer epochs after the last stage.
        stage_epochs: host-trainer epochs between two stages.
        key_metric: the host's ``validate#key_metric`` dict, a metric name, or None for the evaluator's own.
        train_dataloader: batches for BatchNorm re-calibration (and for data-free methods' example input);
            default ``trainer.data_loader``.
        target: what relevance explains: ``"label"``, ``"pred"``, a class index (see ``relevance.targets``).
        relevance_kwargs: passed to the relevance method.
        prune_kwargs: more ``monai_iaprune.prune`` arguments (``target``, ``round_to``, ``max_layer_ratio``, ...).
        relevance_batches: explain at most this many evaluator batches per collection (None: all).
        calibration_batches: at most this many training batches for BatchNorm re-calibration.
        patch_size: explain patches of this size; default the evaluator's ``SlidingWindowInferer.roi_size``
            (whole images when the evaluator has no sliding-window inferer).
        patch_mode: ``"foreground"``, ``"center"`` or ``"sliding"`` (see ``PatchOutputTransform``).
        max_patches: with ``"sliding"``, at most this many patches per image.
        fresh_optimizer: build a new optimizer of the host optimizer's class and settings on the pruned
            parameters instead of remapping the host's (LR schedulers holding the old one then keep the old one).
        finetune_lr: set this learning rate on every parameter group for fine-tuning; None keeps the host's.
        latency_repeats: timed forward passes for the latency before / after.
        overwrite: replace existing pruned outputs and report (never ``host_checkpoint``).
        settings: extra fields copied into the report (bundle name, command, ...).

    Returns:
        The report dict (also written to ``report_dir``).

    Raises:
        FileNotFoundError: no ``host_checkpoint``.
        ValueError: bad settings, a checkpoint that does not match ``network_def``, or a host ``CheckpointSaver``
            writing into the folder of ``host_checkpoint``.
        FileExistsError: outputs exist and ``overwrite`` is false.
        RuntimeError: ``host_checkpoint`` changed during the run.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    check_prune_settings(method, ratio, stages, finetune_epochs)
    if isinstance(stage_epochs, bool) or not isinstance(stage_epochs, int) or stage_epochs < 0:
        raise ValueError(f"bad stage_epochs {stage_epochs!r}: need an integer >= 0")
    if patch_mode not in PATCH_MODES:
        raise ValueError(f"unknown patch_mode {patch_mode!r}; use one of {PATCH_MODES}")
    for name, value in (
        ("relevance_batches", relevance_batches),
        ("calibration_batches", calibration_batches),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"bad {name} {value!r}: need a positive integer or null")
    for name, engine in (("trainer", trainer), ("evaluator", evaluator)):
        if not hasattr(engine, "run") or not hasattr(engine, "network"):
            raise TypeError(
                f"host {name} must be a MONAI workflow with run() and network, got {type(engine).__name__}"
            )
    if unwrap_network(evaluator.network) is not network or unwrap_network(trainer.network) is not network:
        raise ValueError(
            "the host trainer, evaluator and host_network must share one network object (as model-zoo bundles do "
            "with @network); point --host_network at the network both use"
        )
    host_checkpoint = Path(host_checkpoint)
    if not host_checkpoint.is_file():
        raise FileNotFoundError(
            f"no trained host checkpoint at {host_checkpoint}: train the host bundle first "
            "(python -m monai.bundle run --config_file configs/train.json) or pass --host_checkpoint <path>"
        )
    report_dir = Path(report_dir)
    outputs = [Path(pruned_checkpoint), report_dir / "prune_report.json", report_dir / "prune_report.md"]
    if pruned_torchscript:
        outputs.append(Path(pruned_torchscript))
    check_writable(outputs, overwrite)
    host_dir = host_checkpoint.resolve().parent
    if Path(pruned_checkpoint).resolve() == host_checkpoint.resolve():
        raise ValueError(f"pruned_checkpoint is the host checkpoint {host_checkpoint}; choose another path")
    engines = [trainer, evaluator]
    for saver in checkpoint_savers(engines):
        if Path(saver.save_dir).resolve() == host_dir:
            raise ValueError(
                f"a CheckpointSaver of the host bundle writes into {saver.save_dir}, the folder of the trained "
                f"checkpoint {host_checkpoint.name}; fine-tuning would overwrite it. Redirect it (the overlay sets "
                "ckpt_dir to models/pruned; if the saver uses another key, override that key)"
            )
    metric_name = _metric_name(evaluator, key_metric)
    data = train_dataloader if train_dataloader is not None else getattr(trainer, "data_loader", None)
    if data is None:
        raise ValueError(
            "no training data for BatchNorm re-calibration: pass --host_train_dataloader @<loader key>"
        )
    host_hash = _sha256(host_checkpoint)

    t0 = time.perf_counter()
    load_state_dict(network, host_checkpoint)
    timings["load_checkpoint"] = time.perf_counter() - t0

    roi = _patch_size(evaluator, patch_size)
    transform = PatchOutputTransform(roi, patch_mode, max_patches) if roi is not None else _image_label
    data_free = METHODS[method].data_free  # check_prune_settings checked the name
    collector = (
        None
        if data_free
        else RelevanceCollector(
            method, target=target, relevance_kwargs=relevance_kwargs, output_transform=transform
        )
    )
    stage_ratio = 1.0 - (1.0 - float(ratio)) ** (1.0 / stages)
    optimizer = getattr(trainer, "optimizer", None)
    stages_detail: list[dict[str, Any]] = []
    before: dict[str, Any] = {}
    timings.update(relevance=0.0, prune=0.0, evaluate_pruned=0.0, finetune=0.0)

    for stage in range(1, stages + 1):
        t0 = time.perf_counter()
        if collector is not None:
            with _collecting(evaluator, collector, relevance_batches):
                metric = _evaluate(evaluator, metric_name, engines)
            relevance = collector.relevance
        else:  # magnitude / random need no data; the training data gives the example input
            metric = _evaluate(evaluator, metric_name, engines)
            relevance = channel_relevance(
                network, data, method, max_batches=1, progress=False, **dict(relevance_kwargs or {})
            )
        elapsed = time.perf_counter() - t0
        timings["relevance"] += (
            elapsed  # one evaluator pass: relevance + the key metric (metric_before at stage 1)
        )
        example = relevance.example_input
        if example is None:
            raise ValueError(
                "no example input to trace the network: the evaluator / training data yielded no batch"
            )
        device = next(network.parameters()).device
        example = example.to(device)
        if stage == 1:
            t1 = time.perf_counter()
            before = {
                "metric": metric,
                "params": count_params(network),
                "macs": count_macs(network, example),
                "latency": measure_latency(network, example, repeats=latency_repeats),
                "channels": _channels(network),
            }
            timings["latency_and_counts"] = time.perf_counter() - t1
            logger.info(f"before pruning: {metric_name}={metric:.4f}, params={before['params']}")
        t0 = time.perf_counter()
        snapshot = parameter_snapshot(network)
        result = prune(network, relevance, stage_ratio, example_inputs=example, **dict(prune_kwargs or {}))
        recalibrate_batchnorm(network, data, max_batches=calibration_batches)
        if optimizer is not None and not fresh_optimizer:
            remap_optimizer(optimizer, snapshot, network, result.history)
        timings["prune"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        metric_pruned = _evaluate(evaluator, metric_name, engines)
        timings["evaluate_pruned"] += time.perf_counter() - t0
        stages_detail.append(
            {
                "stage": stage,
                "epoch": int(trainer.state.epoch or 0),
                "metric_pruned": metric_pruned,
                "ratio_target": stage_ratio,
                "metric_at_relevance": metric,
                "relevance_samples": relevance.num_samples,
                "params_before": result.params_before,
                "params_after": result.params_after,
                "macs_before": result.macs_before,
                "macs_after": result.macs_after,
                "channel_ratio": result.channel_ratio,
            }
        )
        logger.info(
            f"pruning stage {stage}/{stages} ({method}): params {result.params_before} -> {result.params_after}, "
            f"{metric_name} {metric_pruned:.4f}"
        )
        if stage < stages:
            t0 = time.perf_counter()
            _prepare_optimizer(trainer, network, fresh_optimizer, finetune_lr)
            _finetune(trainer, stage_epochs)
            timings["finetune"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    _prepare_optimizer(trainer, network, fresh_optimizer, finetune_lr)
    _finetune(trainer, finetune_epochs)
    timings["finetune"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    metric_after = _evaluate(evaluator, metric_name, engines)
    timings["evaluate_after"] = time.perf_counter() - t0

    device = next(network.parameters()).device
    example = example.to(device)
    t0 = time.perf_counter()
    params_after = count_params(network)
    macs_after = count_macs(network, example)
    latency_after = measure_latency(network, example, repeats=latency_repeats)
    timings["latency_and_counts"] += time.perf_counter() - t0
    channels_after = _channels(network)

    t0 = time.perf_counter()
    extra = {"method": method, "ratio": float(ratio), "stages": stages, "metric_name": metric_name}
    saved = save_pruned_model(
        network, pruned_checkpoint, pruned_torchscript, example, overwrite=overwrite, extra=extra
    )
    timings["save"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start

    report: dict[str, Any] = {
        "method": method,
        "ratio": float(ratio),
        "stages": stages,
        "finetune_epochs": finetune_epochs,
        "stage_epochs": stage_epochs,
        **dict(settings or {}),
        "host_checkpoint": os.path.abspath(host_checkpoint),
        "host_checkpoint_sha256": host_hash,
        "pruned_checkpoint": os.path.abspath(saved[0]),
        "pruned_torchscript": os.path.abspath(saved[1]) if len(saved) > 1 else None,
        "relevance_input_shape": list(example.shape),
        "patch_size": list(fall_back_tuple(roi, tuple(example.shape[2:]))) if roi is not None else None,
        "patch_mode": patch_mode if roi is not None else None,
        "params_before": before["params"],
        "params_after": params_after,
        "params_removed": 1.0 - params_after / max(before["params"], 1),
        "macs_before": before["macs"],
        "macs_after": macs_after,
        "macs_removed": 1.0 - macs_after / max(before["macs"], 1.0),
        "latency_ms_before": before["latency"]["median_ms"],
        "latency_ms_after": latency_after["median_ms"],
        "latency": {k: v for k, v in latency_after.items() if not k.endswith("_ms")},
        "latency_detail": {"before": before["latency"], "after": latency_after},
        "metric_name": metric_name,
        "metric_before": before["metric"],
        "metric_pruned": metric_pruned,
        "metric_after": metric_after,
        "per_layer": [
            {"name": n, "channels_before": c, "channels_after": channels_after.get(n, 0)}
            for n, c in before["channels"].items()
        ],
        "stages_detail": stages_detail,
        "timings_s": timings,
        "versions": package_versions(),
    }
    paths = write_prune_report(report, report_dir, "prune_report")
    if _sha256(host_checkpoint) != host_hash:
        raise RuntimeError(
            f"the host checkpoint {host_checkpoint} changed during pruning: some handler of the host bundle wrote it; "
            "redirect that handler's folder away from it"
        )
    logger.info(
        f"pruned {before['params']} -> {params_after} params; {metric_name} {before['metric']:.4f} -> "
        f"{metric_pruned:.4f} (pruned) -> {metric_after:.4f} (fine-tuned); wrote {saved} and {paths[0]}"
    )
    return report


def _prepare_optimizer(trainer: Any, network: nn.Module, fresh: bool, lr: float | None) -> None:
    """Point the trainer's optimizer at the pruned parameters (fresh one if asked) and apply ``lr``."""
    optimizer = getattr(trainer, "optimizer", None)
    if optimizer is None:
        return
    if fresh:
        params = [p for p in network.parameters() if p.requires_grad]
        optimizer = type(optimizer)(params, **optimizer.defaults)
        trainer.optimizer = optimizer
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = float(lr)


def evaluate_pruned(
    network: nn.Module,
    evaluator: Any,
    pruned_checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    key_metric: str | Mapping | None = None,
) -> dict[str, Any]:
    """Load a pruned checkpoint into the host network (a fresh process is fine) and run the host evaluator.

    Args:
        network: the host's unpruned network (``@network``, built from ``network_def``); reshaped in place.
        evaluator: the host's evaluator on that network.
        pruned_checkpoint: the file ``prune_host_bundle`` wrote.
        output_dir: ``prune_evaluate.json`` (metric name, value, params, checkpoint) is written here (replaced).
        key_metric: as for ``prune_host_bundle``.

    Returns:
        ``{"metric_name", "metric", "params", "pruned_checkpoint"}``.
    """
    device = next(network.parameters()).device
    load_pruned(pruned_checkpoint, network_def=network, map_location=device)
    name = _metric_name(evaluator, key_metric)
    metric = _evaluate(evaluator, name, [evaluator])
    out = {
        "metric_name": name,
        "metric": metric,
        "params": count_params(network),
        "pruned_checkpoint": str(pruned_checkpoint),
    }
    path = Path(output_dir) / "prune_evaluate.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(out, indent=2)
    atomic_write(path, lambda f: f.write(text.encode()), overwrite=True)
    logger.info(f"pruned network from {pruned_checkpoint}: {name}={metric:.4f}, params={out['params']}")
    return out
