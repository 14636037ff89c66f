"""Figures of a pruning run, as PNG files (matplotlib, Agg canvas; pyplot's global state is not touched).

- ``plot_accuracy_vs_params``: accuracy vs share of parameters removed, one line per criterion,
  solid after pruning and dashed after fine-tuning (rows of the benchmark CSV).
- ``plot_channels_per_layer``: channels before / after pruning per layer (``PruneResult``).
- ``plot_relevance_distribution``: per-layer distribution of channel relevance (``ChannelRelevance``).
- ``plot_heatmap_overlays``: attribution heatmaps of the unpruned and the pruned model over the images
  (2D: the image; 3D: three orthogonal mid-slices).
- ``plot_faithfulness_curves``: deletion / insertion curves of several models.
- ``log_heatmaps_to_tensorboard``: the same images to TensorBoard via ``monai.visualize.plot_2d_or_3d_image``.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PathLike = str | Path


def _new_figure(**kwargs: Any) -> Figure:
    """A matplotlib ``Figure`` on its own Agg canvas (no pyplot, no global backend change; imported on first use)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight", format="png")
    return path


def _to_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _read_rows(rows: Iterable[Mapping[str, Any]] | PathLike) -> list[dict[str, Any]]:
    if isinstance(rows, (str, Path)):
        with open(rows, newline="") as f:
            return [dict(r) for r in csv.DictReader(f)]
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # pandas DataFrame
        return rows.to_dict("records")
    return [dict(r) for r in rows]


# ---------------------------------------------------------------------------------- accuracy vs params
def plot_accuracy_vs_params(
    rows: Iterable[Mapping[str, Any]] | PathLike,
    path: PathLike,
    *,
    dataset: str | None = None,
    model: str | None = None,
    baseline_acc: float | None = None,
    metric: str = "acc",
    title: str | None = None,
) -> Path:
    """Accuracy against the share of parameters removed, one colour per criterion (mean ± std over seeds).

    Args:
        rows: benchmark rows (dicts, a DataFrame, or a CSV path) with ``method``, ``params_removed`` and
            ``{metric}_pruned`` / ``{metric}_finetuned`` (either may be empty); ``dataset``, ``model``,
            ``seed`` are used when present.
        path: PNG file to write.
        dataset, model: keep only rows of this dataset / model.
        baseline_acc: accuracy of the unpruned model, drawn as a horizontal line.
        metric: column stem, e.g. ``"acc"`` or ``"auc"``.
        title: figure title (default: dataset / model).
    """
    data = _read_rows(rows)
    if dataset is not None:
        data = [r for r in data if r.get("dataset") == dataset]
    if model is not None:
        data = [r for r in data if r.get("model") == model]
    if not data:
        raise ValueError(f"no rows to plot (dataset={dataset!r}, model={model!r})")
    for col in ("method", "params_removed"):
        if col not in data[0]:
            raise KeyError(f"rows need a {col!r} column; got {sorted(data[0])}")
    combos = sorted({(str(r.get("dataset", "")), str(r.get("model", ""))) for r in data})
    groups: dict[str, dict[float, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in data:
        name = str(r["method"])
        if len(combos) > 1:
            name += f" [{r.get('dataset', '')}/{r.get('model', '')}]"
        x = _to_float(r["params_removed"])
        for kind in ("pruned", "finetuned"):
            v = _to_float(r.get(f"{metric}_{kind}"))
            if math.isfinite(v) and math.isfinite(x):
                groups[name][x][kind].append(v)
    if not groups:
        raise ValueError(f"no finite {metric}_pruned / {metric}_finetuned values to plot")
    xs_all = [x for g in groups.values() for x in g]
    scale = 100.0 if max(xs_all) <= 1.0 else 1.0  # fractions -> percent
    fig = _new_figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    colors = [f"C{i % 10}" for i in range(len(groups))]
    for color, (name, by_x) in zip(colors, sorted(groups.items())):
        for kind, style in (("pruned", "-"), ("finetuned", "--")):
            pts = sorted((x, vals[kind]) for x, vals in by_x.items() if vals[kind])
            if not pts:
                continue
            xs = np.array([p[0] for p in pts]) * scale
            mean = np.array([np.mean(p[1]) for p in pts])
            std = np.array([np.std(p[1]) for p in pts])
            label = f"{name} ({kind.replace('finetuned', 'fine-tuned')})"
            ax.plot(xs, mean, style, marker="o", ms=4, color=color, label=label)
            if (std > 0).any():
                ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
    if baseline_acc is not None:
        ax.axhline(baseline_acc, color="k", linestyle=":", linewidth=1, label="unpruned")
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    single = combos[0] if len(combos) == 1 else ("", "")
    default_title = " / ".join(c for c in (dataset or single[0], model or single[1]) if c)
    ax.set_title(title if title is not None else default_title)
    return _save(fig, path)


# ------------------------------------------------------------------------------------ channels per layer
def _channel_pairs(channels: Any) -> list[tuple[str, int, int]]:
    if hasattr(channels, "channels") and isinstance(channels.channels, Mapping):  # PruneResult
        channels = channels.channels
    if isinstance(channels, Mapping) and "per_layer" in channels:  # PruneResult.as_dict()
        channels = channels["per_layer"]
    if isinstance(channels, Mapping):
        return [(str(n), int(v[0]), int(v[1])) for n, v in channels.items()]
    out = []
    for r in channels:
        try:
            out.append((str(r["name"]), int(r["channels_before"]), int(r["channels_after"])))
        except KeyError as e:
            raise KeyError(f"per-layer rows need name, channels_before, channels_after; missing {e}") from e
    return out


def plot_channels_per_layer(channels: Any, path: PathLike, *, title: str | None = None) -> Path:
    """Bar chart of output channels per layer before and after pruning.

    Args:
        channels: a ``PruneResult``, its ``as_dict()``, ``{layer: (before, after)}`` or a list of
            ``{name, channels_before, channels_after}`` dicts.
        path: PNG file to write.
        title: figure title.
    """
    pairs = _channel_pairs(channels)
    if not pairs:
        raise ValueError("no layers to plot")
    names = [p[0] for p in pairs]
    before = np.array([p[1] for p in pairs])
    after = np.array([p[2] for p in pairs])
    idx = np.arange(len(pairs))
    fig = _new_figure(figsize=(max(6.0, 0.35 * len(pairs) + 2), 4.5))
    ax = fig.subplots()
    ax.bar(idx, before, color="0.8", label="before")
    ax.bar(idx, after, color="C0", label="after")
    ax.set_xticks(idx)
    ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("output channels")
    ax.legend(fontsize=8)
    kept = after.sum() / max(before.sum(), 1)
    ax.set_title(title if title is not None else f"channels kept per layer ({100 * kept:.0f}% overall)")
    return _save(fig, path)


# ----------------------------------------------------------------------------- relevance distribution
def plot_relevance_distribution(
    relevance: Mapping[str, Any],
    path: PathLike,
    *,
    kind: str = "box",
    normalize: bool = True,
    log_scale: bool = False,
    title: str | None = None,
) -> Path:
    """Distribution of per-channel relevance in each layer (box or violin plot).

    Args:
        relevance: ``{layer: 1-D per-channel relevance}`` (a ``ChannelRelevance``).
        path: PNG file to write.
        kind: ``"box"`` or ``"violin"``.
        normalize: divide each layer by its mean (as ``RelevanceImportance``'s default normaliser), so
            layers of different scales share an axis.
        log_scale: log y axis (only for positive values).
        title: figure title (default: the relevance method).
    """
    if kind not in ("box", "violin"):
        raise ValueError(f"kind must be 'box' or 'violin', got {kind!r}")
    names, values = [], []
    for n, v in relevance.items():
        a = torch.as_tensor(v).detach().double().flatten().cpu().numpy()
        if a.size == 0:
            continue
        if normalize:
            m = np.abs(a).mean()
            a = a / m if m > 0 else a
        names.append(str(n))
        values.append(a)
    if not values:
        raise ValueError("no layer relevance to plot")
    fig = _new_figure(figsize=(max(6.0, 0.35 * len(values) + 2), 4.5))
    ax = fig.subplots()
    pos = np.arange(1, len(values) + 1)
    if kind == "box":
        ax.boxplot(values, positions=pos, widths=0.6, showfliers=True)
    else:
        ax.violinplot([v if v.size > 1 else np.repeat(v, 2) for v in values], positions=pos, showmedians=True)
    ax.set_xticks(pos)
    ax.set_xticklabels(names, rotation=75, ha="right", fontsize=7)
    if log_scale and all((v > 0).all() for v in values):
        ax.set_yscale("log")
    ax.set_ylabel("channel relevance" + (" / layer mean" if normalize else ""))
    method = getattr(relevance, "method", None)
    ax.set_title(
        title if title is not None else f"channel relevance per layer{f' ({method})' if method else ''}"
    )
    return _save(fig, path)


# ------------------------------------------------------------------------------------- heatmap overlays
def _views(image: np.ndarray, spatial: int) -> list[tuple[str, np.ndarray]]:
    """2D: the image; 3D ``[D, H, W]``: three orthogonal mid-slices."""
    if spatial == 2:
        return [("", image)]
    d, h, w = image.shape
    return [("axis 0", image[d // 2]), ("axis 1", image[:, h // 2]), ("axis 2", image[:, :, w // 2])]


def _as_maps(maps: torch.Tensor | np.ndarray, spatial_shape: tuple[int, ...]) -> np.ndarray:
    m = torch.as_tensor(maps).detach().float().cpu()
    if m.ndim == len(spatial_shape) + 2:
        m = m.sum(1)
    if tuple(m.shape[1:]) != spatial_shape:
        raise ValueError(
            f"maps of shape {tuple(m.shape)} do not match images of spatial shape {spatial_shape}"
        )
    return m.numpy()


def plot_heatmap_overlays(
    images: torch.Tensor | np.ndarray,
    maps_before: torch.Tensor | np.ndarray,
    maps_after: torch.Tensor | np.ndarray,
    path: PathLike,
    *,
    titles: Sequence[str] = ("unpruned", "pruned"),
    alpha: float = 0.6,
    cmap: str = "bwr",
    max_images: int = 4,
) -> Path:
    """Attribution heatmaps of two models over the same images: rows are images (3 mid-slices each for 3D),
    columns are the image, the first model's overlay and the second model's overlay.

    Each map is shown on a symmetric colour scale (``cmap``, blue negative / red positive) scaled to its own
    ``max |value|``, since pruned and unpruned models differ in logit scale.

    Args:
        images: ``[B, C, *spatial]`` inputs (the first channel is shown).
        maps_before, maps_after: ``[B, *spatial]`` (or ``[B, C, *spatial]``) maps of the two models.
        path: PNG file to write.
        titles: names of the two models.
        alpha: heatmap opacity.
        cmap: matplotlib colour map of the heatmap.
        max_images: show at most this many images.
    """
    x = torch.as_tensor(images).detach().float().cpu()
    if x.ndim not in (4, 5):
        raise ValueError(f"images must be [B, C, H, W] or [B, C, D, H, W], got shape {tuple(x.shape)}")
    spatial = x.ndim - 2
    n = min(max_images, x.shape[0])
    if n < 1:
        raise ValueError("no images to plot")
    sp = tuple(x.shape[2:])
    mb, ma = _as_maps(maps_before, sp)[:n], _as_maps(maps_after, sp)[:n]
    imgs = x[:n, 0].numpy()
    rows_per = 1 if spatial == 2 else 3
    fig = _new_figure(figsize=(3 * 2.6, n * rows_per * 2.6))
    axes = np.asarray(fig.subplots(n * rows_per, 3, squeeze=False))
    for i in range(n):
        lim_b = max(float(np.abs(mb[i]).max()), 1e-12)
        lim_a = max(float(np.abs(ma[i]).max()), 1e-12)
        for r, ((view, img), (_, hb), (_, ha)) in enumerate(
            zip(_views(imgs[i], spatial), _views(mb[i], spatial), _views(ma[i], spatial))
        ):
            row = axes[i * rows_per + r]
            for ax in row:
                ax.imshow(img, cmap="gray")
                ax.set_xticks([])
                ax.set_yticks([])
            row[1].imshow(hb, cmap=cmap, vmin=-lim_b, vmax=lim_b, alpha=alpha)
            row[2].imshow(ha, cmap=cmap, vmin=-lim_a, vmax=lim_a, alpha=alpha)
            label = f"image {i}" + (f", {view}" if view else "")
            row[0].set_ylabel(label, fontsize=8)
            if i == 0 and r == 0:
                row[0].set_title("image", fontsize=9)
                row[1].set_title(titles[0], fontsize=9)
                row[2].set_title(titles[1], fontsize=9)
    return _save(fig, path)


# ---------------------------------------------------------------------------------- faithfulness curves
def plot_faithfulness_curves(
    results: Mapping[str, Mapping[str, Any]], path: PathLike, *, title: str | None = None
) -> Path:
    """Mean deletion and insertion curves of several models side by side, AUC in the legend.

    Args:
        results: ``{model name: faithfulness(...) result}``; each needs ``fractions``, ``deletion_curve``,
            ``insertion_curve`` and may have ``deletion_auc`` / ``insertion_auc``.
        path: PNG file to write.
        title: figure title.
    """
    if not results:
        raise ValueError("no curves to plot")
    fig = _new_figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for j, (name, res) in enumerate(results.items()):
            try:
                xs, ys = np.asarray(res["fractions"]), np.asarray(res[f"{kind}_curve"])
            except KeyError as e:
                raise KeyError(f"result {name!r} lacks {e}; pass faithfulness() results") from e
            auc = res.get(f"{kind}_auc")
            label = name if auc is None else f"{name} (AUC {auc:.3f})"
            ax.plot(100 * xs, ys, marker=".", color=f"C{j % 10}", label=label)
        ax.set_xlabel(f"pixels / voxels {'removed' if kind == 'deletion' else 'inserted'} (%)")
        ax.set_ylabel("class probability")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(kind)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------- TensorBoard
def log_heatmaps_to_tensorboard(
    writer: Any,
    images: torch.Tensor,
    maps_before: torch.Tensor,
    maps_after: torch.Tensor,
    *,
    step: int = 0,
    tag: str = "explanations",
    names: Sequence[str] = ("unpruned", "pruned"),
    max_images: int = 4,
) -> list[str]:
    """Send images and both models' maps to TensorBoard through ``monai.visualize.plot_2d_or_3d_image``
    (2D as images, 3D as animated GIFs along the first spatial axis).

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (or tensorboardX one), or a MONAI
            ``TensorBoardStatsHandler`` / ``TensorBoardImageHandler`` whose writer is used.
        images: ``[B, C, *spatial]`` inputs (first channel shown).
        maps_before, maps_after: ``[B, *spatial]`` (or ``[B, C, *spatial]``) maps.
        step: global step.
        tag: tag prefix.
        names: names of the two models (tag suffixes).
        max_images: log at most this many images.

    Returns:
        The tag prefixes written (``{tag}/{i}/image``, ``{tag}/{i}/{name}``).
    """
    from monai.visualize import plot_2d_or_3d_image

    w = getattr(writer, "_writer", writer)
    if not hasattr(w, "add_image"):
        raise TypeError(
            f"writer must be a TensorBoard SummaryWriter or a MONAI TensorBoard handler, got {type(writer).__name__}"
        )
    x = torch.as_tensor(images).detach().float().cpu()
    sp = tuple(x.shape[2:])
    maps = [torch.from_numpy(_as_maps(m, sp)) for m in (maps_before, maps_after)]
    tags = []
    for i in range(min(max_images, x.shape[0])):
        items = [("image", x[i : i + 1, :1])] + [(nm, m[i : i + 1, None]) for nm, m in zip(names, maps)]
        for nm, d in items:
            t = f"{tag}/{i}/{nm}"
            plot_2d_or_3d_image(d, step=step, writer=w, index=0, max_channels=1, tag=t)
            tags.append(t)
    return tags


__all__ = [
    "log_heatmaps_to_tensorboard",
    "plot_accuracy_vs_params",
    "plot_channels_per_layer",
    "plot_faithfulness_curves",
    "plot_heatmap_overlays",
    "plot_relevance_distribution",
]
