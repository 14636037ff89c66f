"""Prune any MONAI model-zoo bundle with the generic overlay ``monai_iaprune/configs/prune_overlay.json``.

The overlay is merged on top of the host bundle's ``configs/train.json``. It instantiates the package's handlers
(``RelevanceCollector`` on the host evaluator, ``RelevancePruningHandler`` and ``PruneReportHandler`` on the host
trainer) on the host's own objects, found through the model-zoo key conventions (``network``, ``train#trainer``,
``validate#evaluator``, ``validate#key_metric``, ...; ``--host_<role> @<key>`` overrides point it at other keys).
This module only checks the host config and wires: every check runs before any work, the host's trained
checkpoint (``models/model.pt``) is only read (its bytes are compared at the end), and the host's
``CheckpointSaver`` handlers are paused while the handlers take their own measurements.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.handlers import CheckpointSaver
from monai.inferers import SlidingWindowInferer
from monai.utils import IgniteInfo, min_version, optional_import
from torch import nn

from monai_iaprune.bundle import check_onnx_available, load_or_train, save_pruned_model
from monai_iaprune.handlers import (
    ExplanationConsistencyHandler,
    PatchOutputTransform,
    PruneReportHandler,
    PruneResumeHandler,
    RelevanceCollector,
    RelevancePruningHandler,
)
from monai_iaprune.handlers.patch_output_transform import PATCH_MODES
from monai_iaprune.pruning.checkpoint import atomic_write, load_pruned
from monai_iaprune.pruning.prune import count_params
from monai_iaprune.relevance.registry import METHODS
from monai_iaprune.report.explanation_budget import DEFAULT_RATIOS, AgreementBudget, prune_to_min_agreement
from monai_iaprune.utils.ddp import barrier, is_distributed, is_main_process, unwrap_network, world_size
from monai_iaprune.utils.outputs import OutputTransaction
from monai_iaprune.utils.settings import as_bool, check_int, check_number

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = [
    "HOST_KEYS",
    "HostConfigError",
    "PATCH_MODES",
    "PatchOutputTransform",
    "SaverPause",
    "check_host_config",
    "check_overlay_settings",
    "check_overrides",
    "consistency_handler",
    "evaluate_pruned",
    "evaluator_collector",
    "patch_transform",
    "metric_name",
    "missing_host_keys",
    "prune_host_bundle",
    "resolve_min_agreement",
]

logger = logging.getLogger(__name__)

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


def active_parser() -> Any | None:
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
    """One message per key of ``keys`` (``{overlay key: (role, override example)}``) that ``parser`` (host config +
    overlay + overrides) lacks or that refers to a config id the host does not define; empty when all are defined."""
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


def _run_overrides() -> tuple[dict[str, Any], Any] | None:
    """``(override, config_file)`` of the running ``monai.bundle run`` call (None outside one)."""
    from monai.bundle import scripts

    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code is scripts.run.__code__:
                return dict(frame.f_locals.get("override") or {}), frame.f_locals.get("config_file")
            frame = frame.f_back
    finally:
        del frame
    return None


def unknown_overrides(override: Mapping[str, Any], config_files: Any) -> dict[str, list[str]]:
    """Override ids (``--key value``; nested ``a#b``) that neither ``config_files`` nor the overlay define, each with
    its closest defined names."""
    import difflib
    from importlib import resources

    from monai.bundle import ConfigParser

    defined = [ConfigParser(ConfigParser.load_config_files(config_files))]
    overlay = Path(str(resources.files("monai_iaprune") / "configs" / "prune_overlay.json"))
    defined.append(ConfigParser(json.loads(overlay.read_text())))
    names = sorted({k for p in defined for k in p.get()})
    out = {}
    for key in override:
        ident = str(key).replace("::", "#")
        if not any(ident in p for p in defined):
            out[str(key)] = difflib.get_close_matches(ident.split("#")[0], names, n=3)
    return out


def check_overrides(parser: Any = None) -> None:
    """Raise ValueError naming each command-line override that no config file defines (MONAI would silently add it,
    so ``--ratoi 0.3`` would run with the default ratio). Outside ``monai.bundle run`` it does nothing."""
    found = _run_overrides()
    if not found or not found[0] or found[1] is None:
        return
    unknown = unknown_overrides(*found)
    if unknown:
        hints = "; ".join(f"--{k}" + (f" (did you mean {', '.join('--' + m for m in v)}?)" if v else "")
                          for k, v in unknown.items())  # fmt: skip
        raise ValueError(
            f"unknown setting(s): {hints}. No config file nor the prune overlay defines them, so they would be "
            "ignored; check the spelling (the settings are the top-level keys of the config files and the overlay)"
        )


# the overlay's numeric settings: name -> (integer?, minimum, maximum, minimum excluded, maximum excluded, null allowed)
OVERLAY_RANGES: dict[str, tuple[bool, float | None, float | None, bool, bool, bool]] = {
    "ratio": (False, 0.0, 1.0, True, True, False),
    "stages": (True, 1, None, False, False, False),
    "steps": (True, 1, None, False, False, False),
    "stage_epochs": (True, 0, None, False, False, False),
    "finetune_epochs": (True, 0, None, False, False, False),
    "calibration_batches": (True, 1, None, False, False, True),
    "relevance_batches": (True, 1, None, False, False, True),
    "latency_repeats": (True, 1, None, False, False, False),
    "max_patches": (True, 1, None, False, False, True),
    "min_blocks_per_stage": (True, 0, None, False, False, False),
    "speedup": (False, 1.0, None, True, False, True),
    "finetune_lr": (False, 0.0, None, True, False, True),
    "depth_ratio": (False, 0.0, 1.0, False, True, False),
    "explain_weight": (False, 0.0, None, False, False, False),
    "explain_distill_weight": (False, 0.0, None, False, False, False),
    "explain_feature_weight": (False, 0.0, None, False, False, False),
    "min_agreement": (False, 0.0, 1.0, True, False, True),
}


def check_overlay_settings(parser: Any) -> None:
    """Raise ValueError naming the first of the overlay's numeric settings (``OVERLAY_RANGES``) that is out of its
    range, with the accepted range, or a ``patch_mode`` outside ``PATCH_MODES``, before anything is built."""
    for name, (integer, lo, hi, lo_open, hi_open, nullable) in OVERLAY_RANGES.items():
        if name not in parser:
            continue
        value = parser.get_parsed_content(name)
        if integer:
            check_int(value, name, int(lo), allow_none=nullable)
        else:
            check_number(value, name, lo, hi, min_open=lo_open, max_open=hi_open, allow_none=nullable)
    # used only with patches (a SlidingWindowInferer or patch_size), so a misspelling would otherwise pass unnoticed
    if "patch_mode" in parser and parser.get_parsed_content("patch_mode") not in PATCH_MODES:
        raise ValueError(f"bad patch_mode {parser['patch_mode']!r}: use one of {list(PATCH_MODES)}")


def check_host_config(keys: Mapping[str, tuple[str, str]] = HOST_KEYS) -> None:
    """Raise ``HostConfigError`` (a ``KeyError``) naming each host key the overlay needs but the host bundle lacks (and its override).

    Called as the first expression of the overlay's ``prune`` list, before anything is instantiated, so a bundle
    with other key names fails in a second with the fix instead of deep inside MONAI's reference resolution.
    Outside a running ``ConfigParser`` it does nothing.
    """
    parser = active_parser()
    if parser is None:
        return
    check_overrides(parser)
    check_overlay_settings(parser)
    problems = missing_host_keys(parser, keys)
    if problems:
        raise HostConfigError(
            "the host bundle does not follow the model-zoo key layout the prune overlay expects:\n  - "
            + "\n  - ".join(problems)
        )


# ---------------------------------------------------------------------------------------------------------------
# the host's CheckpointSaver handlers, paused during our own measurement passes (public ignite API only)
# ---------------------------------------------------------------------------------------------------------------
def host_savers() -> list[CheckpointSaver]:
    """Every ``CheckpointSaver`` the running config has instantiated (empty outside a running ``ConfigParser``)."""
    parser = active_parser()
    if parser is None:
        return []
    found: list[CheckpointSaver] = []
    for obj in list(parser.ref_resolver.resolved_content.values()):
        if isinstance(obj, CheckpointSaver) and obj not in found:
            found.append(obj)
    return found


def host_lr_schedulers() -> list[Any]:
    """Every LR scheduler the running config has instantiated, in config order (saved in the resume file)."""
    from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

    parser = active_parser()
    found: list[Any] = []
    for obj in list(parser.ref_resolver.resolved_content.values()) if parser is not None else []:
        obj = getattr(obj, "lr_scheduler", obj)  # MONAI's LrScheduleHandler holds it
        if isinstance(obj, (LRScheduler, ReduceLROnPlateau)) and all(obj is not f for f in found):
            found.append(obj)
    return found


class SaverPause:
    """Detach the host's ``CheckpointSaver`` handlers from the evaluator while our handlers measure, re-attach after.

    Else the host's key-metric saver would store the *unpruned* network as the "best" checkpoint; only the host's own
    validations of the fine-tuning epochs feed it. On the trainer it pauses at the start and at the end of every epoch
    (after the host's validation, before our handlers) and resumes when an epoch starts and when the trainer completes.
    ``savers`` default to every ``CheckpointSaver`` of the running config.
    """

    def __init__(self, evaluator: Any, savers: Sequence[CheckpointSaver] | None = None) -> None:
        self.evaluator = evaluator
        self.savers = list(host_savers() if savers is None else savers)
        self._paused: list[CheckpointSaver] = []

    def pause(self, engine: Any = None) -> None:
        for saver in self.savers:  # the (handler, event) pairs CheckpointSaver.attach registers
            pairs = [
                (h, e)
                for h, e in (
                    (saver.completed, Events.COMPLETED),
                    (saver.exception_raised, Events.EXCEPTION_RAISED),
                    (saver.metrics_completed, Events.EPOCH_COMPLETED),
                    (saver.interval_completed, Events.EPOCH_COMPLETED),
                    (saver.interval_completed, Events.ITERATION_COMPLETED),
                )
                if self.evaluator.has_event_handler(h, e)
            ]
            for h, e in pairs:
                self.evaluator.remove_event_handler(h, e)
            if pairs and saver not in self._paused:
                self._paused.append(saver)

    def resume(self, engine: Any = None) -> None:
        for saver in self._paused:
            saver.attach(self.evaluator)
        self._paused = []

    def attach(self, trainer: Any) -> None:
        """Pause before the handlers attached after this one run, resume for the fine-tuning epochs."""
        trainer.add_event_handler(Events.STARTED, self.pause)
        trainer.add_event_handler(Events.EPOCH_STARTED, self.resume)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.pause)


# ---------------------------------------------------------------------------------------------------------------
# wiring
# ---------------------------------------------------------------------------------------------------------------
def metric_name(evaluator: Any, key_metric: str | Mapping | None) -> str:
    """The key metric's name: first key of the host's ``validate#key_metric`` dict, a name, or (null) the evaluator's."""
    if isinstance(key_metric, (str, Mapping)) and key_metric:
        return key_metric if isinstance(key_metric, str) else str(next(iter(key_metric)))
    name = getattr(evaluator.state, "key_metric_name", None) if key_metric in (None, "") else None
    if name is None:
        raise ValueError(
            f"bad host_key_metric {key_metric!r}: give the host's validate#key_metric, a metric name, or null for "
            "the evaluator's own key metric (key_val_metric)"
        )
    return str(name)


def _sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def patch_transform(
    evaluator: Any,
    size: Sequence[int] | int | None = None,
    mode: str = "foreground",
    max_patches: int | None = None,
) -> PatchOutputTransform | None:
    """Cuts evaluator outputs to patches of ``size``, default the evaluator's ``SlidingWindowInferer.roi_size``
    (None without either: whole images)."""
    inferer = getattr(evaluator, "inferer", None)
    size = inferer.roi_size if size is None and isinstance(inferer, SlidingWindowInferer) else size
    return None if size is None else PatchOutputTransform(size, mode, max_patches)


def evaluator_collector(
    method: str, patches: PatchOutputTransform | None = None, **kwargs: Any
) -> RelevanceCollector | None:
    """A ``RelevanceCollector`` (reading ``patches`` of the outputs), None for data-free methods."""
    if method in METHODS and METHODS[method].data_free:
        return None
    return RelevanceCollector(method, **kwargs, **({"output_transform": patches} if patches else {}))


def consistency_handler(
    weight: float,
    explainer: str = "grad_x_input",
    distill_weight: float = 0.0,
    explainer_kwargs: Mapping[str, Any] | None = None,
    feature_weight: float = 0.0,
) -> ExplanationConsistencyHandler | None:
    """The overlay's ``explain_weight`` / ``explain_feature_weight`` as a handler: None when both are 0 (off), else
    an ``ExplanationConsistencyHandler`` adding the terms from epoch 1, the first epoch after the overlay's first
    stage (which prunes at epoch 0); ``prune_host_bundle`` gives it the unpruned network as teacher before the
    trainer runs."""
    if not float(weight) > 0 and not float(feature_weight) > 0:
        return None
    return ExplanationConsistencyHandler(
        float(weight),
        explainer=explainer,
        start_epoch=1,
        distill_weight=float(distill_weight),
        explainer_kwargs=dict(explainer_kwargs or {}),
        feature_weight=float(feature_weight),
    )


def resolve_min_agreement(
    network: nn.Module,
    trainer: Any,
    evaluator: Any,
    pruning_handler: RelevancePruningHandler,
    report_handler: PruneReportHandler,
    min_agreement: float,
    ratios: Sequence[float] | None = None,
) -> AgreementBudget:
    """Set ``pruning_handler``'s ratio to the largest of ``ratios`` whose explanations still agree at ``min_agreement``.

    Runs ``prune_to_min_agreement`` on a copy of the trained ``network`` (before the trainer runs): relevance from
    the pruning handler (its collector runs the evaluator), agreement with the report's ``explain_method`` on the
    report's explanation data (the evaluator's batches, or its patches), BatchNorm re-calibrated on the handler's
    data, ``ratio`` meaning what the handler's ``prune_kwargs`` ``target`` says (default parameters). When the
    handler's ``cost_aware`` is unset both channel rankings are tried (``cost_aware="either"``) and the handler
    prunes with the chosen one. The choice and the measured agreement go into the report's settings.

    Raises:
        AgreementNotReached: no ratio keeps the agreement (raised before any training).
    """
    # the handler's own relevance step (its collector runs the evaluator), not a second copy of it
    relevance = pruning_handler._relevance(trainer, network)
    prune_kwargs = dict(pruning_handler.prune_kwargs)
    prune_kwargs.pop("target", None)  # legacy spelling of prune_target, already folded into it by the handler
    prune_kwargs.pop("cost_aware", None)  # the handler's own setting below decides
    target = pruning_handler.prune_target
    # the handler's ranking when set; else both rankings are tried at each ratio (the one that keeps the agreement,
    # the higher if both do), and the handler then prunes with the chosen one
    cost_aware = pruning_handler.cost_aware
    if cost_aware is None and target != "channels":
        cost_aware = "either"
    explain_kwargs = report_handler.explain_kwargs
    map_kwargs = {"n_steps": explain_kwargs["n_steps"]} if "n_steps" in explain_kwargs else {}
    budget = prune_to_min_agreement(
        network,
        relevance,
        report_handler.explain_data or evaluator.data_loader,
        min_agreement=float(min_agreement),
        explainer=report_handler.explain_method,
        ratios=list(ratios) if ratios else DEFAULT_RATIOS,
        target=target,
        calibration_data=pruning_handler._data(trainer),
        example_inputs=pruning_handler.example_input(trainer, relevance),
        max_calibration_batches=pruning_handler.max_batches,
        image_key=pruning_handler.image_key,
        label_key=pruning_handler.label_key,
        map_kwargs=map_kwargs,
        ignored_layers=pruning_handler.ignored_layers,
        cost_aware=cost_aware,
        **prune_kwargs,
    )
    # one stage of one step, widths only (checked by prune_host_bundle): every budget fraction is the ratio
    pruning_handler.ratio = pruning_handler.stage_ratio = pruning_handler.step_ratio = budget.ratio
    pruning_handler.cost_aware = budget.cost_aware
    report_handler.settings.update(
        min_agreement=float(min_agreement),
        min_agreement_explainer=report_handler.explain_method,
        min_agreement_target=target,
        min_agreement_ratio=budget.ratio,
        min_agreement_measured=budget.agreement,
        min_agreement_tried=[list(t) for t in budget.tried],
        min_agreement_cost_aware=budget.cost_aware,
        min_agreement_tried_cost_aware=list(budget.tried_cost_aware),
    )
    logger.info(
        f"min_agreement={min_agreement}: ratio {budget.ratio} ({target}) keeps the {report_handler.explain_method} "
        f"agreement at {budget.agreement:.4f}, cost_aware={budget.cost_aware} (tried {budget.tried}, rankings "
        f"{budget.tried_cost_aware})"
    )
    return budget


def prune_host_bundle(
    network: nn.Module,
    trainer: Any,
    evaluator: Any,
    pruning_handler: RelevancePruningHandler,
    report_handler: PruneReportHandler,
    host_checkpoint: str | os.PathLike,
    pruned_checkpoint: str | os.PathLike,
    pruned_torchscript: str | os.PathLike | None = None,
    finetune_epochs: int = 1,
    stage_epochs: int = 1,
    train_if_missing: bool = False,
    overwrite: bool = False,
    pruned_onnx: str | os.PathLike | None = None,
    pruned_pt2: str | os.PathLike | None = None,
    export_onnx: bool = False,
    export_pt2: bool = False,
    resume: bool = False,
    resume_file: str | os.PathLike | None = None,
    consistency: ExplanationConsistencyHandler | None = None,
    min_agreement: float | None = None,
    agreement_ratios: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Check the host, load (or train) its checkpoint, attach the handlers, run the host trainer, save the result.

    The handlers do the work: at the trainer's start ``report_handler`` evaluates and measures the trained network
    (the evaluator pass also feeds ``pruning_handler``'s collector), ``pruning_handler`` prunes the first stage
    (relevance -> selection -> physical prune -> BatchNorm -> optimizer); later stages run every ``stage_epochs``
    epochs; after ``finetune_epochs`` more epochs ``report_handler`` evaluates, measures and writes the report.
    Then the pruned network is saved (rank 0) and ``host_checkpoint`` is checked to hold the same bytes.

    Args:
        network: the host's network (``@network``), shared by ``trainer`` and ``evaluator``; pruned in place.
        trainer: the host's ``SupervisedTrainer`` (``@train#trainer``).
        evaluator: the host's ``SupervisedEvaluator`` (``@validate#evaluator``).
        pruning_handler: its ``prune_epochs`` must be ``[0, stage_epochs, 2 * stage_epochs, ...]``.
        report_handler: writes ``prune_report.json`` / ``.md``; receives the host checkpoint fields.
        host_checkpoint: the trained weights (``models/model.pt``): read only.
        pruned_checkpoint, pruned_torchscript: where the pruned network goes (``save_pruned`` format; TorchScript).
        finetune_epochs: host-trainer epochs after the last stage.
        stage_epochs: host-trainer epochs between two stages.
        train_if_missing: run the host trainer and save ``host_checkpoint`` when it does not exist (never replacing).
        overwrite: replace existing pruned outputs and report (never ``host_checkpoint``).
        consistency: an ``ExplanationConsistencyHandler`` (``consistency_handler``) to fine-tune with; its teacher
            is a frozen copy of the loaded, unpruned network.
        min_agreement: when set, ``resolve_min_agreement`` picks the pruning ratio among ``agreement_ratios``
            (default ``DEFAULT_RATIOS``) after the checkpoint is loaded and before the trainer runs.
        pruned_onnx, pruned_pt2: ONNX / ``torch.export`` files, written when ``export_onnx`` / ``export_pt2``
            (default paths: beside ``pruned_checkpoint`` with the suffix ``.onnx`` / ``.pt2``).
        export_onnx, export_pt2: also write those exports (``as_bool``; ONNX needs onnx, onnxscript, onnxruntime).
        resume: continue a killed run from ``resume_file`` (``as_bool``); a missing file is an error.
        resume_file: the resume checkpoint, default ``resume.pt`` beside ``pruned_checkpoint``; written at every
            trainer epoch start and removed when the run's outputs are in place.

    Note:
        The outputs are one transaction (``monai_iaprune.utils.outputs.OutputTransaction``): before any work every
        output folder is checked writable, locked (``.monai_iaprune.lock``; a second run fails at once naming the
        first's pid) and cleaned of a killed run's temporary files, and any existing output (checkpoint, exports,
        report ``.json`` / ``.md``, figures folder) is refused unless ``overwrite``. Everything is written under
        temporary names and renamed into place at the end, the report last.

    Returns:
        The report dict (also written by ``report_handler``).

    Raises:
        FileNotFoundError / FileExistsError / ValueError: no checkpoint, outputs exist (without ``overwrite``), bad
            settings or checkpoint, a host ``CheckpointSaver`` writing into the host checkpoint's folder.
        RuntimeError: ``host_checkpoint`` changed during the run.
    """
    train_if_missing = as_bool(train_if_missing, "train_if_missing")
    check_int(finetune_epochs, "finetune_epochs", 0)
    check_int(stage_epochs, "stage_epochs", 0)
    stages = pruning_handler.stages
    epochs = (stages - 1) * stage_epochs + finetune_epochs
    if epochs < 1:
        raise ValueError(
            "the host trainer runs the pruning: set finetune_epochs (or stage_epochs) to at least 1"
        )
    if pruning_handler.prune_epochs != [k * stage_epochs for k in range(stages)]:
        raise ValueError(f"pruning_handler.prune_epochs must be [0, {stage_epochs}, ...] (stage_epochs)")
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
    if world_size() > 1 and min_agreement is not None:
        raise ValueError(
            "min_agreement is not supported under torch.distributed yet (each rank would measure agreement on its "
            "own shard): run it once single-process and pass the chosen --ratio"
        )
    if min_agreement is not None:
        for name, value, ok in (
            ("prune_target", pruning_handler.prune_target, pruning_handler.prune_target != "latency"),
            ("depth_ratio", pruning_handler.depth_ratio, pruning_handler.depth_ratio == 0),
            ("steps", pruning_handler.steps, pruning_handler.steps == 1),
        ):
            if not ok:
                raise ValueError(
                    "min_agreement measures one-shot channel pruning by a params / MACs / channels ratio: it does "
                    f"not combine with {name}={value!r}"
                )
    host_checkpoint = Path(host_checkpoint)
    if not host_checkpoint.is_file() and not train_if_missing:
        raise FileNotFoundError(
            f"no trained host checkpoint at {host_checkpoint}: train the host bundle first "
            "(python -m monai.bundle run --config_file configs/train.json) or pass --host_checkpoint <path>"
        )
    export_onnx, export_pt2 = as_bool(export_onnx, "export_onnx"), as_bool(export_pt2, "export_pt2")
    resume = as_bool(resume, "resume")
    if export_onnx:
        check_onnx_available()
    pruned_checkpoint = Path(pruned_checkpoint)
    pruned_onnx = (pruned_onnx or pruned_checkpoint.with_suffix(".onnx")) if export_onnx else None
    pruned_pt2 = (pruned_pt2 or pruned_checkpoint.with_suffix(".pt2")) if export_pt2 else None
    resume_file = Path(resume_file or pruned_checkpoint.parent / "resume.pt")
    if resume and not resume_file.is_file():
        raise FileNotFoundError(
            f"--resume true but there is no resume file {resume_file}: the earlier run finished (its outputs are "
            "in place) or never started pruning; run without --resume true to start afresh"
        )
    report_dir, name = Path(report_handler.output_dir), report_handler.name
    models = [p for p in (pruned_checkpoint, pruned_torchscript, pruned_onnx, pruned_pt2) if p]
    reports = [
        report_dir / report_handler.figures_dir,
        report_dir / f"{name}.md",
        report_dir / f"{name}.json",
    ]
    outputs = [Path(p) for p in models] + reports  # commit order: the report last
    if Path(pruned_checkpoint).resolve() == host_checkpoint.resolve():
        raise ValueError(f"pruned_checkpoint is the host checkpoint {host_checkpoint}; choose another path")
    pause = SaverPause(evaluator)
    for saver in pause.savers:
        if Path(saver.save_dir).resolve() == host_checkpoint.resolve().parent:
            raise ValueError(
                f"a CheckpointSaver of the host bundle writes into {saver.save_dir}, the folder of the trained "
                f"checkpoint {host_checkpoint.name}; fine-tuning would overwrite it. Redirect it (the overlay sets "
                "ckpt_dir to models/pruned; if the saver uses another key, override that key)"
            )

    # checks, locks and stale temporary files before any work (rank 0 writes; the others only compute)
    tx = _open_outputs(outputs, overwrite)
    final_report_dir = report_handler.output_dir
    try:
        return _prune_in_transaction(
            tx, network, trainer, evaluator, pruning_handler, report_handler, pause, host_checkpoint,
            pruned_checkpoint, pruned_torchscript, pruned_onnx, pruned_pt2, models, reports, resume, resume_file,
            finetune_epochs, stage_epochs, epochs, train_if_missing, overwrite,
            consistency=consistency, min_agreement=min_agreement, agreement_ratios=agreement_ratios,
        )  # fmt: skip
    finally:
        report_handler.output_dir = final_report_dir
        if tx is not None:
            tx.__exit__(None, None, None)


def _open_outputs(outputs: Sequence[Path], overwrite: bool) -> OutputTransaction | None:
    """Rank 0 opens the output transaction; its error is raised on every rank, so no rank waits in a collective."""
    tx, error = None, [None]
    if is_main_process():
        try:
            tx = OutputTransaction(outputs, overwrite).begin()
        except Exception as e:
            if not is_distributed():
                raise
            error = [f"{type(e).__name__}: {e}"]
            first = e
    if is_distributed():
        import torch.distributed as dist

        dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        if is_main_process():
            raise first
        raise RuntimeError(f"rank 0 could not open the prune run's outputs: {error[0]}")
    return tx


def _prune_in_transaction(
    tx: OutputTransaction | None,
    network: nn.Module,
    trainer: Any,
    evaluator: Any,
    pruning_handler: RelevancePruningHandler,
    report_handler: PruneReportHandler,
    pause: SaverPause,
    host_checkpoint: Path,
    pruned_checkpoint: Path,
    pruned_torchscript: str | os.PathLike | None,
    pruned_onnx: str | os.PathLike | None,
    pruned_pt2: str | os.PathLike | None,
    models: list,
    reports: list[Path],
    resume: bool,
    resume_file: Path,
    finetune_epochs: int,
    stage_epochs: int,
    epochs: int,
    train_if_missing: bool,
    overwrite: bool,
    *,
    consistency: ExplanationConsistencyHandler | None = None,
    min_agreement: float | None = None,
    agreement_ratios: Sequence[float] | None = None,
) -> dict[str, Any]:
    """``prune_host_bundle`` once its checks passed and its output folders are locked."""
    stages = pruning_handler.stages
    if tx is not None:  # the report handler writes into a scratch folder, moved into place at the commit
        report_handler.output_dir = str(tx.scratch(reports[0].parent, "prune_report"))
    load_or_train(network, host_checkpoint, trainer if train_if_missing else None, report_handler.timings_s)
    host_hash = _sha256(host_checkpoint)
    resume_settings = {
        "method": pruning_handler.method,
        "ratio": pruning_handler.ratio,
        "stages": stages,
        "stage_epochs": stage_epochs,
        "finetune_epochs": finetune_epochs,
        "host_checkpoint_sha256": host_hash,
    }
    if not resume and resume_file.exists():
        logger.warning(f"starting afresh: the resume file {resume_file} of an earlier run will be replaced "
                       "(pass --resume true to continue that run instead)")  # fmt: skip
    resumer = PruneResumeHandler(resume_file, pruning_handler, resume, resume_settings, host_lr_schedulers())
    report_handler.settings.update(
        finetune_epochs=finetune_epochs,
        stage_epochs=stage_epochs,
        host_checkpoint=os.path.abspath(host_checkpoint),
        host_checkpoint_sha256=host_hash,
        pruned_checkpoint=os.path.abspath(pruned_checkpoint),
        pruned_torchscript=os.path.abspath(pruned_torchscript) if pruned_torchscript else None,
        pruned_onnx=os.path.abspath(pruned_onnx) if pruned_onnx else None,
        pruned_pt2=os.path.abspath(pruned_pt2) if pruned_pt2 else None,
        world_size=world_size(),
    )
    collector = pruning_handler.collector
    transform = getattr(collector, "output_transform", None)
    patched = isinstance(transform, PatchOutputTransform)
    report_handler.settings.update(
        patch_size=list(transform.roi_size) if patched and not isinstance(transform.roi_size, int) else None,
        patch_mode=transform.mode if patched else None,
    )

    # order matters: ignite runs the handlers of one event in the order they were attached
    if collector is not None:
        collector.attach(evaluator)
    if min_agreement is not None:
        pause.pause()  # the agreement search runs the evaluator (relevance) outside the trainer
        try:
            resolve_min_agreement(
                network, trainer, evaluator, pruning_handler, report_handler, min_agreement, agreement_ratios
            )
        finally:
            pause.resume()
    if consistency is not None:
        consistency.set_teacher(network)  # the trained, unpruned network (the first stage prunes at STARTED)
        consistency.attach(trainer)
        per_epoch: list[float] = []
        per_epoch_features: list[float] = []
        report_handler.settings.update(
            explain_weight=consistency.weight,
            explain_explainer=consistency.loss.explainer,
            explain_distill_weight=consistency.loss.distill_weight,
            explain_feature_weight=consistency.feature_weight,
            explanation_consistency_per_epoch=per_epoch,
            feature_distillation_per_epoch=per_epoch_features,
        )

        # attached before the report handler, which writes the report at the last epoch's end
        def record_term(engine: Any) -> None:
            if "explanation_consistency" in engine.state.metrics:
                per_epoch.append(float(engine.state.metrics["explanation_consistency"]))
            if "feature_distillation" in engine.state.metrics:
                per_epoch_features.append(float(engine.state.metrics["feature_distillation"]))

        trainer.add_event_handler(Events.EPOCH_COMPLETED, record_term)
    pause.attach(trainer)
    report_handler.attach(trainer)
    resumer.attach(
        trainer
    )  # after the report's unpruned snapshot, before the pruning handler's stage at STARTED
    pruning_handler.attach(trainer)
    trainer.add_event_handler(Events.COMPLETED, pause.resume)
    # a new run from epoch 0 (stage 1 at STARTED), also after the trainer pre-trained the network; or the resumed one
    start = resumer.trainer_state() or (0, 0)
    trainer.state.epoch, trainer.state.iteration, trainer.state.max_epochs = *start, epochs
    report_handler.settings["resumed_from_epoch"] = start[0] if resume else None
    trainer.run()

    extra = {"method": pruning_handler.method, "ratio": pruning_handler.ratio, "stages": stages}
    if tx is not None:
        save_pruned_model(
            network, pruned_checkpoint, pruned_torchscript, report_handler.example_inputs, overwrite, extra,
            onnx_path=pruned_onnx, pt2_path=pruned_pt2, transaction=tx,
        )  # fmt: skip
        scratch = Path(report_handler.output_dir)
        for final in reports:
            tx.temp(final, scratch / final.name)
        tx.commit()
        resumer.finish()
    barrier()
    if _sha256(host_checkpoint) != host_hash:
        raise RuntimeError(
            f"the host checkpoint {host_checkpoint} changed during pruning: some handler of the host bundle wrote it; "
            "redirect that handler's folder away from it"
        )
    return dict(report_handler.report or {})


def evaluate_pruned(
    network: nn.Module,
    evaluator: Any,
    pruned_checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    key_metric: str | Mapping | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Load a pruned checkpoint into the host network (a fresh process is fine) and run the host evaluator.

    Args:
        network: the host's unpruned network (``@network``, built from ``network_def``); reshaped in place.
        evaluator: the host's evaluator on that network.
        pruned_checkpoint: the file the overlay's ``prune`` wrote.
        output_dir: ``prune_evaluate.json`` (metric name, value, params, checkpoint) is written here.
        key_metric: as for ``prune_host_bundle``.
        overwrite: replace an existing ``prune_evaluate.json`` (``as_bool``); otherwise refuse before any work.

    Note:
        The file is one output transaction (``OutputTransaction``), as the prune run's outputs: the folder is
        checked writable and locked before the checkpoint is loaded, the file written under a temporary name and
        renamed into place at the end (rank 0).

    Returns:
        ``{"metric_name", "metric", "params", "pruned_checkpoint"}``.
    """
    path = Path(output_dir) / "prune_evaluate.json"
    if not Path(pruned_checkpoint).is_file():
        raise FileNotFoundError(
            f"no pruned checkpoint {pruned_checkpoint}: run the overlay's prune first (or set pruned_checkpoint)"
        )
    tx = _open_outputs([path], overwrite)
    try:
        out = _evaluate(network, evaluator, pruned_checkpoint, key_metric)
        if tx is not None:
            text = json.dumps(out, indent=2)
            atomic_write(tx.temp(path), lambda f: f.write(text.encode()), overwrite=True)
            tx.commit()
    finally:
        if tx is not None:
            tx.__exit__(None, None, None)
    return out


def _evaluate(
    network: nn.Module, evaluator: Any, pruned_checkpoint: str | os.PathLike, key_metric: str | Mapping | None
) -> dict[str, Any]:
    device = next(network.parameters()).device
    load_pruned(pruned_checkpoint, network_def=network, map_location=device)
    name = metric_name(evaluator, key_metric)
    pause = SaverPause(evaluator)
    pause.pause()
    try:
        evaluator.run()
    finally:
        pause.resume()
    if name not in evaluator.state.metrics:
        raise KeyError(f"the host evaluator computed no metric {name!r}; set host_key_metric")
    metric = float(evaluator.state.metrics[name])
    out = {
        "metric_name": name,
        "metric": metric,
        "params": count_params(network),
        "pruned_checkpoint": str(pruned_checkpoint),
    }
    logger.info(f"pruned network from {pruned_checkpoint}: {name}={metric:.4f}, params={out['params']}")
    return out
