"""benchmarks/budget.py end to end on a tiny subset: rows with the issue's columns, MACs budgets reached, report."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import DATA_DIR, MEDMNIST, ROOT, require_file
from PIL import Image

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


def test_budget_benchmark_distillation_finetune(tmp_path, capsys):
    """--ft-kd: one row per setting, the alpha chosen on validation among those given, the models kept apart from
    the plain fine-tune's; a bad alpha and the segmentation dataset are refused before any work."""
    require_file(MEDMNIST / "breastmnist.npz")
    _run(
        tmp_path, "--phase", "accuracy", "--datasets", "breastmnist", "--methods", "lrp", "--schedules", "oneshot",
        "--macs-budgets", "0.85", "--speedups", "--seeds", "0", "--limit", "64", "--epochs", "1", "--ft-epochs", "1",
        "--calib", "32", "--ft-kd", "0.5", "0.9",
    )  # fmt: skip
    with (tmp_path / "budget.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["ft_kd_alpha"]) in (0.5, 0.9) and float(row["ft_feature_weight"]) == 0.0
    assert row["model_file"].startswith("budget_models_ft/")
    assert (tmp_path / "cache" / row["model_file"]).is_file() and not (
        tmp_path / "cache" / "budget_models"
    ).exists()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from budget import parse_args

    for bad, message in (
        (["--ft-kd", "0"], "(0, 1]"),
        (["--ft-kd", "0.5", "--datasets", "membrane"], "membrane"),
        (["--recover-between", "--datasets", "membrane"], "membrane"),
        (["--recover-between", "--ft-kd", "0.5"], "one fine-tune variant"),
        (["--ft-lr", "0"], "--ft-lr"),
        (["--ft-lr", "3e-4", "--datasets", "membrane"], "membrane keeps its own"),
    ):
        with pytest.raises(SystemExit) as err:  # argparse's error: exit 2 before any work
            parse_args(["--out", str(tmp_path / "bad"), *bad])
        assert err.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit) as err:  # raw-ranking rows would be skipped as done in budget.csv
        parse_args(["--raw-ranking"])
    assert err.value.code == 2 and "--raw-ranking" in capsys.readouterr().err
    assert parse_args(["--raw-ranking", "--out", str(tmp_path / "raw")]).raw_ranking is True


def test_budget_benchmark_membrane_smoke(tmp_path):
    """The segmentation dataset: a MONAI 2D UNet row with Dice in the ACC columns, its own report section."""
    root = require_file(DATA_DIR / "membrane" / "label" / "29.png").parents[1]
    out = _run(
        tmp_path, "--phase", "accuracy", "--datasets", "membrane", "--methods", "lrp", "--schedules", "oneshot",
        "--macs-budgets", "0.7", "--speedups", "--seeds", "0", "--limit", "2", "--epochs", "1", "--ft-epochs", "1",
        "--calib", "8",
    )  # fmt: skip
    assert "test Dice" in out
    with (tmp_path / "budget.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert row["dataset"] == "membrane" and row["model"].startswith("monai-unet-2d")
    assert 0.7 - 1e-3 <= float(row["macs_removed"]) <= 0.72 and row["calib"] == "8"
    for k in ("acc_base", "acc_pruned", "acc_finetuned", "val_acc_pruned"):
        assert 0.0 <= float(row[k]) <= 1.0
    assert math.isnan(float(row["auc_pruned"]))  # no AUC for segmentation
    base = np.load(tmp_path / "budget_preds" / "membrane_base_s0.npz")
    assert base["score"].shape == (2,) and abs(base["score"].mean() - float(row["acc_base"])) < 1e-5
    # oracle: the Dice of predicting membrane (label pixel 0) everywhere on the first two test images (24, 25)
    g = [np.asarray(Image.open(root / "label" / f"{i}.png")) < 128 for i in (24, 25)]
    assert abs(float(base["trivial"]) - np.mean([2 * m.mean() / (1 + m.mean()) for m in g])) < 1e-6
    report = _run(tmp_path, "--phase", "report", "--n-boot", "50")
    section = report.split("### Segmentation beside them: membrane")[1]
    assert "Dice no ft [95% CI]" in section and "| membrane | 70% MACs | lrp | oneshot | 1 |" in section
    assert "Not evaluable" in report.split("### Equal MACs")[0]  # membrane rows never enter the verdicts
    assert (tmp_path / "budget_membrane.png").stat().st_size > 1000


def test_membrane_dice_per_image():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from membrane import dice_per_image

    y = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[1, 0, 0, 0]]])
    p = np.array([[[0.9, 0.2, 0.7, 0.1]], [[0.1, 0.1, 0.1, 0.1]], [[0.1, 0.1, 0.1, 0.1]]])
    # image 0: 1 overlap, |G| 2, |P| 2 -> 0.5; image 1: both empty -> 1; image 2: nothing found -> 0
    assert np.allclose(dice_per_image(y, p), [0.5, 1.0, 0.0])


def test_gradual_recovery_splits_the_fine_tune_length():
    """--recover-between's pieces: a fraction of an epoch is that fraction of the training batches; the stages'
    pieces and the rest after the last stage add up to the plain fine-tune's length."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from budget import ClassificationTask, Recovery

    task = ClassificationTask("breastmnist")
    size = task.cfg["batch"]
    g = torch.Generator().manual_seed(0)
    data = {
        "train": (
            torch.randn(10 * size, 1, 28, 28, generator=g),
            torch.randint(0, 2, (10 * size,), generator=g),
        ),
        "val": (torch.randn(8, 1, 28, 28, generator=g), torch.tensor([0, 1] * 4)),
    }
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 2))
    seen: list[int] = []
    model.register_forward_hook(lambda m, i, o: seen.append(len(i[0])) if m.training else None)
    for epochs, expected in ((1 / 3, 3), (2 / 3, 7), (8 / 3, 27)):  # 10 batches per epoch
        seen.clear()
        task.finetune_part(model, data, epochs, seed=0)
        assert len(seen) == expected and set(seen) == {size}, (epochs, len(seen))
    recovery = Recovery(task, data, 8 / 3, seed=0)
    recovery(model, 0), recovery(model, 1)
    assert abs(recovery.spent - 16 / 3) < 1e-9  # the final piece gets 8 - 16 / 3 epochs


def test_budget_benchmark_layer_cap(tmp_path, capsys):
    """--max-layer-ratio: prune's per-layer cap reaches the rows (column, own models folder) and no conv of the
    saved network keeps fewer than 1 - R of its channels; a cap outside (0, 1) or rows into budget.csv are refused."""
    require_file(MEDMNIST / "breastmnist.npz")
    _run(
        tmp_path, "--phase", "accuracy", "--datasets", "breastmnist", "--methods", "taylor", "--schedules", "oneshot",
        "--macs-budgets", "0.6", "--speedups", "--seeds", "0", "--limit", "64", "--epochs", "1", "--ft-epochs", "1",
        "--calib", "32", "--max-layer-ratio", "0.6",
    )  # fmt: skip
    with (tmp_path / "budget.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    assert float(row["max_layer_ratio"]) == 0.6 and row["model_file"].startswith("budget_models_cap0.6/")
    assert float(row["macs_removed"]) >= 0.6 - 1e-3
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from budget import TASKS, parse_args

    from monai_iaprune.pruning import load_pruned

    task = TASKS["breastmnist"]
    full = {n: m.out_channels for n, m in task.fresh_model().named_modules() if hasattr(m, "out_channels")}
    pruned = load_pruned(tmp_path / "cache" / row["model_file"], task.fresh_model())
    kept = {n: m.out_channels for n, m in pruned.named_modules() if n in full}
    assert min(kept[n] / full[n] for n in full) >= 0.4 - 1e-6
    assert any(kept[n] < full[n] for n in full)  # it did prune
    for bad in (["--max-layer-ratio", "1.0", "--out", str(tmp_path / "x")], ["--max-layer-ratio", "0.8"]):
        with pytest.raises(SystemExit) as err:
            parse_args(bad)
        assert err.value.code == 2 and "--max-layer-ratio" in capsys.readouterr().err
