"""PruneReportHandler in a MONAI SupervisedTrainer: explanation metrics, figures and the linked Markdown report."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from ignite.metrics import Accuracy
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import StatsHandler, from_engine
from monai.networks.nets import ResNet
from torch import nn
from torch.utils.data import DataLoader

from monai_iaprune.handlers import PruneReportHandler, RelevancePruningHandler
from monai_iaprune.handlers.prune_report_handler import EXPLANATION_METRICS
from monai_iaprune.report.explanations import explanation_report
from monai_iaprune.report.prune_report import render_markdown


def _loader(n: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = [{"image": torch.randn(1, 16, 16, generator=g), "label": i % 3} for i in range(n)]
    return DataLoader(data, batch_size=4, shuffle=False)


class _FakeWriter:
    """Records what ``monai.visualize.plot_2d_or_3d_image`` sends to a TensorBoard writer."""

    def __init__(self) -> None:
        self.tags: list[str] = []

    def add_image(self, tag, *args, **kwargs) -> None:
        self.tags.append(tag)


def _run(tmp_path: Path, **report_kwargs):
    torch.manual_seed(0)
    net = ResNet("basic", [1, 1, 1, 1], [4, 8, 8, 16], spatial_dims=2, n_input_channels=1, num_classes=3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    data = _loader()
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=_loader(seed=1),
        network=net,
        key_val_metric={"acc": Accuracy(output_transform=from_engine(["pred", "label"]))},
    )
    pruning = RelevancePruningHandler(
        method="taylor", ratio=0.5, data=data, evaluator=evaluator, max_batches=1
    )
    report = PruneReportHandler(
        evaluator,
        str(tmp_path),
        torch.rand(1, 1, 16, 16),
        pruning_handler=pruning,
        latency_warmup=0,
        latency_repeats=1,
        **report_kwargs,
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=2,
        train_data_loader=data,
        network=net,
        optimizer=opt,
        loss_function=nn.CrossEntropyLoss(),
        train_handlers=[report, pruning, StatsHandler(name="stats_under_test", iteration_log=False)],
    )
    trainer.run()
    return trainer, net, evaluator, report


def test_report_has_explanations_figures_and_metrics(tmp_path, capsys):
    writer = _FakeWriter()
    trainer, net, evaluator, handler = _run(
        tmp_path, explain_kwargs={"n_images": 2}, tensorboard_writer=writer
    )
    report = json.loads((tmp_path / "prune_report.json").read_text())
    assert report["params_after"] < report["params_before"]
    for k in EXPLANATION_METRICS:
        assert math.isfinite(report[k]), k
        assert trainer.state.metrics[k] == pytest.approx(report[k]), k
    assert -1.0 <= report["expl_spearman"] <= 1.0
    assert 0.0 <= report["expl_top10_iou"] <= 1.0
    assert report["explanation_method"] == "ig" and report["n_images"] == 8
    # StatsHandler (attached after the report handler) printed the explanation metrics of the last epoch
    stats = [line for line in capsys.readouterr().out.splitlines() if "Epoch[2] Metrics" in line]
    assert stats and "expl_spearman" in stats[0], stats

    # the frozen copy is the unpruned network, and the numbers are explanation_report's on the evaluator data
    assert sum(p.numel() for p in handler.unpruned.parameters()) == report["params_before"]
    again = explanation_report(handler.unpruned, net, evaluator.data_loader, tmp_path / "again", n_images=2)
    assert again["expl_spearman"] == pytest.approx(report["expl_spearman"], abs=1e-9)
    assert again["deletion_auc_pruned"] == pytest.approx(report["deletion_auc_pruned"], abs=1e-9)

    # every PNG exists, lies under figures/ and is linked from the Markdown by its relative path
    expected = {
        "figures/channels_per_layer.png",
        "figures/relevance_distribution.png",
        "figures/explanations_heatmaps.png",
        "figures/explanations_deletion_insertion.png",
    }
    assert set(report["figures"]) == expected
    md = (tmp_path / "prune_report.md").read_text()
    links = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md))
    assert links == expected
    for f in expected:
        assert (tmp_path / f).stat().st_size > 1000, f
    assert "## Figures" in md and "## Explanations" in md
    assert f"| Spearman rank correlation | {report['expl_spearman']:.3g} |" in md
    lo, hi = report["expl_spearman_ci"]  # bootstrap interval of the median over the 8 images
    assert lo <= report["expl_spearman"] <= hi and f"[{lo:.3g}, {hi:.3g}]" in md
    # the heatmaps went to TensorBoard too (MONAI tags 2D images "..._HW_0"): image + both models, 2 images
    assert sorted(t.rsplit("_HW", 1)[0] for t in writer.tags) == sorted(
        f"explanations/{i}/{n}" for i in range(2) for n in ("image", "unpruned", "pruned")
    )


def test_explain_false_skips_explanations_but_keeps_figures(tmp_path):
    trainer, _, _, handler = _run(tmp_path, explain=False)
    report = json.loads((tmp_path / "prune_report.json").read_text())
    assert handler.unpruned is None
    assert not any(k in report for k in EXPLANATION_METRICS)
    assert not any(k in trainer.state.metrics for k in EXPLANATION_METRICS)
    assert report["figures"] == ["figures/channels_per_layer.png", "figures/relevance_distribution.png"]
    assert not (tmp_path / "figures" / "explanations_heatmaps.png").exists()
    md = (tmp_path / "prune_report.md").read_text()
    assert "## Explanations" not in md and "(figures/channels_per_layer.png)" in md


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"explain_method": "gradcam"}, "unknown explain_method 'gradcam'"),
        ({"explain_kwargs": {"method": "lrp"}}, r"explain_kwargs may not set \['method'\]"),
        ({"figures_dir": "/abs"}, "figures_dir must be a relative"),
    ],
)
def test_bad_explain_settings_fail_at_init(kwargs, match):
    ev = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=_loader(), network=nn.Conv2d(1, 1, 1)
    )
    with pytest.raises(ValueError, match=match):
        PruneReportHandler(ev, "/tmp/unused", torch.rand(1, 1, 8, 8), **kwargs)


def test_markdown_reports_a_figure_error():
    base = {
        "method": "taylor",
        "ratio": 0.5,
        "params_before": 10,
        "params_after": 5,
        "macs_before": 10.0,
        "macs_after": 5.0,
        "latency_ms_before": 1.0,
        "latency_ms_after": 0.5,
        "latency": {},
        "metric_name": "acc",
        "metric_before": 0.5,
        "metric_pruned": 0.4,
        "metric_after": 0.5,
        "per_layer": [],
        "timings_s": {},
        "versions": {},
    }
    assert "## Figures" not in render_markdown(base)
    md = render_markdown(base | {"figures": ["figures/a_b.png"], "figures_error": "ValueError: boom"})
    assert "Figures incomplete: ValueError: boom" in md and "![a b](figures/a_b.png)" in md
