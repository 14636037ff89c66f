"""Save and load pruned networks, whose shapes no longer match the unpruned ``network_def``.

A pruned checkpoint holds the weights (``state_dict``) and the recorded structure of every module
(parameter / buffer shapes and the channel attributes torch-pruning rewrote, e.g. ``out_channels``,
``num_features``, ``groups``) as plain data. A fresh process rebuilds the pruned network from a fresh
``network_def`` plus that structure; every file is read with ``torch.load(weights_only=True)``, so loading a
checkpoint never runs code from it. Files of the first format also held a pickled module: it is never unpickled.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_iaprune.pruning.depth import replay_removed_blocks
from monai_iaprune.utils.outputs import file_mode_for

__all__ = [
    "FORMAT",
    "pruned_structure",
    "apply_pruned_structure",
    "save_pruned",
    "load_pruned",
    "export_torchscript",
    "atomic_write",
    "safe_load",
]

FORMAT = "monai_iaprune.pruned/2"
LEGACY_FORMATS = ("monai_iaprune.pruned/1",)
_PRIMITIVES = (bool, int, float, str, type(None))
_SKIP_ATTRS = {"training"}


def _plain(value: Any) -> bool:
    return isinstance(value, _PRIMITIVES) or (isinstance(value, (tuple, list)) and all(map(_plain, value)))


def _as_data(value: Any) -> Any:
    """``value`` with enum members of str / int / float (MONAI's ``StrEnum`` settings) as their plain values.

    A safe load (``weights_only=True``) refuses any class it does not know, enums included.
    """
    if isinstance(value, (tuple, list)):
        items = [_as_data(v) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    for base in (bool, int, float, str):
        if isinstance(value, base) and type(value) is not base:
            return base.__str__(value) if base is str else base(value)
    return value


def pruned_structure(model: nn.Module) -> dict[str, dict[str, Any]]:
    """What pruning changed in each module of ``model``, as data ``torch.load(weights_only=True)`` reads.

    Returns:
        ``{module name: {"params": {name: shape | None}, "buffers": {name: shape | None},
        "nonpersistent": {name: tensor}, "attrs": {name: plain value}}}``; ``attrs`` are the module's
        own public attributes of plain types (ints, floats, strings, tuples of them).
    """
    out: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        nonpersistent = getattr(m, "_non_persistent_buffers_set", set())
        out[name] = {
            "type": f"{type(m).__module__}.{type(m).__qualname__}",
            "params": {n: None if p is None else list(p.shape) for n, p in m._parameters.items()},
            "buffers": {
                n: None if b is None else list(b.shape)
                for n, b in m._buffers.items()
                if n not in nonpersistent
            },
            "nonpersistent": {
                n: b.detach().cpu().clone()
                for n, b in m._buffers.items()
                if n in nonpersistent and b is not None
            },
            "attrs": {
                k: _as_data(v)
                for k, v in vars(m).items()
                if not k.startswith("_") and k not in _SKIP_ATTRS and _plain(v)
            },
        }
    return out


@torch.no_grad()
def apply_pruned_structure(model: nn.Module, structure: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """Reshape a fresh (unpruned) ``model`` in place to a recorded pruned structure; weights are left undefined.

    Parameters keep their identity (only ``.data`` is replaced), so an optimizer built on ``model`` still
    holds them and can load a matching optimizer state dict afterwards.

    Args:
        model: a freshly built network of the same definition as the pruned one.
        structure: ``pruned_structure(pruned_model)``.

    Returns:
        ``model``, now with the pruned shapes; load the pruned ``state_dict`` into it next.

    Raises:
        ValueError: ``model`` does not have the recorded modules / parameters (a different network_def).
    """
    replay_removed_blocks(model, structure)  # depth pruning: removed blocks first, so their names resolve
    modules = dict(model.named_modules())
    missing = [n for n in structure if n not in modules]
    if missing:
        raise ValueError(
            f"the recorded pruned structure names {len(missing)} module(s) that {type(model).__name__} does not have "
            f"(e.g. {missing[:3]}); network_def must build the same architecture the pruned network came from"
        )
    for name, rec in structure.items():
        m = modules[name]
        for pname, shape in rec.get("params", {}).items():
            p = m._parameters.get(pname)
            if (p is None) != (shape is None):
                raise ValueError(
                    f"parameter {name}.{pname} is {'absent' if p is None else 'present'} in network_def "
                    "but the other way round in the pruned network"
                )
            if p is not None and list(p.shape) != list(shape):
                p.data = torch.empty(shape, dtype=p.dtype, device=p.device)
        for bname, shape in rec.get("buffers", {}).items():
            b = m._buffers.get(bname)
            if b is not None and shape is not None and list(b.shape) != list(shape):
                m._buffers[bname] = torch.empty(shape, dtype=b.dtype, device=b.device)
        for bname, value in rec.get("nonpersistent", {}).items():
            b = m._buffers.get(bname)
            m._buffers[bname] = value.to(b.device if b is not None else "cpu").clone()
        for attr, value in rec.get("attrs", {}).items():
            if attr in vars(m) and vars(m)[attr] != value:
                setattr(m, attr, value)
    return model


def atomic_write(
    path: str | os.PathLike, write: Callable[[io.BufferedWriter], None], overwrite: bool = False
) -> Path:
    """Write a file through a temporary file in the same directory, then ``os.replace`` it into place.

    A failure while writing leaves neither a partial file at ``path`` nor a temporary file behind, and
    an existing ``path`` untouched. The file gets the permissions of the one it replaces, or a new file's
    (``file_mode_for``), not the temporary file's ``0o600``.

    Args:
        path: destination file.
        write: called with the open binary temporary file.
        overwrite: replace an existing ``path``; otherwise refuse.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"refusing to overwrite existing file {str(path)!r}; pass overwrite=True to replace it"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode_for(path))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def save_pruned(
    model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None, *, overwrite: bool = False
) -> Path:
    """Save a pruned network so a fresh process can load it although ``network_def`` has other shapes.

    Writes ``{"format", "state_dict", "pruned_structure", "extra"}`` atomically: tensors and plain data only,
    so ``load_pruned`` reads it with ``torch.load(weights_only=True)``.

    Args:
        model: the pruned network (unwrap ``DistributedDataParallel`` first).
        path: destination ``.pt`` file.
        extra: anything else to store (e.g. ``PruneResult.as_dict()``, the relevance method): tensors and
            plain Python values (numbers, strings, lists, dicts, None) only.
        overwrite: replace an existing file; otherwise ``FileExistsError``.

    Raises:
        TypeError: ``extra`` holds something other than tensors and plain values (a safe load would refuse it).
    """
    _check_plain_extra(extra or {})
    payload: dict[str, Any] = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "pruned_structure": pruned_structure(model),
        "extra": dict(extra or {}),
    }
    return atomic_write(path, lambda f: torch.save(payload, f), overwrite=overwrite)


def _check_plain_extra(value: Any, where: str = "extra") -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key of type {type(k).__name__}; use str keys")
            _check_plain_extra(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain_extra(v, f"{where}[{i}]")
    elif not isinstance(value, (torch.Tensor, *_PRIMITIVES)):
        raise TypeError(
            f"{where} is a {type(value).__name__}: a pruned checkpoint stores tensors and plain values only "
            "(numbers, strings, lists, dicts, None), so that it loads without running code"
        )


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: never runs code from the file; a refusal names the file.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file holds Python objects other than tensors and plain data (or is no torch file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file and the reason
        raise ValueError(
            f"refusing to load {str(path)!r}: a safe load (weights_only=True) failed ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Checkpoints are never unpickled with code; re-save a "
            "trusted model as a plain state dict (torch.save(net.state_dict(), path)) or with save_pruned"
        ) from e


def _find_structure(ckpt: Mapping[str, Any], network_key: str) -> tuple[dict, dict, dict]:
    """``(state_dict, structure, extra)`` from a ``save_pruned`` file or a CheckpointSaver file."""
    if "pruned_structure" in ckpt and "state_dict" in ckpt:
        return ckpt["state_dict"], ckpt["pruned_structure"], ckpt.get("extra", {})
    # a MONAI CheckpointSaver file: {network_key: state_dict, <handler key>: RelevancePruningHandler.state_dict()}
    if network_key not in ckpt:
        raise KeyError(
            f"checkpoint has neither a save_pruned payload nor a {network_key!r} entry (keys: {sorted(ckpt)}); "
            "set network_key to the CheckpointSaver save_dict key of the network"
        )
    for key, value in ckpt.items():
        if isinstance(value, Mapping) and "pruned_structure" in value:
            return (
                ckpt[network_key],
                value["pruned_structure"],
                {"pruning": value.get("history", []), "key": key},
            )
    raise KeyError(
        "checkpoint holds no pruned structure: add the RelevancePruningHandler to the CheckpointSaver save_dict "
        "(e.g. {'network': net, 'optimizer': opt, 'pruning': handler}) or save with save_pruned"
    )


def load_pruned(
    path: str | os.PathLike,
    network_def: nn.Module | None = None,
    *,
    network_key: str = "network",
    map_location: str | torch.device = "cpu",
    strict: bool = True,
) -> nn.Module:
    """Load a pruned network saved by ``save_pruned`` (or by a CheckpointSaver that saved the pruning handler).

    The file is read with ``torch.load(weights_only=True)``: it never runs code.

    Args:
        path: the checkpoint file.
        network_def: a freshly built network of the original (unpruned) definition; it is reshaped in place
            to the recorded structure and receives the weights. Required.
        network_key: for CheckpointSaver files, the ``save_dict`` key of the network.
        map_location: where to load tensors.
        strict: passed to ``load_state_dict``.

    Returns:
        The pruned network, weights loaded, in eval mode.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: no ``network_def``, a ``network_def`` that does not match the recorded architecture, or a
            file a safe load refuses.
    """
    if network_def is None:
        raise ValueError(
            f"load_pruned({str(path)!r}): pass network_def, a fresh instance of the unpruned network: the pruned "
            "structure is stored as data and replayed on it (a pickled module is never loaded, it could run code)"
        )
    ckpt = safe_load(path, map_location)
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(ckpt).__name__}, not a pruned checkpoint")
    state_dict, structure, _ = _find_structure(ckpt, network_key)
    try:
        apply_pruned_structure(network_def, structure)
        network_def.load_state_dict(state_dict, strict=strict)
    except (ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"pruned checkpoint {str(path)!r} does not fit network_def: {e}") from e
    return network_def.to(map_location).eval()


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: torch.Tensor,
    *,
    method: str = "trace",
    overwrite: bool = False,
    check: bool = True,
    atol: float = 1e-5,
) -> Path:
    """Export the pruned network to TorchScript (self-contained: no network_def or structure needed to load).

    Args:
        model: the pruned network; exported in eval mode, its mode restored after.
        path: destination ``.ts`` / ``.pt`` file, written atomically.
        example_inputs: one input batch (for tracing and the output check).
        method: ``"trace"`` (default; works for most MONAI nets) or ``"script"``.
        overwrite: replace an existing file; otherwise ``FileExistsError``.
        check: reload the written module and compare its output with ``model``'s.
        atol: tolerance of that check.

    Raises:
        ValueError: unknown ``method``, or the exported module's output differs from the model's.
    """
    if method not in ("trace", "script"):
        raise ValueError(f"unknown TorchScript method {method!r}; use 'trace' or 'script'")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ts = torch.jit.trace(model, example_inputs) if method == "trace" else torch.jit.script(model)
            reference = model(example_inputs)
        out = atomic_write(path, lambda f: torch.jit.save(ts, f), overwrite=overwrite)
        if check:
            loaded = torch.jit.load(str(out), map_location=example_inputs.device)
            with torch.no_grad():
                got = loaded(example_inputs)
            if not torch.allclose(got, reference, atol=atol, rtol=1e-4):
                raise ValueError(
                    f"TorchScript export {str(out)!r} differs from the model (max abs diff "
                    f"{(got - reference).abs().max().item():.3g}); try method='script'"
                )
    finally:
        model.train(was_training)
    return out
