"""benchmarks/explanations_segmentation.py: rows read off the bundle's prune report, table per seed and means."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import explanations_segmentation as bench  # noqa: E402


def _report(spearman: float, dice: float) -> dict:
    return {
        "explanation_method": "ig",
        "expl_spearman": spearman,
        "expl_spearman_ci": [spearman - 0.1, spearman + 0.05],
        "expl_top10_iou": 0.5,
        "expl_top10_iou_ci": [0.4, 0.6],
        "deletion_auc_base": 0.2,
        "deletion_auc_pruned": 0.3,
        "metric_before": 0.9,
        "metric_after": dice,
        "macs_before": 200.0,
        "macs_after": 100.0,
        "n_images": 16,
    }


def test_rows_and_summary(tmp_path):
    out = tmp_path / "rows.csv"
    for seed, (s, d) in enumerate([(0.5, 0.8), (0.7, 0.9)]):
        for weight, feature in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0)):
            fields = {
                "dataset": "seg",
                "method": "lrp",
                "macs_removed": 0.5,
                "seed": seed,
                "explain_weight": weight,
                "feature_weight": feature,
            }
            fields["finetune"] = "explain" if weight else "feature" if feature else "plain"
            spearman = s + weight / 10 + feature / 5
            bench.append_row(out, bench.row_from_report(_report(spearman, d), **fields))
    rows = bench.read_rows(out)
    assert len(rows) == 6 and set(bench.COLUMNS) == set(rows[0])
    assert float(rows[0]["macs_ratio"]) == 0.5 and float(rows[0]["spearman_ci_lo"]) == pytest.approx(0.4)
    assert (
        len({bench._key(r) for r in rows}) == 6
    )  # the weights are part of the key: no arm overwrites another
    md = bench.summarize(rows, "cmd")
    # means over the two seeds: plain Spearman (0.5 + 0.7) / 2, explain (0.6 + 0.8) / 2, feature (0.7 + 0.9) / 2
    assert "| 50% | plain | ig | 2 | 0.850 | 0.600 | 0.500 | 0.300 |" in md
    assert "| 50% | explain 1 | ig | 2 | 0.850 | 0.700 | 0.500 | 0.300 |" in md
    assert "| 50% | feature 1 | ig | 2 | 0.850 | 0.800 | 0.500 | 0.300 |" in md
    assert "0.600 [0.500, 0.650]" in md  # seed 0's explain row with its interval
    # a file written before the feature arm existed (no feature_weight column) keeps its keys and labels
    old = [{k: v for k, v in r.items() if k != "feature_weight"} for r in rows if r["finetune"] != "feature"]
    assert {bench._key(r) for r in old} <= {bench._key(r) for r in rows}
    assert "| 50% | explain 1 | ig | 2 |" in bench.summarize(old, "cmd")


def test_bad_settings_stop_before_any_run(tmp_path):
    with pytest.raises(SystemExit, match="bad --ratios entry 1.0"):
        bench.main(["--ratios", "1.0", "--work", str(tmp_path)])
    with pytest.raises(SystemExit, match="bad --weights entry 0.0"):
        bench.main(["--weights", "0", "--work", str(tmp_path)])
