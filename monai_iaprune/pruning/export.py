"""Deployment exports of a pruned network that need no TorchScript: ``torch.export`` (``.pt2``) and ONNX.

TorchScript (``export_torchscript``) is deprecated in recent torch; these two formats are its successors.
Both exporters trace the eval-mode network, so the file holds the pruned architecture and its weights
and loads without ``network_def``. Each file is checked before it is put in place: its bytes are
reloaded (``torch.export.load`` / onnxruntime), run on the example inputs and compared with the eager
network; only bytes that pass are written (temporary file in the same folder, fsync, ``os.replace``).

The ONNX path uses torch's ``torch.export``-based exporter (``dynamo=True``, the default since torch 2.9),
which imports ``onnxscript`` and ``onnx``; it runs offline. The check needs ``onnxruntime``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_iaprune.pruning.checkpoint import atomic_write

Inputs = torch.Tensor | Sequence[torch.Tensor]


def _as_tuple(example_inputs: Inputs) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_inputs must be a tensor or a non-empty sequence of tensors")
    return inputs


def _outputs(out: Any) -> list[torch.Tensor]:
    """The network's output as a list of tensors (a tensor, or a tuple / list of tensors)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in out):
        return list(out)
    raise TypeError(f"can only export networks that return a tensor or a tuple of tensors, got {type(out)}")


def _trace_inputs(inputs: tuple[torch.Tensor, ...], dynamic_batch: bool) -> tuple[torch.Tensor, ...]:
    # torch.export specialises a dimension whose example size is 0 or 1 to a constant, so a dynamic batch
    # cannot be traced from a batch of one: trace on the example repeated to a batch of two.
    if dynamic_batch and any(t.shape[0] < 2 for t in inputs):
        return tuple(torch.cat([t] * 2) if t.shape[0] == 1 else t for t in inputs)
    return inputs


def _dynamic_shapes(inputs: tuple[torch.Tensor, ...], dynamic_batch: bool) -> tuple[dict, ...] | None:
    if not dynamic_batch:
        return None
    for t in inputs:
        if t.dim() == 0:
            raise ValueError("dynamic_batch needs inputs with a batch dimension; got a 0-d tensor")
    batch = torch.export.Dim("batch", min=1)
    return tuple({0: batch} for _ in inputs)


def _compare(
    path: Path, got: Sequence[Any], reference: Sequence[torch.Tensor], rtol: float, fmt: str
) -> None:
    """Raise a ValueError naming ``path`` when ``got`` differs from ``reference`` beyond ``rtol``.

    The tolerance is relative to each output's largest magnitude (``|got - ref| <= rtol * max|ref|``), so
    near-zero logits do not fail on float rounding that a pure element-wise relative test would flag.
    """
    if len(got) != len(reference):
        raise ValueError(f"{fmt} export {str(path)!r} returns {len(got)} outputs, the model {len(reference)}")
    for i, (g, ref) in enumerate(zip(got, reference)):
        ref = ref.detach().cpu().float()
        g = torch.as_tensor(np.asarray(g.detach().cpu() if isinstance(g, torch.Tensor) else g)).float()
        if g.shape != ref.shape:
            raise ValueError(
                f"{fmt} export {str(path)!r}: output {i} has shape {tuple(g.shape)}, the model's "
                f"{tuple(ref.shape)}"
            )
        diff = (g - ref).abs()
        scale = max(float(ref.abs().max()), 1e-12) if ref.numel() else 1.0
        max_diff = float(diff.max()) if diff.numel() else 0.0
        if not torch.isfinite(g).all() or max_diff > rtol * scale:
            raise ValueError(
                f"{fmt} export {str(path)!r} differs from the eager model: output {i} max abs difference "
                f"{max_diff:.3g} > rtol {rtol:g} x max |output| {scale:.3g}; the file was not written"
            )


def _run_pt2(data: bytes, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """Load the bytes of a ``.pt2`` file with ``torch.export.load`` and run them on ``inputs``."""
    program = torch.export.load(io.BytesIO(data))
    with torch.no_grad():
        return _outputs(program.module()(*inputs))


def _run_onnx(data: bytes, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """Load the bytes of an ONNX file in an onnxruntime CPU session and run them on ``inputs``."""
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    feeds = {arg.name: t.detach().cpu().numpy() for arg, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def _export_checked(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: tuple[torch.Tensor, ...],
    build: Callable[[], Callable[[Any], None]],
    run: Callable[[bytes, tuple[torch.Tensor, ...]], Sequence[Any]],
    *,
    overwrite: bool,
    check: bool,
    rtol: float,
    fmt: str,
) -> Path:
    """Shared flow: eval mode, reference output, serialise, check the bytes, then write them atomically.

    The check runs on the exact bytes that go to disk, before they replace ``path``, so a file that fails
    it never lands (and an existing file stays as it was).
    """
    path = Path(path)
    if path.exists() and not overwrite:  # refuse before the (slow) export, atomic_write refuses again
        raise FileExistsError(
            f"refusing to overwrite existing file {str(path)!r}; pass overwrite=True to replace it"
        )
    if not rtol > 0:
        raise ValueError(f"rtol must be > 0, got {rtol}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = _outputs(model(*inputs))
        buffer = io.BytesIO()
        build()(buffer)
        data = buffer.getvalue()
        if check:
            try:
                got = run(data, inputs)
            except Exception as e:
                raise ValueError(
                    f"{fmt} export {str(path)!r} cannot be reloaded and run ({type(e).__name__}: {e}); "
                    "the file was not written"
                ) from e
            _compare(path, got, reference, rtol, fmt)
        return atomic_write(path, lambda f: f.write(data), overwrite=overwrite)
    finally:
        model.train(was_training)


def export_torch_export(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Inputs,
    *,
    overwrite: bool = False,
    check: bool = True,
    rtol: float = 1e-4,
    dynamic_batch: bool = True,
) -> Path:
    """Export the (pruned) network with ``torch.export.export`` and save it as a ``.pt2`` file.

    Load it back with ``torch.export.load(path).module()``; no ``network_def`` is needed.

    Args:
        model: the network; exported in eval mode, its mode restored after.
        path: destination ``.pt2`` file, written atomically.
        example_inputs: one input batch (tensor or tuple of tensors) on the model's device.
        overwrite: replace an existing file; otherwise ``FileExistsError``.
        check: reload the written program and compare its output with the eager model's on
            ``example_inputs``; a file that fails is not put in place.
        rtol: tolerance of that check, relative to the largest output magnitude.
        dynamic_batch: make dimension 0 of every input dynamic (a batch of one is traced as two, since
            torch.export fixes size-1 dimensions); ``False`` fixes the example's shape.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: the reloaded program's output differs from the model's (message names the file and the
            max difference).
    """
    inputs = _as_tuple(example_inputs)

    def build() -> Callable[[Any], None]:
        program = torch.export.export(
            model, _trace_inputs(inputs, dynamic_batch), dynamic_shapes=_dynamic_shapes(inputs, dynamic_batch)
        )
        return lambda f: torch.export.save(program, f)

    return _export_checked(
        model, path, inputs, build, _run_pt2, overwrite=overwrite, check=check, rtol=rtol, fmt="torch.export"
    )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: Inputs,
    *,
    overwrite: bool = False,
    check: bool = True,
    rtol: float = 1e-4,
    opset: int | None = None,
    dynamic_batch: bool = True,
) -> Path:
    """Export the (pruned) network to ONNX with torch's ``torch.export``-based exporter.

    Inputs are named ``input`` (``input_0``, ``input_1``, ... for several), outputs ``output`` (or
    ``output_0``, ...). Weights are stored inside the file (single-file ONNX, below protobuf's 2 GB limit).

    Args:
        model, example_inputs, overwrite, rtol: as in ``export_torch_export``.
        path: destination ``.onnx`` file, written atomically.
        check: run the written file in onnxruntime (CPU) and compare with the eager model's output on
            ``example_inputs``; a file that fails is not put in place.
        opset: ONNX opset version; ``None`` uses torch's default.
        dynamic_batch: make dimension 0 of every input and output dynamic; ``False`` fixes the example's
            shape.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        ImportError: ``onnx`` / ``onnxscript`` (export) or ``onnxruntime`` (check) is not installed.
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: onnxruntime's output differs from the model's (message names the file and the max
            difference).
    """
    missing = [m for m in ("onnx", "onnxscript") + (("onnxruntime",) if check else ()) if not _importable(m)]
    if missing:
        raise ImportError(
            f"export_onnx needs {', '.join(missing)}: pip install {' '.join(missing)} "
            "(torch's ONNX exporter needs onnx and onnxscript; the check runs onnxruntime)"
        )
    inputs = _as_tuple(example_inputs)

    def build() -> Callable[[Any], None]:
        import onnx

        trace = _trace_inputs(inputs, dynamic_batch)
        with torch.no_grad():
            n_out = len(_outputs(model(*trace)))
        names_in = ["input"] if len(inputs) == 1 else [f"input_{i}" for i in range(len(inputs))]
        names_out = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
        program = torch.onnx.export(
            model,
            trace,
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(inputs, dynamic_batch),
            input_names=names_in,
            output_names=names_out,
            opset_version=opset,
            verbose=False,
        )
        proto = program.model_proto
        return lambda f: onnx.save_model(proto, f)

    return _export_checked(
        model, path, inputs, build, _run_onnx, overwrite=overwrite, check=check, rtol=rtol, fmt="ONNX"
    )


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


__all__ = ["export_onnx", "export_torch_export"]
