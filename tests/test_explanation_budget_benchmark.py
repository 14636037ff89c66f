"""benchmarks/explanation_budget.py on a tiny subset: a row per explainer and threshold, the chosen budget's
validation agreement at or above the threshold, the test check beside it, tables and plot; bad thresholds refused."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import MEDMNIST, ROOT, require_file

SCRIPT = ROOT / "benchmarks" / "explanation_budget.py"


def _run(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_explanation_budget_benchmark_smoke(tmp_path):
    require_file(MEDMNIST / "breastmnist.npz")
    args = ["--datasets", "breastmnist", "--seeds", "0", "--limit", "64", "--epochs", "1", "--val", "16",
            "--test", "16", "--calib", "32", "--explainers", "lrp", "--thresholds", "0.05", "0.99",
            "--out", str(tmp_path)]  # fmt: skip
    _run(*args)
    with (tmp_path / "explanation_budget.csv").open() as f:
        rows = {r["min_agreement"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["0.05", "0.99"]
    for t, r in rows.items():
        tried = json.loads(r["tried"])
        assert tried and [a for a, _ in tried] == sorted((a for a, _ in tried), reverse=True)
        if float(r["ratio"]) > 0:  # chosen: the largest budget tried, at or above the threshold on validation
            assert float(r["val_spearman"]) >= float(t) and float(r["ratio"]) == tried[-1][0]
            assert all(a < float(t) for _, a in tried[:-1])
            assert -1 <= float(r["test_spearman"]) <= 1 and 0 <= float(r["test_iou10"]) <= 1
            assert 0 < float(r["macs_removed"]) < 1
        else:  # not reached: every budget tried stayed below it, and the row says so
            assert all(a < float(t) for _, a in tried) and len(tried) == 9 and "best reached" in r["note"]
    # rerun: nothing appended, the tables printed again; --report alone rebuilds them from the CSV
    out = _run(*args).stdout
    with (tmp_path / "explanation_budget.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 2
    assert (
        "| breastmnist | cost | lrp | 0.05 | 1 |" in out
        and (tmp_path / "explanation_budget.png").stat().st_size > 1000
    )
    (tmp_path / "explanation_budget.md").unlink()
    assert bench().main(["--report", "--out", str(tmp_path)]) == 0
    assert "| breastmnist | cost | lrp | 0.99 | 1 |" in (tmp_path / "explanation_budget.md").read_text()
    # the raw ranking (relevance alone fills the MACs budget): its own row beside the cost-aware one
    _run(*args[:-5], "--thresholds", "0.05", "--rankings", "raw", "--out", str(tmp_path))
    rows = bench().read_rows(tmp_path / "explanation_budget.csv")
    assert sorted((r["ranking"], r["min_agreement"]) for r in rows) == [("cost", "0.05"), ("cost", "0.99"),
                                                                        ("raw", "0.05")]  # fmt: skip
    assert "| breastmnist | raw | lrp | 0.05 | 1 |" in (tmp_path / "explanation_budget.md").read_text()


def test_explanation_budget_csv_written_before_the_ranking_column_is_upgraded(tmp_path):
    """An older CSV (no ``ranking``) is rewritten with today's columns before a row is appended: its rows kept,
    read back as the cost-aware ranking (the only one then)."""
    b = bench()
    path = tmp_path / "explanation_budget.csv"
    old_cols = [c for c in b.COLUMNS if c != "ranking"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, old_cols)
        w.writeheader()
        w.writerow({c: "" for c in old_cols} | {"dataset": "breastmnist", "seed": "0", "explainer": "lrp",
                                                 "min_agreement": "0.9", "ratio": "0.3"})  # fmt: skip
    b.append_row(path, {"dataset": "breastmnist", "seed": "0", "ranking": "raw", "explainer": "lrp",
                        "min_agreement": "0.9", "ratio": "0.4"})  # fmt: skip
    with path.open(newline="") as f:
        assert next(csv.reader(f)) == b.COLUMNS
    rows = b.read_rows(path)
    assert [(r["ranking"], r["ratio"]) for r in rows] == [("cost", "0.3"), ("raw", "0.4")]


def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import explanation_budget

    return explanation_budget


def test_explanation_budget_benchmark_refuses_bad_thresholds(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        bench().parse_args(["--thresholds", "1.5", "--out", str(tmp_path)])
    assert err.value.code == 2 and "min_agreement must lie in (0, 1]" in capsys.readouterr().err


def test_either_rows_take_the_larger_validation_budget_of_the_two_rankings():
    b = bench()

    def row(seed, ranking, ratio, val):
        return {"dataset": "d", "seed": seed, "method": "lrp", "explainer": "lrp", "min_agreement": "0.9",
                "ranking": ranking, "ratio": ratio, "val_spearman": val, "test_spearman": f"t{seed}{ranking}"}  # fmt: skip

    rows = [row("0", "cost", "0.3", "0.95"), row("0", "raw", "0.4", "0.91"),  # raw: the larger budget
            row("1", "cost", "0.3", "0.93"), row("1", "raw", "0.3", "0.92"),  # tie: the higher agreement
            row("2", "cost", "0.0", ""), row("2", "raw", "0.0", ""),  # neither reached: not reached
            row("3", "cost", "0.2", "0.91")]  # fmt: skip
    got = {r["seed"]: r for r in b.either_rows(rows)}
    assert sorted(got) == ["0", "1", "2"]  # seed 3 has no raw row: no either row
    assert got["0"]["test_spearman"] == "t0raw" and got["1"]["test_spearman"] == "t1cost"
    assert got["2"]["ratio"] == "0.0" and all(r["ranking"] == "either" for r in got.values())
