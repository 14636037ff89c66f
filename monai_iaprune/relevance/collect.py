"""Accumulate per-channel relevance of every prunable layer over a loader."""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from monai_iaprune.relevance.layers import PRUNABLE_TYPES, out_channels, prunable_layers
from monai_iaprune.relevance.registry import get_method
from monai_iaprune.relevance.targets import TargetSpec, target_selection
from monai_iaprune.utils.batch import FirstOutput, check_input_dims, input_batches, model_device, split_batch
from monai_iaprune.utils.settings import check_int

logger = logging.getLogger(__name__)


class ChannelRelevance(dict):
    """``{layer name: 1-D tensor of per-output-channel relevance}`` (mean over samples), plus provenance.

    Attributes:
        method: the relevance method name.
        num_samples: how many samples were averaged (0 for data-free methods).
        example_input: one input sample batch (``[1, ...]``), usable to trace the model for pruning.
        unscored: layers the method reached no relevance for (never run in eval mode, or run off the path to
            the explained output, e.g. deep-supervision heads); ``prune`` leaves them to their groups.
    """

    def __init__(
        self,
        values: Mapping[str, torch.Tensor],
        method: str,
        num_samples: int,
        example_input=None,
        unscored: tuple[str, ...] = (),
    ):
        super().__init__(values)
        self.method = method
        self.num_samples = num_samples
        self.example_input = example_input
        self.unscored = tuple(unscored)


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
        method: a name in ``relevance.registry.METHODS``: ``"lrp"``, ``"ig"``, ``"dlb"``, ``"taylor"``, ``"magnitude"``, ``"random"``.
        layers: qualified module names to score; default every conv / linear layer.
        target: what is explained (see ``monai_iaprune.relevance.targets``): ``"label"``, ``"pred"``, the
            signed ``"contrast"`` (label logit minus the others) or ``"loss"`` (softmax gradient), a class
            index or a callable ``(output, label) -> selection``.
        absolute: average ``|per-sample channel relevance|`` (default) rather than the signed value.
        image_key, label_key: keys of dict batches.
        device: where to run; default the model's device.
        max_batches: stop after this many batches.
        progress: show a tqdm progress bar.
        method_kwargs: passed to the method (e.g. ``composite="epsilon_plus_flat"`` for LRP, ``n_steps`` for IG);
            a name the method does not take raises ValueError listing the accepted ones.

    Returns:
        ``ChannelRelevance``: ``{name: 1-D tensor [out_channels]}`` of mean relevance per sample.
    """
    spec = get_method(method)
    spec.check_settings(method_kwargs)
    check_int(max_batches, "max_batches", allow_none=True)
    chosen = prunable_layers(model, layers)
    if not chosen:
        raise ValueError(f"{type(model).__name__} has no conv / linear layer to score")
    if device is None:
        device = model_device(model)
    was_training = model.training
    model.eval()
    stack: contextlib.ExitStack | None = None
    try:
        if spec.data_free:
            values = {
                k: v.detach().float().cpu()
                for k, v in spec.fn(model, None, None, chosen, **method_kwargs).items()
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
        # a method may keep per-call state over the batches (e.g. LRP's canonizers and hooks): ``spec.session``
        stack = contextlib.ExitStack()
        run = spec.fn
        batches = _progress(data, progress, f"relevance ({method})")
        if max_batches is not None:
            batches = itertools.islice(batches, max_batches)
        for inputs, label in input_batches(batches, device, image_key, label_key):
            check_input_dims(model, inputs)
            if example is None:
                example = inputs[:1].detach().cpu()
                fn_model = FirstOutput(model) if _returns_sequence(model, inputs[:1]) else model
                if spec.session is not None:
                    run = stack.enter_context(spec.session(fn_model, chosen, **method_kwargs))

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
        # layers built but not run (an encoder's unused head) or run off the explained output (deep-supervision
        # heads in eval mode) carry no relevance: left unscored, not an error
        missing = tuple(n for n in chosen if n not in values)
        if missing:
            logger.info(
                "method %r reached no relevance for %d layer(s), left unscored: %s",
                method,
                len(missing),
                missing,
            )
        for n, m in chosen.items():
            if n in values and values[n].numel() != out_channels(m):
                raise RuntimeError(
                    f"relevance for {n!r} has {values[n].numel()} entries, layer has {out_channels(m)} channels"
                )
        if not values:
            raise RuntimeError(
                f"method {method!r} produced no relevance for any layer: is the output explained?"
            )
        return ChannelRelevance(values, method, count, example, missing)
    finally:
        if stack is not None:
            stack.close()  # on an error mid-loop: the method's session restores the model
        model.train(was_training)


__all__ = ["PRUNABLE_TYPES", "ChannelRelevance", "channel_relevance"]
