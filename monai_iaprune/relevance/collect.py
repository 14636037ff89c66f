"""Accumulate per-channel relevance of every prunable layer over a loader."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from monai_iaprune.relevance.layers import PRUNABLE_TYPES, out_channels, prunable_layers
from monai_iaprune.relevance.targets import TargetSpec, target_selection

SelectionFn = Callable[[torch.Tensor], torch.Tensor]


class RelevanceMethod(Protocol):
    """Per-batch relevance: ``{layer name: [B, C] per-sample, per-channel relevance}``.

    ``select(output)`` gives the 0/1 selection of the output being explained (see ``targets``).
    Data-free methods (``data_free = True``) are called once with ``inputs=None`` and return ``[C]``.
    A method may have a ``session(model, layers, **kwargs)`` attribute: a context manager, entered at the first
    batch and left after the last, that yields the per-batch function to call instead (e.g. LRP keeps its
    canonizers and hooks applied over all batches of one ``channel_relevance`` call).
    """

    data_free: bool

    def __call__(
        self,
        model: nn.Module,
        inputs: torch.Tensor | None,
        select: SelectionFn,
        layers: dict[str, nn.Module],
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]: ...


METHODS: dict[str, RelevanceMethod] = {}


def register_method(name: str, data_free: bool = False):
    """Register a relevance method under ``name`` (used as ``channel_relevance(..., method=name)``)."""

    def deco(fn):
        fn.data_free = data_free
        METHODS[name] = fn
        return fn

    return deco


class ChannelRelevance(dict):
    """``{layer name: 1-D tensor of per-output-channel relevance}`` (mean over samples), plus provenance.

    Attributes:
        method: the relevance method name.
        num_samples: how many samples were averaged (0 for data-free methods).
        example_input: one input sample batch (``[1, ...]``), usable to trace the model for pruning.
    """

    def __init__(self, values: Mapping[str, torch.Tensor], method: str, num_samples: int, example_input=None):
        super().__init__(values)
        self.method = method
        self.num_samples = num_samples
        self.example_input = example_input


def split_batch(batch: Any, image_key: str = "image", label_key: str = "label") -> tuple[torch.Tensor, Any]:
    """Return ``(inputs, label or None)`` from a tensor, an ``(x, y)`` pair or a MONAI dict batch."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        if image_key not in batch:
            raise KeyError(f"batch has no key {image_key!r} (keys: {sorted(map(str, batch))}); set image_key")
        return batch[image_key], batch.get(label_key)
    if isinstance(batch, (list, tuple)) and len(batch) >= 1:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"cannot read inputs from a batch of type {type(batch).__name__}")


def plain_tensor(value: Any) -> torch.Tensor:
    """A plain ``torch.Tensor`` from a MONAI ``MetaTensor``, array or tensor.

    MetaTensor's ``__torch_function__`` wraps every op, which breaks hooks that track in-place
    residual additions (e.g. SegResNet's ``x += identity``); relevance needs only the values.
    """
    if hasattr(value, "as_tensor"):
        return value.as_tensor()
    return torch.as_tensor(value)


def spatial_dims(model: nn.Module) -> int | None:
    """Spatial dimensionality of the first conv layer (2 for Conv2d, 3 for Conv3d), or None."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return len(m.kernel_size)
    return None


def check_input_dims(model: nn.Module, inputs: torch.Tensor) -> None:
    """Raise a clear error when ``inputs`` does not have the ``[B, C, *spatial]`` rank the model's convs need."""
    sd = spatial_dims(model)
    if sd is not None and inputs.ndim != sd + 2:
        axes = "[B, C, H, W]" if sd == 2 else "[B, C, D, H, W]" if sd == 3 else f"[B, C, +{sd} spatial]"
        raise ValueError(
            f"wrong input dims: {type(model).__name__} has {sd}D convolutions and expects {sd + 2}-D input {axes}, "
            f"got shape {tuple(inputs.shape)}"
        )


class FirstOutput(nn.Module):
    """Present a network whose forward returns a tuple (e.g. MONAI ViT: logits, hidden states) by its first output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out[0] if isinstance(out, (tuple, list)) else out


def _returns_sequence(model: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return isinstance(model(x), (tuple, list))


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from monai.utils import optional_import

    tqdm, has_tqdm = optional_import("tqdm", name="tqdm")
    return tqdm(iterable, desc=desc, leave=False) if has_tqdm else iterable


def _check_finite(values: Mapping[str, torch.Tensor], method: str) -> None:
    for name, v in values.items():
        if not torch.isfinite(v).all():
            bad = (~torch.isfinite(v)).sum().item()
            raise FloatingPointError(
                f"NaN/Inf relevance from method {method!r} at layer {name!r} ({bad} of {v.numel()} values); "
                "check the input data for NaN, lower the learning rate, or raise the epsilon of the LRP rule"
            )


def channel_relevance(
    model: nn.Module,
    data: Iterable[Any] | None,
    method: str = "lrp",
    *,
    layers: Iterable[str] | None = None,
    target: TargetSpec = "label",
    absolute: bool = True,
    image_key: str = "image",
    label_key: str = "label",
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    **method_kwargs: Any,
) -> ChannelRelevance:
    """Score every output channel of every prunable conv / linear layer of ``model`` on ``data``.

    Args:
        model: a MONAI (or any torch) network; it is put in eval mode while scoring and restored after.
        data: iterable of batches: tensors, ``(image, label)`` pairs or MONAI dicts with ``image_key`` /
            ``label_key``. May be ``None`` only for data-free methods (``"magnitude"``, ``"random"``).
        method: one of ``METHODS``: ``"lrp"``, ``"ig"``, ``"dlb"``, ``"taylor"``, ``"magnitude"``, ``"random"``.
        layers: qualified module names to score; default every conv / linear layer.
        target: what is explained (see ``monai_iaprune.relevance.targets``): ``"label"``, ``"pred"``, the
            signed ``"contrast"`` (label logit minus the others) or ``"loss"`` (softmax gradient), a class
            index or a callable ``(output, label) -> selection``.
        absolute: average ``|per-sample channel relevance|`` (default) rather than the signed value.
        image_key, label_key: keys of dict batches.
        device: where to run; default the model's device.
        max_batches: stop after this many batches.
        progress: show a tqdm progress bar.
        method_kwargs: passed to the method (e.g. ``composite="epsilon_plus_flat"`` for LRP, ``n_steps`` for IG).

    Returns:
        ``ChannelRelevance``: ``{name: 1-D tensor [out_channels]}`` of mean relevance per sample.
    """
    _ensure_methods_loaded()
    if method not in METHODS:
        raise ValueError(f"unknown relevance method {method!r}; available: {sorted(METHODS)}")
    fn = METHODS[method]
    chosen = prunable_layers(model, layers)
    if not chosen:
        raise ValueError(f"{type(model).__name__} has no conv / linear layer to score")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    stack: contextlib.ExitStack | None = None
    try:
        if fn.data_free:
            values = {
                k: v.detach().float().cpu() for k, v in fn(model, None, None, chosen, **method_kwargs).items()
            }
            if absolute:
                values = {k: v.abs() for k, v in values.items()}
            _check_finite(values, method)
            example = None
            if data is not None:
                for batch in data:
                    example = split_batch(batch, image_key, label_key)[0][:1].detach().cpu()
                    break
            return ChannelRelevance(values, method, 0, example)
        if data is None:
            raise ValueError(f"method {method!r} needs data: pass a loader or an iterable of batches")
        sums: dict[str, torch.Tensor] = {}
        count = 0
        example = None
        # a method may keep per-call state over the batches (e.g. LRP's canonizers and hooks): ``fn.session``
        stack = contextlib.ExitStack()
        run = fn
        for i, batch in enumerate(_progress(data, progress, f"relevance ({method})")):
            if max_batches is not None and i >= max_batches:
                break
            inputs, label = split_batch(batch, image_key, label_key)
            inputs = plain_tensor(inputs).to(device).float()
            check_input_dims(model, inputs)
            if label is not None:
                label = plain_tensor(label).to(device)
            if example is None:
                example = inputs[:1].detach().cpu()
                if _returns_sequence(model, inputs[:1]):
                    fn_model = FirstOutput(model)
                else:
                    fn_model = model
                session = getattr(fn, "session", None)
                if session is not None:
                    run = stack.enter_context(session(fn_model, chosen, **method_kwargs))

            def select(output: torch.Tensor, _label=label) -> torch.Tensor:
                return target_selection(output, _label, target)

            per_sample = run(fn_model, inputs, select, chosen, **method_kwargs)
            _check_finite(per_sample, method)
            for name, v in per_sample.items():
                v = v.detach().double()
                v = v.abs() if absolute else v
                s = v.sum(0).cpu()
                sums[name] = s if name not in sums else sums[name] + s
            count += inputs.shape[0]
        stack.close()
        if count == 0:
            raise ValueError("empty data: the loader yielded no batches, so no relevance could be collected")
        values = {k: (v / count).float() for k, v in sums.items()}
        missing = [n for n in chosen if n not in values]
        if missing:
            raise RuntimeError(
                f"method {method!r} produced no relevance for {len(missing)} layer(s) never reached in forward: {missing[:5]}"
            )
        for n, m in chosen.items():
            if values[n].numel() != out_channels(m):
                raise RuntimeError(
                    f"relevance for {n!r} has {values[n].numel()} entries, layer has {out_channels(m)} channels"
                )
        return ChannelRelevance(values, method, count, example)
    finally:
        if stack is not None:
            stack.close()  # on an error mid-loop: the method's session restores the model
        model.train(was_training)


def _ensure_methods_loaded() -> None:
    # each method registers itself on import
    from monai_iaprune.relevance import backtrace, baselines, conductance, lrp  # noqa: F401


__all__ = [
    "METHODS",
    "PRUNABLE_TYPES",
    "ChannelRelevance",
    "channel_relevance",
    "check_input_dims",
    "register_method",
    "split_batch",
]
