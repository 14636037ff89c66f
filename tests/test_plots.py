"""Figures: every plot writes a real, non-blank PNG; TensorBoard receives the heatmaps."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from monai_iaprune.pruning.prune import PruneResult
from monai_iaprune.relevance.collect import ChannelRelevance
from monai_iaprune.report.plots import (
    log_heatmaps_to_tensorboard,
    plot_accuracy_vs_params,
    plot_channels_per_layer,
    plot_faithfulness_curves,
    plot_heatmap_overlays,
    plot_relevance_distribution,
)


def _check_png(path, min_side: int = 200) -> tuple[int, int]:
    """The file is a PNG of at least ``min_side`` pixels a side with real content (not one flat colour)."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        arr = np.asarray(im.convert("RGB")).astype(float)
    assert w >= min_side and h >= min_side, (w, h)
    assert arr.std() > 5.0  # not blank
    assert (arr.reshape(-1, 3) < 250).any(axis=1).mean() > 0.01  # more than a border of non-white pixels
    return w, h


def _rows():
    rows = []
    for method, drop in (("lrp", 0.05), ("magnitude", 0.15), ("random", 0.3)):
        for seed in (0, 1):
            for pr in (0.0, 0.3, 0.5, 0.7):
                acc = 0.86 - drop * pr * 2 + 0.01 * seed
                rows.append(
                    {
                        "dataset": "breastmnist",
                        "model": "resnet18",
                        "method": method,
                        "params_removed": pr,
                        "seed": seed,
                        "acc_pruned": acc,
                        "acc_finetuned": ""
                        if method == "random"
                        else acc + 0.05,  # missing values are skipped
                    }
                )
    return rows


def test_accuracy_vs_params_from_rows_and_csv(tmp_path):
    rows = _rows()
    p1 = plot_accuracy_vs_params(rows, tmp_path / "acc.png", baseline_acc=0.86)
    _check_png(p1)
    csv_path = tmp_path / "bench.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    p2 = plot_accuracy_vs_params(csv_path, tmp_path / "sub" / "acc_csv.png", dataset="breastmnist")
    _check_png(p2)
    with pytest.raises(ValueError, match="no rows"):
        plot_accuracy_vs_params(rows, tmp_path / "x.png", dataset="nope")
    with pytest.raises(KeyError, match="params_removed"):
        plot_accuracy_vs_params([{"method": "lrp", "acc_pruned": 0.5}], tmp_path / "y.png")


def test_channels_per_layer_accepts_all_forms(tmp_path):
    channels = {f"features.{i}.conv": (64, 64 - 7 * i) for i in range(8)}
    res = PruneResult(0.5, "params", 1000, 500, 1e6, 5e5, channels, 0.3)
    sizes = [
        _check_png(plot_channels_per_layer(res, tmp_path / "a.png")),
        _check_png(plot_channels_per_layer(res.as_dict(), tmp_path / "b.png")),
        _check_png(plot_channels_per_layer(res.as_dict()["per_layer"], tmp_path / "c.png")),
        _check_png(plot_channels_per_layer(channels, tmp_path / "d.png")),
    ]
    assert len(set(sizes)) == 1  # the same figure from every form
    with pytest.raises(KeyError, match="channels_after"):
        plot_channels_per_layer([{"name": "a", "channels_before": 3}], tmp_path / "e.png")


@pytest.mark.parametrize("kind", ["box", "violin"])
def test_relevance_distribution(tmp_path, kind):
    g = torch.Generator().manual_seed(0)
    rel = ChannelRelevance(
        {f"layer{i}": torch.rand(8 * (i + 1), generator=g) * (i + 1) for i in range(5)}, "lrp", 10
    )
    rel["single"] = torch.tensor([1.0])  # one-channel layer must not break the violin plot
    _check_png(plot_relevance_distribution(rel, tmp_path / f"{kind}.png", kind=kind, log_scale=True))
    with pytest.raises(ValueError, match="kind"):
        plot_relevance_distribution(rel, tmp_path / "z.png", kind="bar")


def test_heatmap_overlays_2d_and_3d(tmp_path):
    g = torch.Generator().manual_seed(0)
    x2 = torch.rand(3, 1, 28, 28, generator=g)
    w2, h2 = _check_png(
        plot_heatmap_overlays(x2, torch.randn(3, 28, 28), torch.randn(3, 1, 28, 28), tmp_path / "h2.png")
    )
    x3 = torch.rand(3, 1, 16, 16, 16, generator=g)
    w3, h3 = _check_png(
        plot_heatmap_overlays(x3, torch.randn(3, 16, 16, 16), torch.randn(3, 16, 16, 16), tmp_path / "h3.png")
    )
    assert w3 == pytest.approx(w2, rel=0.2)
    assert h3 > 2 * h2  # three orthogonal mid-slices per 3D image
    _, h1 = _check_png(
        plot_heatmap_overlays(
            x2, torch.randn(3, 28, 28), torch.randn(3, 28, 28), tmp_path / "h1.png", max_images=1
        )
    )
    assert h1 < h2
    with pytest.raises(ValueError, match="do not match"):
        plot_heatmap_overlays(x2, torch.randn(3, 20, 20), torch.randn(3, 28, 28), tmp_path / "bad.png")


def test_faithfulness_curves_plot(tmp_path):
    xs = np.linspace(0, 1, 11).tolist()
    res = {
        "unpruned": {
            "fractions": xs,
            "deletion_curve": np.exp(-5 * np.array(xs)).tolist(),
            "insertion_curve": xs,
            "deletion_auc": 0.2,
        },
        "pruned": {"fractions": xs, "deletion_curve": (1 - np.array(xs)).tolist(), "insertion_curve": xs},
    }
    _check_png(plot_faithfulness_curves(res, tmp_path / "f.png", title="BreastMNIST"))
    with pytest.raises(KeyError, match="insertion_curve"):
        plot_faithfulness_curves({"a": {"fractions": xs, "deletion_curve": xs}}, tmp_path / "g.png")


@pytest.mark.parametrize("spatial", [(16, 16), (8, 8, 8)])
def test_tensorboard_receives_heatmaps(tmp_path, spatial):
    pytest.importorskip("tensorboard")
    from monai.handlers import TensorBoardStatsHandler
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path))
    handler = TensorBoardStatsHandler(summary_writer=writer)  # the handler's writer is used
    x = torch.rand(2, 1, *spatial)
    tags = log_heatmaps_to_tensorboard(
        handler, x, torch.randn(2, *spatial), torch.randn(2, *spatial), step=3, max_images=2
    )
    writer.flush()
    writer.close()
    assert len(tags) == 6
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    logged = acc.Tags()["images"]
    assert len(logged) == 6
    for t in tags:
        assert any(s.startswith(t) for s in logged), (t, logged)
    assert {e.step for s in logged for e in acc.Images(s)} == {3}
    with pytest.raises(TypeError, match="SummaryWriter"):
        log_heatmaps_to_tensorboard(object(), x, x[:, 0], x[:, 0])
