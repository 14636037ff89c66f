"""benchmarks/finetune_noise.py: the goal's figure once per fine-tune seed, its spread, the check against budget.csv."""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import budget  # noqa: E402
import finetune_noise as bench  # noqa: E402


def _row(seed, arm, b, k, acc_ft, acc_base=0.80):
    return {"dataset": "breastmnist", "seed": seed, "arm": arm, "method": "" if arm == "unpruned" else arm,
            "budget": b, "ft_seed": k, "ft_epochs": 8, "acc_base": acc_base, "acc_pruned": 0.6,
            "acc_finetuned": acc_ft, "val_acc_base": 0.9, "val_acc_finetuned": 0.9, "best_epoch": 3,
            "macs_removed": b}  # fmt: skip


def test_summary_means_over_run_seeds_then_spread_over_fine_tune_seeds():
    rows = [
        _row(0, "lrp", 0.85, 0, 0.79), _row(1, "lrp", 0.85, 0, 0.77),  # drops 1, 3 -> mean 2
        _row(0, "lrp", 0.85, 1, 0.81), _row(1, "lrp", 0.85, 1, 0.79),  # drops -1, 1 -> mean 0
        _row(0, "lrp", 0.85, 2, 0.70),  # fine-tune seed 2 has one run seed only: left out of the spread
    ]  # fmt: skip
    s = bench.summarise([{k: str(v) for k, v in r.items()} for r in rows])[("breastmnist", "lrp", "0.85")]
    assert s["seeds"] == 2 and s["ft_seeds"] == 2
    assert s["means"] == pytest.approx([2.0, 0.0])
    assert s["mean"] == pytest.approx(1.0)
    assert s["sd"] == pytest.approx(2**0.5)  # sample SD of (2, 0)
    assert s["seed_sd"] == pytest.approx(2**0.5)  # both fine-tune seeds: SD of (1, 3) and of (-1, 1)
    assert s["met"] == 1  # only the fine-tune seed with a mean drop of 0 <= 0.5


def test_report_table_plot_and_budget_check(tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    rows = [
        _row(s, a, b, k, 0.80 - 0.01 * k)
        for s in (0, 1)
        for a, b in (("unpruned", 0.0), ("lrp", 0.85))
        for k in (0, 1)
    ]
    for r in rows:
        budget.append_row(out / "finetune_noise.csv", r, bench.COLUMNS)
    ref = tmp_path / "budget.csv"
    for s, acc in ((0, 0.80), (1, 0.79)):  # seed 1 differs by 0.01 from fine-tune seed 0's 0.80
        budget.append_row(
            ref,
            {"dataset": "breastmnist", "method": "lrp", "schedule": "oneshot", "budget_kind": "macs", "budget": 0.85,
             "seed": s, "acc_finetuned": acc},
        )  # fmt: skip
    text = bench.main(["--phase", "report", "--out", str(out), "--budget-csv", str(ref)])
    assert text == 0
    md = (out / "finetune_noise.md").read_text()
    assert (
        "| breastmnist | unpruned | 0% | 2 | 2 | +0.0 / +1.0 | +0.50 | 0.71 | 0.00 | 1 of 2 | +0.00 |" in md
    )
    assert "| breastmnist | lrp | 85% | 2 | 2 | +0.0 / +1.0 |" in md
    assert "2 rows, largest difference 0.0100" in md
    assert (out / "finetune_noise.png").stat().st_size > 1000


def test_validation_pick_never_reads_test():
    """Per run seed the fine-tune with the best validation ACC is taken, whatever its test ACC; ties: lowest seed."""
    rows = [
        dict(_row(0, "lrp", 0.85, 0, 0.79), val_acc_finetuned=0.85),
        dict(
            _row(0, "lrp", 0.85, 1, 0.70), val_acc_finetuned=0.95
        ),  # best on validation, worst on test: taken
        dict(_row(1, "lrp", 0.85, 0, 0.76), val_acc_finetuned=0.90),  # tie on validation: fine-tune seed 0
        dict(_row(1, "lrp", 0.85, 1, 0.80), val_acc_finetuned=0.90),
    ]
    picks = bench.chosen_on_validation([{k: str(v) for k, v in r.items()} for r in rows])
    assert picks[("breastmnist", "lrp", "0.85")] == pytest.approx([10.0, 4.0])


def test_bad_settings_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--ft-seeds", "0"])
    assert "--ft-seeds must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--budgets", "1.2"])
    assert "fractions of MACs removed" in capsys.readouterr().err


def test_report_without_rows_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="run --phase accuracy first"):
        bench.main(["--phase", "report", "--out", str(tmp_path)])
