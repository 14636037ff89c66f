"""benchmarks/recovery.py: drops are base minus fine-tuned, means over seeds, plain compared on the same seeds."""

from __future__ import annotations

import csv
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import recovery as bench  # noqa: E402

COLS = ["dataset", "method", "budget", "seed", "ft_epochs", "acc_base", "acc_finetuned", "val_acc_base",
        "val_acc_finetuned", "ft_feature_weight", "ft_kd_alpha", "schedule"]  # fmt: skip


def _write(path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, COLS)
        w.writeheader()
        w.writerows(rows)


def _row(seed, epochs, acc_ft, weight="", alpha="", schedule="oneshot"):
    return {"dataset": "breastmnist", "method": "lrp", "budget": "0.85", "seed": seed, "ft_epochs": epochs,
            "acc_base": 0.80, "acc_finetuned": acc_ft, "val_acc_base": 0.90, "val_acc_finetuned": 0.85,
            "ft_feature_weight": weight, "ft_kd_alpha": alpha, "schedule": schedule}  # fmt: skip


def test_tables_and_plot(tmp_path):
    ftlen, feature = tmp_path / "ftlen.csv", tmp_path / "feature.csv"
    _write(ftlen, [_row(0, 8, 0.78), _row(1, 8, 0.76), _row(0, 16, 0.80), _row(1, 16, 0.79)])
    _write(
        feature, [_row(1, 8, 0.81, 3.0)]
    )  # one seed only: compared with plain seed 1 (drop 4.0), not the mean
    kd, gradual = tmp_path / "kd.csv", tmp_path / "gradual.csv"
    _write(kd, [_row(0, 8, 0.79, 0.0, 0.5), _row(1, 8, 0.77, 0.0, 0.9)])
    # an iterative plain row must not be taken as the one-shot reference
    _write(ftlen, [*bench.read(ftlen), _row(0, 8, 0.50, schedule="iterative")])
    _write(gradual, [_row(0, 8, 0.80, schedule="iterative")])
    md = tmp_path / "rec.md"
    args = ["--ftlen", str(ftlen), "--feature", str(feature), "--kd", str(kd), "--gradual", str(gradual)]
    args += [
        "--feature-kd",
        str(tmp_path / "none.csv"),
        "--lr",
        str(tmp_path / "none.csv"),
        "--raw",
        str(tmp_path / "none.csv"),
    ]  # absent: no table
    raw_kd = tmp_path / "raw_kd.csv"
    _write(raw_kd, [_row(0, 8, 0.80, 0.0, 0.9), _row(1, 8, 0.78, 0.0, 0.5)])
    args += ["--raw-kd", str(raw_kd)]
    assert bench.main([*args, "--md", str(md)]) == 0
    text = md.read_text()
    assert (
        "| breastmnist | lrp | 85% | 8 ep: **+3.0** / +5.0 (2 seeds) | 16 ep: **+0.5** / +5.0 (2 seeds) |"
        in text
    )
    assert "| breastmnist | lrp | 85% | 1 | +4.0 / +5.0 | **-1.0** / +5.0 | 3 |" in text
    assert (
        "| breastmnist | lrp | 85% | 2 | +3.0 / +5.0 | **+2.0** / +5.0 | 0.5, 0.9 |" in text
    )  # distillation
    assert (
        "| breastmnist | lrp | 85% | 1 | +2.0 / +5.0 | **+0.0** / +5.0 |\n" in text
    )  # gradual vs one-shot seed 0
    assert "relevance alone + logit distillation: test / val drop" in text
    assert "| breastmnist | lrp | 85% | 2 | +3.0 / +5.0 | **+1.0** / +5.0 | 0.9, 0.5 |" in text
    assert (tmp_path / "recovery.png").stat().st_size > 1000


def test_chosen_on_validation_never_looks_at_test():
    """The pick is the smallest mean validation drop on the seeds all candidates share (ties: plain); the test drop
    shown is the pick's, even where another candidate has a better test drop."""
    plain = [_row(0, 8, 0.80), _row(1, 8, 0.80), _row(0, 16, 0.80)]  # default length 8; val drop 5
    for r in plain:
        r["schedule"] = "oneshot"
    kd = [
        dict(_row(s, 8, 0.70, alpha=0.5), val_acc_finetuned=0.88) for s in (0, 1)
    ]  # val drop 2, test drop 10
    feature = [dict(_row(s, 8, 0.82, 3.0), val_acc_finetuned=0.86) for s in (0, 1, 2)]  # val 4, test -2
    lines = bench.chosen_table(plain, {"logit distillation": kd, "feature distillation": feature})
    assert lines[2] == "| breastmnist | 85% | 2 | logit distillation | +2.0 | **+10.0** | not met |"
    lines = bench.chosen_table(plain, {"feature distillation": feature})
    assert lines[2] == "| breastmnist | 85% | 2 | feature distillation | +4.0 | **-2.0** | met |"
    tie = [dict(_row(s, 8, 0.70, alpha=0.5)) for s in (0, 1)]  # val drop 5 = plain's: plain kept
    assert bench.chosen_table(plain, {"logit distillation": tie})[2].split(" | ")[3] == "plain"


def test_layer_caps_are_one_study_each(tmp_path):
    """--cap: rows of several caps in one CSV give one table per cap (never averaged together) and each cap is a
    candidate of the validation choice."""
    plain, cap = tmp_path / "plain.csv", tmp_path / "cap.csv"
    _write(plain, [_row(s, 8, 0.78) for s in (0, 1)])  # test drop 2, val drop 5
    rows = [
        dict(_row(s, 8, 0.80), val_acc_finetuned=0.88, max_layer_ratio="0.7") for s in (0, 1)
    ]  # val 2, test 0
    rows += [
        dict(_row(s, 8, 0.70), val_acc_finetuned=0.86, max_layer_ratio="0.8") for s in (0, 1)
    ]  # val 4, test 10
    with cap.open("w", newline="") as f:
        w = csv.DictWriter(f, [*COLS, "max_layer_ratio"])
        w.writeheader()
        w.writerows(rows)
    md = tmp_path / "rec.md"
    none = str(tmp_path / "none.csv")
    args = ["--ftlen", str(plain), "--cap", str(cap), "--md", str(md)]
    for opt in ("--feature", "--kd", "--feature-kd", "--lr", "--gradual", "--raw", "--raw-kd"):
        args += [opt, none]
    assert bench.main(args) == 0
    text = md.read_text()
    assert "no layer losing more than 70% of its channels" in text and "more than 80%" in text
    assert "| breastmnist | lrp | 85% | 2 | +2.0 / +5.0 | **+0.0** / +2.0 |" in text  # cap 0.7 alone
    assert "| breastmnist | lrp | 85% | 2 | +2.0 / +5.0 | **+10.0** / +4.0 |" in text  # cap 0.8 alone
    assert "| breastmnist | 85% | 2 | layer cap 0.7 | +2.0 | **+0.0** | met |" in text
