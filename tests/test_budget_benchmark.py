"""benchmarks/budget.py end to end on a tiny subset: rows with the issue's columns, MACs budgets reached, report."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

from conftest import MEDMNIST, ROOT, require_file

REQUIRED = (
    "dataset,model,method,schedule,budget_kind,budget,seed,acc_base,acc_pruned,acc_finetuned,macs_ratio,"
    "speedup_measured,val_acc_pruned,auc_base,auc_pruned,auc_finetuned,params_ratio,cost_aware,steps,"
    "prune_time_s,finetune_time_s"
).split(",")


def _run(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "budget.py"), "--out", str(tmp_path), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def test_budget_benchmark_smoke(tmp_path):
    require_file(MEDMNIST / "breastmnist.npz")
    out = _run(
        tmp_path, "--phase", "accuracy", "--datasets", "breastmnist", "--methods", "taylor", "random",
        "--schedules", "oneshot", "iterative", "--macs-budgets", "0.7", "--seeds", "0", "--limit", "64",
        "--epochs", "1", "--ft-epochs", "1", "--calib", "32",
    )  # fmt: skip
    assert "need the latency table" in out  # no table cached: latency rows skipped with a message
    with (tmp_path / "budget.csv").open() as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    assert set(REQUIRED) <= set(header)
    assert sorted((r["method"], r["schedule"]) for r in rows) == [
        ("random", "iterative"), ("random", "oneshot"), ("taylor", "iterative"), ("taylor", "oneshot")
    ]  # fmt: skip
    for r in rows:
        assert r["budget_kind"] == "macs" and r["cost_aware"] == "True"
        # the requested fraction of MACs is what the pruned network lost (cost-aware: never short of it)
        assert 0.7 - 1e-3 <= 1 - float(r["macs_ratio"]) <= 0.7 + 0.02, r["macs_ratio"]
        assert abs(float(r["macs_removed"]) - (1 - float(r["macs_ratio"]))) < 1e-4
        assert int(r["steps"]) == (1 if r["schedule"] == "oneshot" else 3) or r["schedule"] == "iterative"
        for k in ("acc_base", "acc_pruned", "acc_finetuned", "val_acc_pruned"):
            assert 0.0 <= float(r[k]) <= 1.0
        assert r["speedup_measured"] == ""  # the accuracy phase never times
        assert (tmp_path / "cache" / r["model_file"]).is_file()
    # rerun: every row is there already, nothing appended
    _run(tmp_path, "--phase", "accuracy", "--datasets", "breastmnist", "--methods", "taylor", "random",
         "--macs-budgets", "0.7", "--speedups", "--seeds", "0", "--limit", "64", "--epochs", "1", "--calib", "32")  # fmt: skip
    with (tmp_path / "budget.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    report = _run(tmp_path, "--phase", "report", "--n-boot", "50")
    assert "Equal MACs" in report and "One-shot vs iterative" in report and "(b) Equal MACs" in report
    assert (tmp_path / "budget.md").exists() and (tmp_path / "budget_breastmnist.png").stat().st_size > 1000
