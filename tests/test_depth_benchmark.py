"""benchmarks/depth.py end to end on a tiny subset: width / depth / both rows at equal MACs and latency, report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import MEDMNIST, ROOT, require_file

REQUIRED = (
    "dataset,model,method,mode,budget_kind,budget,seed,acc_pruned,acc_finetuned,macs_ratio,speedup_measured"
).split(",")


def _run(tmp_path, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "depth.py"), "--out", str(tmp_path), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def _table(tmp_path):
    """A synthetic latency table of the benchmark's breastmnist net (not timed): 0.1 ms per layer at full width,
    scaling with in x out channels, 0.5 ms overhead."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from budget import TASKS, table_path
    from torch import nn

    net = TASKS["breastmnist"].fresh_model()
    layers = {}
    for n, m in net.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            cin, cout = (
                (m.in_features, m.out_features)
                if isinstance(m, nn.Linear)
                else (m.in_channels, m.out_channels)
            )
            gi, go = sorted({1, cin}), sorted({1, cout})
            layers[n] = {"in_channels": gi, "out_channels": go,
                         "seconds": [[1e-4 * a * b / (cin * cout) for b in go] for a in gi]}  # fmt: skip
    dest = table_path(tmp_path / "cache", "breastmnist", 1)
    dest.parent.mkdir(parents=True)
    dest.write_text(json.dumps({"device": "test", "overhead": 5e-4, "layers": layers}))


def test_depth_benchmark_smoke(tmp_path):
    require_file(MEDMNIST / "breastmnist.npz")
    _table(tmp_path)
    _run(
        tmp_path, "--phase", "accuracy", "--datasets", "breastmnist", "--methods", "random", "--seeds", "0",
        "--speedups", "1.3", "--macs-budgets", "0.4", "--limit", "64", "--epochs", "1", "--ft-epochs", "1",
        "--calib", "32", "--no-reuse-budget",
    )  # fmt: skip
    with (tmp_path / "depth.csv").open() as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames, list(reader)
    assert set(REQUIRED) <= set(header)
    got = {(r["mode"], r["budget_kind"]): r for r in rows}
    assert sorted(got) == [(m, k) for m in ("both", "depth", "width") for k in ("latency", "macs")]
    for (mode, kind), r in got.items():
        assert not r["note"], r["note"]
        assert (int(r["blocks_removed"]) > 0) == (mode != "width"), (mode, r["blocks_removed"])
        for k in ("acc_pruned", "acc_finetuned", "val_acc_pruned"):
            assert 0.0 <= float(r[k]) <= 1.0
        if kind == "latency":  # the table estimate reaches the request (depth may overshoot by one block)
            assert float(r["speedup_estimated"]) >= 1.3 - 1e-3, (mode, r["speedup_estimated"])
        elif (
            mode != "depth"
        ):  # width (and depth then width) reach the MACs budget; depth overshoots by blocks
            assert 0.4 - 1e-3 <= float(r["macs_removed"]) <= 0.4 + 0.03, (mode, r["macs_removed"])
        else:
            assert float(r["macs_removed"]) >= 0.4 - 1e-3
    # both = depth to half the budget in log space first: it removed fewer blocks than depth-only or as many
    assert int(got[("both", "macs")]["blocks_removed"]) <= int(got[("depth", "macs")]["blocks_removed"])
    out = _run(tmp_path, "--phase", "latency", "--quick", "2", "--repeats", "3")
    assert out.count("[latency] breastmnist") == 2 and "nothing written" in out
    md = _run(tmp_path, "--phase", "report", "--speed", "1.3")
    assert "Equal CPU latency (1.3x)" in md and (tmp_path / "depth_breastmnist.png").exists()


def _macs_row(d, method, mode, b, seed, base, ft, val):
    return {"dataset": d, "method": method, "mode": mode, "budget_kind": "macs", "budget": str(b),
            "seed": str(seed), "acc_base": str(base), "acc_pruned": "0.7", "acc_finetuned": str(ft),
            "val_acc_finetuned": str(val), "macs_removed": str(b), "speedup_measured": "2.0"}  # fmt: skip


def test_equal_macs_chooses_on_validation_and_judges_on_test():
    """The (b) table: the configuration with the best VALIDATION ACC is judged, even when another has better test
    ACC; the goal is met only when every dataset x budget drops <= 0.5 pt."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import depth

    datasets = ["breastmnist", "pneumoniamnist"]
    rows = []
    for d in datasets:
        for b in depth.MACS_GOAL:
            for s in range(3):
                # lrp width: best validation, test drop 0.4 pt; ig both: better test, worse validation
                rows.append(_macs_row(d, "lrp", "width", b, s, 0.85, 0.846, 0.9))
                rows.append(_macs_row(d, "ig", "both", b, s, 0.85, 0.86, 0.8))
                rows.append(
                    _macs_row(d, "taylor", "width", b, s, 0.85, 0.99, 0.99)
                )  # a reference: never chosen
    md, data = depth.equal_macs(rows, datasets, ["lrp", "ig", "taylor"])
    assert data["chosen"] == ["lrp", "width"] and data["met"] is True
    assert data["drops"]["breastmnist 85%"] == pytest.approx(0.4)
    rows[0]["acc_finetuned"] = "0.80"  # one seed of breastmnist 85 %: the seed mean drops 1.9 pt
    md, data = depth.equal_macs(rows, datasets, ["lrp", "ig", "taylor"])
    assert data["met"] is False and data["drops"]["breastmnist 85%"] == pytest.approx(1.93, abs=0.01)
    assert "**Goal (b) not met**" in md
    _, data = depth.equal_macs(rows[1:], datasets, ["lrp", "ig", "taylor"])  # lrp width misses a seed
    assert data["chosen"] == ["ig", "both"]
