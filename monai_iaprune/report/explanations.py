"""Do explanations survive pruning? Input attribution maps, their agreement, and their faithfulness.

- ``attribution_maps``: per-voxel input attribution of a batch (Integrated Gradients through captum, or
  LRP through ``monai_iaprune.relevance.lrp.input_relevance``), for a class logit or a class over a
  segmentation mask (``monai_iaprune.relevance.targets``).
- ``explanation_agreement``: per image, how close the unpruned and the pruned model's maps are
  (Spearman rank correlation, IoU of the top 10 % voxels by ``|attribution|``, SSIM), as median and IQR.
- ``faithfulness``: deletion / insertion curves (Samek et al. 2017; Petsiuk et al. 2018): the most
  relevant voxels first are replaced by a baseline value (deletion) or restored onto it (insertion)
  in ``steps`` steps while the explained class probability is tracked; area under each curve over x in [0, 1].
- ``explanation_report``: all of the above for an unpruned / pruned pair plus the PNG figures.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from monai_iaprune.relevance.hooks import no_param_grad
from monai_iaprune.relevance.registry import METHODS, input_map_methods
from monai_iaprune.relevance.targets import TargetSpec, target_selection
from monai_iaprune.utils.batch import (
    check_input_dims,
    first_output,
    input_batches,
    model_device,
    plain_tensor,
)

AttributionSpec = str | torch.Tensor | Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------- helpers
class _EvalMode:
    """Put models in eval mode and restore their training flags afterwards."""

    def __init__(self, *models: nn.Module):
        self.models = models
        self.flags: list[bool] = []

    def __enter__(self) -> None:
        self.flags = [m.training for m in self.models]
        for m in self.models:
            m.eval()

    def __exit__(self, *exc) -> None:
        for m, f in zip(self.models, self.flags):
            m.train(f)


def explained_selection(
    model: nn.Module, inputs: torch.Tensor, label: torch.Tensor | None = None, target: TargetSpec = "label"
) -> torch.Tensor:
    """The 0/1 selection of ``model(inputs)`` that is explained (see ``monai_iaprune.relevance.targets``).

    Args:
        model: the network; called once without gradients.
        inputs: ``[B, C, *spatial]``.
        label: the batch label (class index, one-hot or segmentation mask), or None for ``target="pred"``.
        target: ``"label"``, ``"pred"``, a class index or a callable ``(output, label) -> selection``.

    Returns:
        A tensor of the output's shape, detached.
    """
    with torch.no_grad():
        out = first_output(model(inputs))
    return target_selection(out, label, target).detach()


def attribution_maps(
    model: nn.Module,
    inputs: torch.Tensor,
    method: str = "ig",
    target: TargetSpec = "label",
    label: torch.Tensor | None = None,
    *,
    selection: torch.Tensor | None = None,
    n_steps: int = 16,
    baseline: float | torch.Tensor = 0.0,
    internal_batch_size: int | None = None,
    composite: Any = None,
    sum_channels: bool = True,
) -> torch.Tensor:
    """Input attribution maps of a batch: how much each pixel / voxel contributes to the explained output.

    Args:
        model: a 2D or 3D network (put in eval mode during the call, restored after).
        inputs: ``[B, C, *spatial]`` batch.
        method: a relevance method with input maps (``relevance.registry.input_map_methods()``): ``"ig"``
            (Integrated Gradients, captum) or ``"lrp"`` (``relevance.lrp.input_relevance``).
        target: what is explained: ``"label"`` (needs ``label``, falls back to ``"pred"`` without one),
            ``"pred"``, a class index, or a callable ``(output, label) -> selection``. For segmentation
            outputs the class logit is summed over the class's mask.
        label: the batch label, used by ``target="label"``.
        selection: a precomputed 0/1 selection of the output (overrides ``target``); used to explain the
            same class / mask with two models (e.g. the unpruned model's prediction for both).
        n_steps: IG integration steps.
        baseline: IG baseline (a value or a tensor broadcastable to ``inputs``).
        internal_batch_size: IG's internal batch size (limits memory for 3D inputs).
        composite: LRP composite passed to ``input_relevance`` (None: its default).
        sum_channels: return ``[B, *spatial]`` summed over input channels (default) rather than ``[B, C, *spatial]``.

    Returns:
        The attribution, detached, on the inputs' device, float32.
    """
    if method not in input_map_methods():
        raise ValueError(f"unknown attribution method {method!r}; use one of {input_map_methods()}")
    if inputs.ndim < 3:
        raise ValueError(f"inputs must be [B, C, *spatial], got shape {tuple(inputs.shape)}")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    check_input_dims(model, inputs)
    device = model_device(model)
    x = plain_tensor(inputs).detach().to(device).float()
    with _EvalMode(model):
        sel = (
            explained_selection(model, x, None if label is None else plain_tensor(label).to(device), target)
            if selection is None
            else selection.detach().to(device).float()
        )
        with no_param_grad(model):
            maps = METHODS[method].input_maps(
                model,
                x,
                sel,
                n_steps=n_steps,
                baseline=baseline,
                internal_batch_size=internal_batch_size,
                composite=composite,
            )
    maps = torch.as_tensor(maps).detach().float()
    if maps.shape != x.shape:
        raise RuntimeError(
            f"{method} returned maps of shape {tuple(maps.shape)} for inputs of shape {tuple(x.shape)}"
        )
    if not torch.isfinite(maps).all():
        raise FloatingPointError(f"NaN/Inf in {method} attribution maps; check the inputs and the model")
    maps = maps.sum(1) if sum_channels else maps
    return maps.to(inputs.device)


# ------------------------------------------------------------------------------------ per-image metrics
def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..N of a 1-D tensor, ties sharing their average rank (as ``scipy.stats.rankdata``)."""
    vals, order = torch.sort(x, stable=True)
    _, counts = torch.unique_consecutive(vals, return_counts=True)
    ends = counts.cumsum(0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks = torch.empty(x.numel(), dtype=torch.float64, device=x.device)
    ranks[order] = avg.repeat_interleave(counts)
    return ranks


def spearman_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two maps of the same shape (signed values; ties get average ranks).

    Args:
        a, b: attribution maps of one image.

    Returns:
        The correlation in [-1, 1]; 1.0 for identical maps; NaN when only one of them is constant.
    """
    a, b = a.detach().flatten().double(), b.detach().flatten().double()
    if a.shape != b.shape:
        raise ValueError(f"maps differ in size: {a.numel()} vs {b.numel()}")
    if torch.equal(a, b):
        return 1.0
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = ra.norm() * rb.norm()
    if den == 0:
        return float("nan")
    return float((ra @ rb) / den)


def top_fraction_iou(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.1) -> float:
    """IoU of the ``fraction`` voxels with the largest ``|attribution|`` in two maps of the same shape.

    Args:
        a, b: attribution maps of one image.
        fraction: share of voxels kept, in (0, 1]; at least one voxel.

    Returns:
        IoU in [0, 1]; ties are broken by voxel order, identically for both maps.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    a, b = a.detach().flatten(), b.detach().flatten()
    if a.shape != b.shape:
        raise ValueError(f"maps differ in size: {a.numel()} vs {b.numel()}")
    k = max(1, math.ceil(fraction * a.numel()))
    top_a = torch.zeros(a.numel(), dtype=torch.bool, device=a.device)
    top_b = torch.zeros_like(top_a)
    top_a[torch.argsort(-a.abs(), stable=True)[:k]] = True
    top_b[torch.argsort(-b.abs(), stable=True)[:k]] = True
    inter = (top_a & top_b).sum().item()
    return inter / (2 * k - inter)


def map_ssim(a: torch.Tensor, b: torch.Tensor, win_size: int = 11) -> torch.Tensor:
    """SSIM of batches of 2D or 3D maps through ``monai.metrics.SSIMMetric``.

    Each map is min-max scaled into [0, 1] on its own (data range 1), so the score compares the maps'
    structure, not the scale of the models' logits; an inverted map scores low. (Signed maps scaled
    symmetrically would not do: SSIM's luminance and structure terms are then both negative for
    ``a`` against ``-a`` and their product is close to 1.)

    Args:
        a, b: ``[B, *spatial]`` maps (2 or 3 spatial dims).
        win_size: Gaussian window; reduced to the largest odd size that fits the smallest spatial dim.

    Returns:
        ``[B]`` SSIM per image (1 for identical maps).
    """
    from monai.metrics import SSIMMetric

    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    sd = a.ndim - 1
    if sd not in (2, 3):
        raise ValueError(f"SSIM needs [B, H, W] or [B, D, H, W] maps, got shape {tuple(a.shape)}")
    win = min(win_size, min(a.shape[1:]))
    win = win if win % 2 == 1 else win - 1

    def scaled(m: torch.Tensor) -> torch.Tensor:
        m = m.detach().float().flatten(1)
        lo, hi = m.amin(1, keepdim=True), m.amax(1, keepdim=True)
        return ((m - lo) / (hi - lo).clamp_min(1e-12)).view(a.shape)

    metric = SSIMMetric(spatial_dims=sd, data_range=1.0, win_size=max(win, 1), reduction="none")
    return metric(scaled(a)[:, None], scaled(b)[:, None]).view(-1).cpu()


def _summary(values: Sequence[float]) -> tuple[float, float]:
    """(median, IQR) ignoring NaN; NaN when there is no finite value."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    q25, q50, q75 = np.percentile(v, [25, 50, 75])
    return float(q50), float(q75 - q25)


def bootstrap_ci(
    values: Sequence[float], stat: Any = np.median, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over the finite ``values`` (images resampled with replacement).

    Returns ``(nan, nan)`` when there is no finite value; a single value gives a zero-width interval.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = np.asarray([stat(v[rng.integers(0, v.size, v.size)]) for _ in range(n_boot)])
    lo, hi = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def agreement_from_maps(
    maps_a: torch.Tensor, maps_b: torch.Tensor, top_fraction: float = 0.1
) -> dict[str, Any]:
    """Agreement metrics of two stacks of maps ``[N, *spatial]`` (image ``i`` of ``a`` against image ``i`` of ``b``).

    Args:
        maps_a, maps_b: maps of the same images from two models (e.g. unpruned, pruned).
        top_fraction: share of voxels in the top-``|attribution|`` IoU (key ``top{percent}_iou``).

    Returns:
        ``{spearman_median, spearman_iqr, spearman_ci, top10_iou_median, ..., ssim_ci, n_images,
        per_image: {spearman: [...], top10_iou: [...], ssim: [...]}}``; ``*_ci``: 95 % bootstrap interval of
        the median over images.
    """
    if maps_a.shape != maps_b.shape:
        raise ValueError(f"maps differ in shape: {tuple(maps_a.shape)} vs {tuple(maps_b.shape)}")
    if maps_a.shape[0] == 0:
        raise ValueError("no maps to compare")
    iou_key = f"top{round(100 * top_fraction)}_iou"
    per_image = {
        "spearman": [spearman_correlation(a, b) for a, b in zip(maps_a, maps_b)],
        iou_key: [top_fraction_iou(a, b, top_fraction) for a, b in zip(maps_a, maps_b)],
        "ssim": map_ssim(maps_a, maps_b).tolist(),
    }
    out: dict[str, Any] = {}
    for k, v in per_image.items():
        out[f"{k}_median"], out[f"{k}_iqr"] = _summary(v)
        out[f"{k}_ci"] = list(bootstrap_ci(v))
    out["n_images"] = int(maps_a.shape[0])
    out["per_image"] = per_image
    return out


# --------------------------------------------------------------------------------------------- data
def _iter_batches(
    data: Iterable[Any] | torch.Tensor | tuple,
    image_key: str,
    label_key: str,
    max_samples: int | None,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """``input_batches`` of ``data``, which may also be a single batch (a tensor, a dict or an (image, label) pair)."""
    if isinstance(data, torch.Tensor) or isinstance(data, dict):
        data = [data]
    elif isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        data = [data]  # a single (image, label) batch
    return input_batches(data, device, image_key, label_key, max_samples)


def _explain_pair(
    model_a: nn.Module,
    model_b: nn.Module | None,
    data: Any,
    method: str,
    target: TargetSpec,
    max_samples: int | None,
    image_key: str,
    label_key: str,
    map_kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Inputs, labels, selections (from ``model_a``), maps of ``model_a`` and of ``model_b`` over ``data``."""
    device = model_device(model_a)
    xs, ys, sels, ma, mb = [], [], [], [], []
    with _EvalMode(model_a, *([model_b] if model_b is not None else [])):
        for x, y in _iter_batches(data, image_key, label_key, max_samples, device):
            check_input_dims(model_a, x)
            sel = explained_selection(model_a, x, y, target)
            ma.append(attribution_maps(model_a, x, method, selection=sel, **map_kwargs).cpu())
            if model_b is not None:
                xb = x.to(model_device(model_b))
                mb.append(attribution_maps(model_b, xb, method, selection=sel, **map_kwargs).cpu())
            xs.append(x.cpu())
            ys.append(None if y is None else y.cpu())
            sels.append(sel.cpu())
    if not xs:
        raise ValueError("empty data: the loader yielded no samples to explain")
    labels = None if any(y is None for y in ys) else torch.cat(ys)
    return torch.cat(xs), labels, torch.cat(sels), torch.cat(ma), (torch.cat(mb) if mb else None)


def explanation_agreement(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    method: str = "ig",
    *,
    target: TargetSpec = "label",
    max_samples: int | None = 16,
    top_fraction: float = 0.1,
    image_key: str = "image",
    label_key: str = "label",
    **map_kwargs: Any,
) -> dict[str, Any]:
    """Per-image agreement of two models' attribution maps (typically unpruned ``model_a``, pruned ``model_b``).

    Both models explain the same thing: the selection (class / mask) comes from ``model_a`` and the label,
    so with ``target="pred"`` the pruned model is asked about the unpruned model's prediction.

    Args:
        model_a, model_b: the two networks (same input / output shapes).
        data: a batch tensor, an ``(image, label)`` pair, a MONAI dict batch, or an iterable (loader) of them.
        method: ``"ig"`` or ``"lrp"``.
        target: see ``attribution_maps``.
        max_samples: use at most this many samples (None: all).
        top_fraction: share of voxels in the top-``|attribution|`` IoU.
        image_key, label_key: keys of dict batches.
        map_kwargs: passed to ``attribution_maps`` (``n_steps``, ``baseline``, ``composite``, ...).

    Returns:
        ``agreement_from_maps``'s dict (medians, IQRs and per-image values).
    """
    _, _, _, ma, mb = _explain_pair(
        model_a, model_b, data, method, target, max_samples, image_key, label_key, map_kwargs
    )
    return agreement_from_maps(ma, mb, top_fraction)


# ---------------------------------------------------------------------------------------- faithfulness
def _class_probability(output: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
    """Mean probability of the selected class(es) per sample: softmax over channels, sigmoid for 1 output."""
    p = torch.sigmoid(output) if output.shape[1] == 1 else torch.softmax(output, 1)
    sel = selection.to(p.dtype)
    return (p * sel).flatten(1).sum(1) / sel.flatten(1).sum(1).clamp_min(1.0)


def _baseline_like(x: torch.Tensor, baseline: float | str | torch.Tensor) -> torch.Tensor:
    if isinstance(baseline, torch.Tensor):
        return baseline.to(x.device, x.dtype).expand_as(x)
    if baseline == "mean":  # per image and channel
        return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True).expand_as(x)
    if isinstance(baseline, str):
        raise ValueError(f"unknown baseline {baseline!r}: use a number, 'mean' or a tensor")
    return torch.full_like(x, float(baseline))


def deletion_insertion_curves(
    model: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    selection: torch.Tensor,
    steps: int = 20,
    baseline: float | str | torch.Tensor = 0.0,
    absolute: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deletion and insertion curves of one batch.

    At step ``j`` of ``steps`` the ``round(j / steps * N)`` most relevant pixels / voxels (all channels of
    a location together) are set to the baseline (deletion), or are the only ones kept from the input on
    top of the baseline (insertion); the explained class probability is recorded.

    Args:
        model: the network (call in eval mode).
        inputs: ``[B, C, *spatial]``.
        maps: ``[B, *spatial]`` (or ``[B, C, *spatial]``, summed over channels) attribution.
        selection: 0/1 selection of the output that was explained (class one-hot or segmentation mask).
        steps: number of steps; curves have ``steps + 1`` points at x = 0, 1/steps, ..., 1.
        baseline: replacement value: a number, ``"mean"`` (image mean per channel) or a tensor.
        absolute: order by ``|attribution|`` instead of the signed value (evidence for the class first).

    Returns:
        ``(deletion, insertion)``, each ``[B, steps + 1]`` on the CPU.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    b, spatial = inputs.shape[0], inputs.shape[2:]
    if maps.ndim == inputs.ndim:
        maps = maps.sum(1)
    if maps.shape != (b, *spatial):
        raise ValueError(
            f"maps of shape {tuple(maps.shape)} do not match inputs of shape {tuple(inputs.shape)}"
        )
    device = model_device(model)
    x = inputs.to(device).float()
    base = _baseline_like(x, baseline)
    score = maps.to(device).flatten(1).float()
    score = score.abs() if absolute else score
    n = score.shape[1]
    order = torch.argsort(-score, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=device).expand(b, n))
    sel = selection.to(device)
    deletion, insertion = [], []
    with torch.no_grad():
        for j in range(steps + 1):
            k = round(j / steps * n)
            mask = (rank < k).view(b, 1, *spatial)
            deletion.append(_class_probability(first_output(model(torch.where(mask, base, x))), sel))
            insertion.append(_class_probability(first_output(model(torch.where(mask, x, base))), sel))
    return torch.stack(deletion, 1).cpu(), torch.stack(insertion, 1).cpu()


def curve_auc(curves: torch.Tensor) -> torch.Tensor:
    """Area under ``[B, K]`` curves sampled at K evenly spaced x in [0, 1] (trapezoid rule), ``[B]``."""
    x = torch.linspace(0.0, 1.0, curves.shape[-1], dtype=curves.dtype)
    return torch.trapezoid(curves, x, dim=-1)


def faithfulness(
    model: nn.Module,
    data: Any,
    attribution: AttributionSpec = "ig",
    *,
    steps: int = 20,
    target: TargetSpec = "label",
    baseline: float | str | torch.Tensor = 0.0,
    absolute: bool = False,
    max_samples: int | None = 16,
    image_key: str = "image",
    label_key: str = "label",
    selection_model: nn.Module | None = None,
    **map_kwargs: Any,
) -> dict[str, Any]:
    """Deletion and insertion curves and their areas for a model's explanations on ``data``.

    A faithful map puts first what the model uses: deleting it drops the class probability early (low
    deletion AUC), inserting it restores the probability early (high insertion AUC).

    Args:
        model: the network.
        data: a batch tensor, an ``(image, label)`` pair, a dict batch, or an iterable (loader) of them.
        attribution: ``"ig"`` / ``"lrp"`` (computed by ``attribution_maps``), a tensor of precomputed maps
            ``[N, *spatial]`` for the samples of ``data`` in order, or a callable
            ``(model, inputs, selection) -> maps``.
        steps: steps of each curve (``steps + 1`` points).
        target: what is explained (see ``attribution_maps``); its class / mask is the probability tracked.
        baseline: value the deleted voxels take (and insertion starts from): number, ``"mean"`` or tensor.
        absolute: order voxels by ``|attribution|`` rather than signed attribution.
        max_samples: use at most this many samples (None: all).
        image_key, label_key: keys of dict batches.
        selection_model: model whose output defines the explained selection (default ``model``); pass the
            unpruned model to score a pruned one on the same question.
        map_kwargs: passed to ``attribution_maps`` (``n_steps``, ``composite``, ...).

    Returns:
        ``{deletion_auc, insertion_auc (means), deletion_auc_per_image, insertion_auc_per_image (lists),
        fractions (x values), deletion_curve, insertion_curve (mean curves), curves: {deletion, insertion}
        ([N, steps + 1] tensors), n_images}``.
    """
    device = model_device(model)
    sel_model = model if selection_model is None else selection_model
    if isinstance(attribution, str) and attribution not in input_map_methods():
        raise ValueError(
            f"unknown attribution method {attribution!r}; use one of {input_map_methods()}, a tensor or a callable"
        )
    dels, ins = [], []
    offset = 0
    with _EvalMode(model, sel_model):
        for x, y in _iter_batches(data, image_key, label_key, max_samples, device):
            check_input_dims(model, x)
            sel = explained_selection(sel_model, x.to(model_device(sel_model)), y, target).to(device)
            if isinstance(attribution, torch.Tensor):
                maps = attribution[offset : offset + x.shape[0]]
                if maps.shape[0] != x.shape[0]:
                    raise ValueError(
                        f"precomputed maps hold {attribution.shape[0]} samples, data has more (at least {offset + x.shape[0]})"
                    )
            elif callable(attribution) and not isinstance(attribution, str):
                maps = attribution(model, x, sel)
            else:
                maps = attribution_maps(model, x, attribution, selection=sel, **map_kwargs)
            offset += x.shape[0]
            d, i = deletion_insertion_curves(model, x, maps, sel, steps, baseline, absolute)
            dels.append(d)
            ins.append(i)
    if not dels:
        raise ValueError("empty data: the loader yielded no samples for the faithfulness curves")
    dcurves, icurves = torch.cat(dels), torch.cat(ins)
    dauc, iauc = curve_auc(dcurves), curve_auc(icurves)
    return {
        "deletion_auc": float(dauc.mean()),
        "insertion_auc": float(iauc.mean()),
        "deletion_auc_per_image": dauc.tolist(),
        "insertion_auc_per_image": iauc.tolist(),
        "fractions": torch.linspace(0.0, 1.0, steps + 1).tolist(),
        "deletion_curve": dcurves.mean(0).tolist(),
        "insertion_curve": icurves.mean(0).tolist(),
        "curves": {"deletion": dcurves, "insertion": icurves},
        "n_images": int(dcurves.shape[0]),
    }


# ---------------------------------------------------------------------------------------------- report
def explanation_report(
    model_before: nn.Module,
    model_after: nn.Module,
    data: Any,
    out_dir: str | Path,
    method: str = "ig",
    *,
    n_images: int = 4,
    max_samples: int = 8,
    target: TargetSpec = "label",
    n_steps: int = 8,
    steps: int = 10,
    baseline: float | str | torch.Tensor = 0.0,
    image_key: str = "image",
    label_key: str = "label",
    labels: Sequence[str] = ("unpruned", "pruned"),
    writer: Any = None,
    global_step: int = 0,
    prefix: str = "explanations",
    **map_kwargs: Any,
) -> dict[str, Any]:
    """Explanation metrics and figures for an unpruned / pruned pair, cheap enough for a bundle's default run.

    Maps are computed once per model on the first ``max_samples`` samples (both models explain the
    unpruned model's selection), then reused for agreement, faithfulness and the overlays.

    Args:
        model_before: the unpruned network.
        model_after: the pruned (and possibly fine-tuned) network.
        data: a batch, a dict batch or an iterable (loader) of them.
        out_dir: folder for the PNG files (created).
        method: ``"ig"`` or ``"lrp"``.
        n_images: how many images get heatmap overlays.
        max_samples: samples used for the metrics.
        target: what is explained (see ``attribution_maps``).
        n_steps: IG steps (ignored by LRP).
        steps: deletion / insertion steps.
        baseline: deletion / insertion replacement value (a number, ``"mean"`` or a tensor); the IG
            baseline is 0 unless ``map_kwargs`` has ``ig_baseline``.
        image_key, label_key: keys of dict batches.
        labels: names of the two models in the figures.
        writer: optional TensorBoard ``SummaryWriter`` (or a ``TensorBoardStatsHandler``) to receive the overlays.
        global_step: TensorBoard step.
        prefix: file name prefix of the PNG files and the TensorBoard tag.
        map_kwargs: passed to ``attribution_maps`` (``composite``, ``internal_batch_size``, ``ig_baseline``).

    Returns:
        ``{expl_spearman, expl_top10_iou, expl_ssim (medians), expl_*_iqr, expl_*_ci (95 % bootstrap
        intervals of the medians over images), deletion_auc_base, deletion_auc_pruned (means; ``*_ci``:
        bootstrap intervals), insertion_auc_base, insertion_auc_pruned, n_images, pngs: [paths]}``.
    """
    from monai_iaprune.report.plots import (
        log_heatmaps_to_tensorboard,
        plot_faithfulness_curves,
        plot_heatmap_overlays,
    )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "ig_baseline" in map_kwargs:
        map_kwargs["baseline"] = map_kwargs.pop("ig_baseline")
    if method == "ig":
        map_kwargs.setdefault("n_steps", n_steps)
    x, _, sel, ma, mb = _explain_pair(
        model_before, model_after, data, method, target, max_samples, image_key, label_key, map_kwargs
    )
    agree = agreement_from_maps(ma, mb, 0.1)
    faith = {}
    for key, model, maps in (("base", model_before, ma), ("pruned", model_after, mb)):
        with _EvalMode(model):
            d, i = deletion_insertion_curves(model, x, maps, sel, steps, baseline)
        faith[key] = {
            "deletion_auc": float(curve_auc(d).mean()),
            "deletion_auc_ci": list(bootstrap_ci(curve_auc(d).tolist(), np.mean)),
            "insertion_auc": float(curve_auc(i).mean()),
            "fractions": torch.linspace(0.0, 1.0, steps + 1).tolist(),
            "deletion_curve": d.mean(0).tolist(),
            "insertion_curve": i.mean(0).tolist(),
        }
    k = min(n_images, x.shape[0])
    heatmaps_png = out_dir / f"{prefix}_heatmaps.png"
    curves_png = out_dir / f"{prefix}_deletion_insertion.png"
    plot_heatmap_overlays(x[:k], ma[:k], mb[:k], heatmaps_png, titles=tuple(labels))
    plot_faithfulness_curves({labels[0]: faith["base"], labels[1]: faith["pruned"]}, curves_png)
    pngs = [str(heatmaps_png), str(curves_png)]
    if writer is not None:
        log_heatmaps_to_tensorboard(
            writer, x[:k], ma[:k], mb[:k], step=global_step, tag=prefix, names=tuple(labels)
        )
    return {
        "expl_spearman": agree["spearman_median"],
        "expl_spearman_iqr": agree["spearman_iqr"],
        "expl_spearman_ci": agree["spearman_ci"],
        "expl_top10_iou": agree["top10_iou_median"],
        "expl_top10_iou_iqr": agree["top10_iou_iqr"],
        "expl_top10_iou_ci": agree["top10_iou_ci"],
        "expl_ssim": agree["ssim_median"],
        "expl_ssim_iqr": agree["ssim_iqr"],
        "expl_ssim_ci": agree["ssim_ci"],
        "deletion_auc_base": faith["base"]["deletion_auc"],
        "deletion_auc_base_ci": faith["base"]["deletion_auc_ci"],
        "deletion_auc_pruned": faith["pruned"]["deletion_auc"],
        "deletion_auc_pruned_ci": faith["pruned"]["deletion_auc_ci"],
        "insertion_auc_base": faith["base"]["insertion_auc"],
        "insertion_auc_pruned": faith["pruned"]["insertion_auc"],
        "n_images": agree["n_images"],
        "pngs": pngs,
    }


__all__ = [
    "agreement_from_maps",
    "bootstrap_ci",
    "attribution_maps",
    "curve_auc",
    "deletion_insertion_curves",
    "explained_selection",
    "explanation_agreement",
    "explanation_report",
    "faithfulness",
    "map_ssim",
    "spearman_correlation",
    "top_fraction_iou",
]
