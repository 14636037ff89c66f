"""Small steps the bundle configs run: setting checks, safe checkpoint load / save, train-if-needed.

Every check runs before any work, so bad input fails fast with a message naming the problem and
nothing on disk is overwritten (``models/model.pt`` is written only when it does not exist yet).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_iaprune.pruning.checkpoint import atomic_write, load_pruned, safe_load
from monai_iaprune.utils.ddp import is_distributed, is_main_process, unwrap_network
from monai_iaprune.utils.outputs import OutputTransaction
from monai_iaprune.utils.settings import as_bool, check_int, check_ratio


def check_prune_settings(method: str, ratio: float, stages: int = 1, finetune_epochs: int = 0) -> None:
    """Raise ValueError for an unknown relevance method, a ratio outside (0, 1), or bad stage / epoch counts."""
    from monai_iaprune.relevance.registry import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available relevance methods: {sorted(METHODS)}")
    check_ratio(ratio)
    check_int(stages, "stages")
    check_int(finetune_epochs, "finetune_epochs", 0)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"bad {name} {value!r}: need a finite number")
    return float(value)


def check_explain_settings(
    explain_weight: float = 0.0,
    explain_explainer: str = "grad_x_input",
    explain_distill_weight: float = 0.0,
    explain_method: str = "ig",
    min_agreement: float | None = None,
    stages: int = 1,
    agreement_ratios: Sequence[float] | None = None,
    explain_feature_weight: float = 0.0,
) -> None:
    """Raise ValueError (naming the setting) for bad explanation-consistency or explanation-budget settings.

    ``explain_weight`` >= 0 (0: off); ``explain_explainer`` a differentiable explainer; ``explain_distill_weight``
    >= 0; ``explain_feature_weight`` (kept-channel feature distillation) >= 0; the report's ``explain_method`` must differ from the training explainer when the term is on (agreement
    measured with the explainer the student was fitted to would be optimistic); ``min_agreement`` null or in
    (0, 1], with ``stages`` 1 (the agreement is measured for one-shot pruning); ``agreement_ratios`` null or
    numbers strictly between 0 and 1.
    """
    from monai_iaprune.relevance.differentiable_maps import DIFFERENTIABLE_EXPLAINERS
    from monai_iaprune.relevance.registry import input_map_methods

    weight = _number(explain_weight, "explain_weight")
    if weight < 0:
        raise ValueError(f"bad explain_weight {explain_weight!r}: need a number >= 0 (0 turns the term off)")
    if explain_explainer not in DIFFERENTIABLE_EXPLAINERS:
        raise ValueError(
            f"bad explain_explainer {explain_explainer!r}: use one of {sorted(DIFFERENTIABLE_EXPLAINERS)}"
        )
    if _number(explain_distill_weight, "explain_distill_weight") < 0:
        raise ValueError(f"bad explain_distill_weight {explain_distill_weight!r}: need a number >= 0")
    if _number(explain_feature_weight, "explain_feature_weight") < 0:
        raise ValueError(
            f"bad explain_feature_weight {explain_feature_weight!r}: need a number >= 0 (0: off)"
        )
    if explain_method not in input_map_methods():
        raise ValueError(f"bad explain_method {explain_method!r}: use one of {input_map_methods()}")
    if weight > 0 and explain_explainer == explain_method:
        raise ValueError(
            f"explain_explainer and explain_method are both {explain_method!r}: the report would measure agreement "
            "with the explainer the network was fine-tuned to match (optimistic); evaluate with another one, "
            "e.g. --explain_method lrp, or train with --explain_explainer grad_x_input"
        )
    if min_agreement is not None:
        if not 0.0 < _number(min_agreement, "min_agreement") <= 1.0:
            raise ValueError(f"bad min_agreement {min_agreement!r}: need a number in (0, 1] or null (off)")
        if stages != 1:
            raise ValueError(
                f"min_agreement needs stages=1 (got {stages!r}): the agreement is measured for one-shot pruning"
            )
    if agreement_ratios is not None:
        if isinstance(agreement_ratios, (str, bytes)) or not isinstance(agreement_ratios, Sequence):
            raise ValueError(f"bad agreement_ratios {agreement_ratios!r}: need a list of ratios or null")
        for r in agreement_ratios:
            check_ratio(r, "agreement_ratios entry")
        if not agreement_ratios:
            raise ValueError("bad agreement_ratios []: need at least one ratio, or null for the defaults")


def check_dataset_dir(dataset_dir: str | os.PathLike | None) -> None:
    """Raise FileNotFoundError when a non-empty ``dataset_dir`` does not exist (empty means the synthetic default)."""
    if dataset_dir in (None, "", "None", "null"):
        return
    if not Path(os.path.expanduser(str(dataset_dir))).exists():
        raise FileNotFoundError(f"dataset_dir does not exist: {dataset_dir}")


def check_writable(paths: Iterable[str | os.PathLike], overwrite: bool = False) -> None:
    """Raise FileExistsError when any of ``paths`` exists and ``overwrite`` is false (checked before any work)."""
    overwrite = as_bool(overwrite, "overwrite")  # "--overwrite false" arrives as the string "false"
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"refusing to overwrite {existing}; move them away or pass --overwrite true")


def save_state_dict(network: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Save ``network.state_dict()`` to ``path`` atomically; refuse to replace an existing file unless ``overwrite``."""
    path = Path(path)
    check_writable([path], overwrite)
    state = network.state_dict()
    atomic_write(path, lambda f: torch.save(state, f), overwrite=True)  # existence checked above
    return path


def load_state_dict(network: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a state-dict checkpoint into ``network``; a checkpoint of another architecture raises a clear error.

    The file is read with ``torch.load(weights_only=True)`` (it never runs code). Accepts a plain state dict or
    a dict with a ``"state_dict"`` / ``"model"`` / ``"network"`` entry.
    """
    path = Path(path)
    ckpt = safe_load(path)
    if isinstance(ckpt, dict):
        for key in ("state_dict", "model", "network"):
            if key in ckpt and isinstance(ckpt[key], dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a state dict")
    own = network.state_dict()
    missing = [k for k in own if k not in ckpt]
    unexpected = [k for k in ckpt if k not in own]
    shapes = [
        f"{k}: {tuple(ckpt[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in ckpt and hasattr(ckpt[k], "shape") and tuple(ckpt[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {path} does not match the architecture of {type(network).__name__} (network_def): "
            f"{len(missing)} missing key(s) {missing[:3]}, {len(unexpected)} unexpected key(s) {unexpected[:3]}, "
            f"{len(shapes)} shape mismatch(es) {shapes[:3]}. Was it saved by another bundle or network_def setting? "
            "Pruned models (model_pruned.pt) load with monai_iaprune.bundle.load_network."
        )
    network.load_state_dict(ckpt)
    return network


def load_network(
    network_def: nn.Module, path: str | os.PathLike, device: torch.device | str = "cpu"
) -> nn.Module:
    """The network for evaluation / inference: a pruned checkpoint (``save_pruned`` format) or a state dict.

    Args:
        network_def: a fresh, unpruned instance of the bundle's network.
        path: ``models/model.pt`` (state dict) or ``models/model_pruned.pt`` (pruned structure + weights).
        device: where to put the network.
    """
    ckpt = safe_load(path)
    if isinstance(ckpt, dict) and "pruned_structure" in ckpt:
        return load_pruned(str(path), network_def=network_def).to(device)
    return load_state_dict(network_def, path).to(device)


def load_or_train(
    network: nn.Module,
    checkpoint: str | os.PathLike,
    trainer: Any = None,
    timings: MutableMapping[str, float] | None = None,
) -> str:
    """Load ``checkpoint`` into ``network`` when it exists, else run ``trainer`` and save it there (never replacing).

    Under ``torch.distributed`` rank 0 decides whether ``checkpoint`` exists (so the ranks cannot disagree); then
    every rank loads it, or every rank runs ``trainer`` (DDP keeps them in sync), rank 0 saves and the others wait.

    Args:
        network: the (unpruned) network the trainer optimises, plain or wrapped in DDP.
        checkpoint: ``models/model.pt``.
        trainer: a MONAI ``SupervisedTrainer`` on ``network``; None: a missing checkpoint is an error.
        timings: receives ``"pretrain"`` or ``"load_checkpoint"`` seconds (e.g. ``PruneReportHandler.timings_s``).

    Returns:
        ``"loaded"`` or ``"trained"``.
    """
    import torch.distributed as dist

    path, network = Path(checkpoint), unwrap_network(network)
    t0 = time.perf_counter()
    exists = [path.exists()]
    if is_distributed():
        dist.broadcast_object_list(exists, src=0)
    if exists[0]:
        load_state_dict(network, path)
        source = "loaded"
    elif trainer is None:
        raise FileNotFoundError(f"checkpoint not found: {path}")
    else:
        trainer.run()
        if is_main_process():
            save_state_dict(network, path)
        if is_distributed():
            dist.barrier()
        source = "trained"
    if timings is not None:
        timings["pretrain" if source == "trained" else "load_checkpoint"] = time.perf_counter() - t0
    return source


def save_pruned_model(
    network: nn.Module,
    path: str | os.PathLike,
    torchscript_path: str | os.PathLike | None,
    example_inputs: torch.Tensor,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
    onnx_path: str | os.PathLike | None = None,
    pt2_path: str | os.PathLike | None = None,
    transaction: OutputTransaction | None = None,
) -> list[str]:
    """Save the pruned network (structure + weights) and its optional exports as one transaction; return the paths.

    Every file is written under a temporary name first (checkpoint, TorchScript, ONNX, ``torch.export``); only when
    all are written (and each export checked against the eager network) are they renamed into place, so a failure
    leaves none of them and no temporary file.

    Args:
        network: the pruned network (DDP is unwrapped).
        path: the pruned checkpoint (``save_pruned`` format).
        torchscript_path, onnx_path, pt2_path: the exports (None: not written). ONNX needs the optional packages
            ``onnx``, ``onnxscript`` and ``onnxruntime`` (``pip install monai-iaprune[export]``).
        example_inputs: one input batch for tracing and the export checks.
        overwrite: replace existing files; otherwise ``FileExistsError`` before anything is written.
        extra: plain data stored in the checkpoint.
        transaction: an open ``OutputTransaction`` holding these paths: write to its temporary names and leave the
            commit to its owner (the prune run commits them with the report). None: a transaction of their own.
    """
    from monai_iaprune.pruning.checkpoint import export_torchscript, save_pruned
    from monai_iaprune.pruning.export import export_onnx, export_torch_export

    net, overwrite = unwrap_network(network), as_bool(overwrite, "overwrite")
    targets = [Path(p) for p in (path, torchscript_path, onnx_path, pt2_path) if p]
    if onnx_path:
        check_onnx_available()
    own = transaction is None
    tx = OutputTransaction(targets, overwrite).begin() if own else transaction
    try:
        save_pruned(net, tx.temp(path), extra=extra, overwrite=True)
        example = example_inputs.to(next(net.parameters()).device)
        if torchscript_path:
            export_torchscript(net, tx.temp(torchscript_path), example, overwrite=True)
        if onnx_path:
            export_onnx(net, tx.temp(onnx_path), example, overwrite=True)
        if pt2_path:
            export_torch_export(net, tx.temp(pt2_path), example, overwrite=True)
        if own:
            tx.commit()
    except BaseException:
        tx.abort()
        raise
    finally:
        if own:
            tx.release()
    return [str(p) for p in targets]


def check_onnx_available() -> None:
    """Raise ImportError naming the missing packages when ONNX export (and its onnxruntime check) cannot run."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"export_onnx is true but {', '.join(missing)} is not installed: pip install {' '.join(missing)} "
            "(or pip install monai-iaprune[export]), or pass --export_onnx false"
        )


__all__ = [
    "check_dataset_dir",
    "check_onnx_available",
    "check_prune_settings",
    "check_writable",
    "load_network",
    "load_or_train",
    "load_state_dict",
    "save_pruned_model",
    "save_state_dict",
]
