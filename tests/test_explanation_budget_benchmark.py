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
        "| breastmnist | lrp | 0.05 | 1 |" in out
        and (tmp_path / "explanation_budget.png").stat().st_size > 1000
    )
    (tmp_path / "explanation_budget.md").unlink()
    assert bench().main(["--report", "--out", str(tmp_path)]) == 0
    assert "| breastmnist | lrp | 0.99 | 1 |" in (tmp_path / "explanation_budget.md").read_text()


def bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import explanation_budget

    return explanation_budget


def test_explanation_budget_benchmark_refuses_bad_thresholds(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        bench().parse_args(["--thresholds", "1.5", "--out", str(tmp_path)])
    assert err.value.code == 2 and "min_agreement must lie in (0, 1]" in capsys.readouterr().err
