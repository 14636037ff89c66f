"""Budgeted pruning benchmark on MedMNIST (issue #17): equal MACs and equal CPU latency, one-shot vs iterative.

Every row prunes a copy of one seed's own base model (``run.py``'s MONAI ResNet-18 narrow, trained with that seed)
to a budget, re-estimates BatchNorm on the calibration subset (chosen by the seed), and records validation / test
ACC and AUC with no fine-tune, then after the same short fine-tune for every row (``run.train(include_start=True)``).

Segmentation beside them (no goal): ``--datasets membrane`` (``membrane.py``: ISBI 2012 EM membranes, images 0-19
train / 20-23 val / 24-29 test, MONAI 2D UNet trained on random crops); its Dice of the membrane class fills the
``acc_*`` columns (AUC NaN), relevance explains the membrane logit over the labelled membrane pixels of random
training crops, and the report gives it its own tables. A dataset is a *task* (``ClassificationTask`` here,
``membrane.SegmentationTask``): data, model, predictions, metric, calibration batches, fine-tune.

Budgets: ``macs`` = fraction of MACs removed (``prune(target="macs")``, cost-aware); ``latency`` = requested CPU
speed-up at batch 1 (``prune(target="latency")`` with the per-layer latency table of the base model, measured by
the ``tables`` phase). Schedules: ``oneshot`` (``prune_step``) and ``iterative`` (``prune_iteratively``, K steps,
relevance re-scored and BatchNorm re-estimated after each).

Phases (``--phase``):

* ``tables``   (quiet machine) measure and cache each base model's per-layer latency table (batch 1, ``--threads``)
                 under ``CACHE/budget_tables/``.
* ``accuracy`` (no timing; safe beside other jobs) all rows; latency rows are skipped with a message while no table
                 is cached. Saves each pruned model (``save_pruned``) under ``CACHE/budget_models/`` and the test
                 predictions under ``OUT/budget_preds/`` (for the bootstrap intervals).
* ``latency``  (quiet machine) times every saved pruned model against its base, batch 1, ``--threads``, median of
                 ``--repeats`` interleaved calls, eager and after ``optimize_for_inference``; fills
                 ``speedup_measured`` / ``speedup_optimized``.
* ``report``   tables, one-shot vs iterative, accuracy-vs-measured-speed-up plot per dataset and the issue's two
                 verdicts into ``OUT/budget.md`` (and ``OUT/budget_verdicts.json``).

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/budget.py --phase accuracy --seeds 0
    OMP_NUM_THREADS=1 python benchmarks/budget.py --phase tables --threads 1        # quiet machine
    OMP_NUM_THREADS=1 python benchmarks/budget.py --phase accuracy --seeds 0 --schedules oneshot iterative
    OMP_NUM_THREADS=1 python benchmarks/budget.py --phase latency --threads 1       # quiet machine
    python benchmarks/budget.py --phase report
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/budget.py --phase accuracy --datasets membrane --seeds 0 --speedups
    OMP_NUM_THREADS=1 python benchmarks/budget.py --phase tables --datasets membrane --threads 1  # quiet machine

Rows already in budget.csv are skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import membrane  # noqa: E402
import run  # noqa: E402
from run import (  # noqa: E402
    ALL_METHODS,
    ATTRIBUTION,
    CACHE,
    DATASETS,
    DEFAULT_DATASETS,
    RESULTS,
    base_model,
    batches,
    latency_pair,
    load_split,
    make_model,
    metrics,
    model_name,
    predict,
    train,
)

from monai_iaprune.pruning import (  # noqa: E402
    LatencyTable,
    count_macs,
    count_params,
    load_pruned,
    measure_latency_table,
    optimize_for_inference,
    prune_iteratively,
    prune_step,
    save_pruned,
)
from monai_iaprune.pruning.feature_distillation import FeatureDistillationLoss, kept_channels  # noqa: E402
from monai_iaprune.pruning.latency_table import LayerLatency  # noqa: E402
from monai_iaprune.relevance import METHODS  # noqa: E402

MACS_BUDGETS = (0.5, 0.7, 0.85, 0.9)
SPEEDUPS = (2.0, 3.0)
SCHEDULES = ("oneshot", "iterative")
REFERENCE = ("taylor", "magnitude", "random")
STEPS = 3

COLUMNS = [
    "dataset", "model", "method", "schedule", "budget_kind", "budget", "seed",
    "acc_base", "acc_pruned", "acc_finetuned", "macs_ratio", "speedup_measured",
    "val_acc_pruned", "val_acc_finetuned", "val_acc_base",
    "auc_base", "auc_pruned", "auc_finetuned", "val_auc_pruned",
    "params_ratio", "macs_removed", "cost_aware", "steps", "speedup_estimated", "speedup_optimized",
    "latency_base_ms", "latency_pruned_ms", "latency_base_opt_ms", "latency_pruned_opt_ms", "latency_threads",
    "prune_time_s", "finetune_time_s", "calib", "ft_epochs", "base_epochs", "normalizer", "model_file",
]  # fmt: skip
LATENCY_COLUMNS = [
    "speedup_measured", "speedup_optimized", "latency_base_ms", "latency_pruned_ms",
    "latency_base_opt_ms", "latency_pruned_opt_ms", "latency_threads",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------- CSV


def read_rows(path: Path, columns: Sequence[str] = COLUMNS) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, restval=""))
    for r in rows:
        r.pop(None, None)
        for k in columns:
            r.setdefault(k, "")
    return rows


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def write_rows(path: Path, rows: list[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> None:
    """Rewrite the whole CSV atomically (the latency phase fills columns in place)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
            w.writeheader()
            w.writerows({k: _fmt(v) for k, v in r.items()} for r in rows)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def append_row(path: Path, row: dict[str, Any], columns: Sequence[str] = COLUMNS) -> None:
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        if new:
            w.writeheader()
        w.writerow({k: _fmt(v) for k, v in row.items()})


def row_key(r: dict[str, Any]) -> tuple[str, ...]:
    return (
        r["dataset"], r["method"], r["schedule"], r["budget_kind"], f"{float(r['budget']):.2f}", str(r["seed"])
    )  # fmt: skip


def tag(d: str, method: str, schedule: str, kind: str, budget: float, seed: int | str) -> str:
    return f"{d}_{method}_{schedule}_{kind}{float(budget):.2f}_s{seed}"


def _float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


# ----------------------------------------------------------------------------------------- shared


class ClassificationTask:
    """A MedMNIST dataset of ``run.py``: its ResNet-18, probability of class 1 per image, test ACC / AUC.

    A task is what the phases need of a dataset (``membrane.SegmentationTask`` is the other one): data, model, base
    model, predictions, the metric in the ``acc_*`` / ``auc_*`` columns, calibration batches and the fine-tune.
    """

    metric = "ACC"
    goal = True  # the issue's verdicts are evaluated on these datasets
    default_calib = 256

    def __init__(self, name: str):
        self.name, self.cfg = name, DATASETS[name]
        self.model_name, self.ft_epochs = model_name(self.cfg), self.cfg["ft_epochs"]

    def data_path(self) -> Path:
        return run.DATA_DIR / self.cfg["file"]

    def load(self, limit: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {s: load_split(self.data_path(), s, limit) for s in ("train", "val", "test")}

    def example_input(self) -> torch.Tensor:
        return torch.zeros(1, 1, *([28] * self.cfg["dims"]))

    def fresh_model(self) -> nn.Module:
        return make_model(self.cfg["dims"], self.cfg["widths"], self.cfg.get("stem_stride", 2))

    def base_model(self, data: dict, cache: Path, epochs: int | None, seed: int) -> tuple[nn.Module, dict]:
        return base_model(self.name, self.cfg, data, cache, epochs=epochs, seed=seed)

    def predict(self, model: nn.Module, x: torch.Tensor) -> np.ndarray:
        return predict(model, x)

    def metrics(self, y: torch.Tensor, p: np.ndarray) -> tuple[float, float]:
        return metrics(y, p)

    def saved(self, y: torch.Tensor, p: np.ndarray, stage: str | None = None) -> dict[str, np.ndarray]:
        """Test predictions kept per row (``stage``) or for the base (None, with the labels): the bootstrap's input."""
        return {"p": p.astype(np.float32), "y": y.numpy()} if stage is None else {stage: p.astype(np.float32)}

    def calibration(self, data: dict, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        xtr, ytr = data["train"]
        g = torch.Generator().manual_seed(1000 + seed)  # as run.py: the calibration subset is the seed's
        calib = torch.randperm(len(xtr), generator=g)[:n]
        return list(batches(xtr[calib], ytr[calib], 32))

    def finetune(
        self,
        model: nn.Module,
        data: dict,
        epochs: int,
        seed: int,
        extra_loss=None,
        teacher=None,
        kd_alpha: float = 0.0,
        lr: float = 1e-3,
    ) -> dict:
        return train(
            model, data["train"], data["val"], epochs, self.cfg["batch"], seed=seed, include_start=True,
            extra_loss=extra_loss, teacher=teacher, kd_alpha=kd_alpha, lr=lr,
        )  # fmt: skip

    def finetune_part(self, model: nn.Module, data: dict, epochs: float, seed: int) -> dict:
        """``epochs`` (a fraction allowed) of the fine-tune: the recovery between gradual pruning stages. Whole
        epochs where ``epochs`` >= 1 (the best on validation kept, as ``finetune``), each of ``epochs /
        round(epochs)`` of the training set's batches, shuffled and augmented as ``train``'s."""
        xy, size = data["train"], self.cfg["batch"]
        n_ep = max(1, round(epochs))
        per_epoch = max(1, round(epochs / n_ep * math.ceil(len(xy[0]) / size)))

        def batch_fn(g: torch.Generator):
            n = 0
            while True:
                for xb, yb in batches(*xy, size, shuffle=True, gen=g, augment=True):
                    yield xb, yb
                    n += 1
                    if n >= per_epoch:
                        return

        return train(
            model, xy, data["val"], n_ep, size, seed=seed, include_start=True, batch_fn=batch_fn,
            steps_per_epoch=per_epoch,
        )  # fmt: skip


def finetune_variants(
    task: Any,
    pruned: nn.Module,
    unpruned: nn.Module,
    histories: list,
    data: dict,
    epochs: int,
    seed: int,
    feature_weights: Sequence[float] | None,
    kd_alphas: Sequence[float] | None,
    lrs: Sequence[float] | None = None,
) -> tuple[nn.Module, float, float, float]:
    """The recovery fine-tune at every combination of a kept-channel feature-distillation weight
    (``pruning.feature_distillation``; 0 = off), a logit-distillation alpha (``run.train``'s ``kd_alpha``, the
    unpruned network as teacher; 0 = off) and a peak learning rate (default the plain fine-tune's 1e-3), each from
    the same pruned weights and seed; returns the model whose best epoch scores highest on VALIDATION (the task's
    score: ACC then AUC, or Dice), its feature weight, alpha and learning rate. The test split is not looked at."""
    kept = kept_channels(unpruned, *histories) if feature_weights else None
    best: tuple[tuple, nn.Module, float, float, float] | None = None
    grid = [(w, a, lr) for w in feature_weights or [0.0] for a in kd_alphas or [0.0] for lr in lrs or [1e-3]]
    for w, alpha, lr in grid:
        m = copy.deepcopy(pruned)
        teacher = copy.deepcopy(unpruned).eval()
        loss = None
        if w > 0:
            loss = FeatureDistillationLoss(teacher, kept)
            loss.attach(m)

        def term(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, logits: torch.Tensor, w=w, loss=loss):
            return w * loss(xb) if model.training and loss is not None else logits.new_zeros(())

        try:
            info = task.finetune(
                m, data, epochs, seed, extra_loss=term, teacher=teacher, kd_alpha=alpha, lr=lr
            )
        finally:
            if loss is not None:
                loss.detach()
        score = (info["val_acc"], info.get("val_auc", float("nan")))
        score = tuple(-1.0 if math.isnan(v) else v for v in score)
        if best is None or score > best[0]:
            best = (score, m, w, alpha, lr)
    assert best is not None
    return best[1], best[2], best[3], best[4]


class Recovery:
    """``prune_iteratively``'s ``recover``: ``epochs`` of the fine-tune (``task.finetune_part``) after a stage, a
    seed per stage; ``spent`` counts the epochs used, the final fine-tune gets the rest."""

    def __init__(self, task: Any, data: dict, epochs: float, seed: int):
        self.task, self.data, self.epochs, self.seed, self.spent = task, data, epochs, seed, 0.0

    def __call__(self, model: nn.Module, stage: int) -> None:
        self.task.finetune_part(model, self.data, self.epochs, 1000 * (stage + 1) + self.seed)
        self.spent += self.epochs


TASKS: dict[str, Any] = {
    **{n: ClassificationTask(n) for n in DATASETS},
    "membrane": membrane.SegmentationTask(),
}


def table_path(cache: Path, name: str, threads: int) -> Path:
    return cache / "budget_tables" / f"{name}_{TASKS[name].model_name}_threads{threads}.json"


def save_table(table: LatencyTable, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "device": table.device,
        "overhead": table.overhead,
        "activation_seconds": table.activation_seconds,
        "layers": {n: asdict(t) for n, t in table.layers.items()},
    }
    path.write_text(json.dumps(blob))


def load_table(path: Path) -> LatencyTable | None:
    if not path.exists():
        return None
    blob = json.loads(path.read_text())
    return LatencyTable(
        {n: LayerLatency(**t) for n, t in blob["layers"].items()},
        blob["overhead"],
        blob["device"],
        blob.get("activation_seconds", 0.0),
    )


# --------------------------------------------------------------------------------------------- tables


def phase_tables(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    for name in args.datasets:
        task = TASKS[name]
        path = table_path(args.cache, name, args.threads)
        if path.exists() and not args.force:
            print(f"[table] {name}: cached {path}")
            continue
        # the table depends on the architecture and input size only (layers are rebuilt with random weights)
        model = task.fresh_model().eval()
        t = time.perf_counter()
        table = measure_latency_table(
            model, task.example_input(), device="cpu", threads=args.threads, repeats=args.repeats,
            cache_dir=args.cache / "latency_table_raw", progress=False,
        )  # fmt: skip
        save_table(table, path)
        est = table.estimate_model(model)
        print(
            f"[table] {name}: {len(table.layers)} layers, estimated {1000 * est:.2f} ms at batch 1, "
            f"{args.threads} thread(s), load {os.getloadavg()[0]:.1f}, {time.perf_counter() - t:.0f}s -> {path}",
            flush=True,
        )


# ------------------------------------------------------------------------------------------- accuracy


def phase_accuracy(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    csv_path = args.out / "budget.csv"
    n_before = len(read_rows(csv_path))
    entry = {"command": args.command, "threads": args.threads, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        _accuracy_rows(args, csv_path)
    finally:  # an interrupted run is recorded too: its rows are in the CSV
        entry.update(ended=time.strftime("%Y-%m-%dT%H:%M:%S"), rows_added=len(read_rows(csv_path)) - n_before)
        info = args.out / "budget_run_info.json"
        runs = json.loads(info.read_text()) if info.exists() else []
        info.write_text(json.dumps(runs + [entry], indent=1))


def _accuracy_rows(args: argparse.Namespace, csv_path: Path) -> None:
    done = {row_key(r) for r in read_rows(csv_path)}
    preds = args.out / "budget_preds"
    # another fine-tune: its models must not replace the plain ones
    variant = bool(args.ft_feature or args.ft_kd or args.ft_lr or args.recover_between)
    models = args.cache / (
        ("budget_models_raw" if args.raw_ranking else "budget_models")
        + ("_ft" if variant else "")
        + ("" if args.max_layer_ratio is None else f"_cap{args.max_layer_ratio:g}")
    )
    preds.mkdir(parents=True, exist_ok=True)
    models.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        task = TASKS[name]
        path = task.data_path()
        if not path.exists():
            print(f"[skip] {name}: {path} not present")
            continue
        data = task.load(args.limit)
        x1 = task.example_input()
        n_calib = args.calib if args.calib is not None else task.default_calib
        table = load_table(table_path(args.cache, name, args.threads))
        budgets = [("macs", b) for b in args.macs_budgets]
        if args.speedups:
            if table is None:
                print(
                    f"[skip] {name}: latency rows (speed-ups {args.speedups}) need the latency table "
                    f"{table_path(args.cache, name, args.threads)}; run --phase tables --threads {args.threads} "
                    "on a quiet machine first"
                )
            else:
                budgets += [("latency", s) for s in args.speedups]
        ft_epochs = args.ft_epochs if args.ft_epochs is not None else task.ft_epochs
        columns = (
            COLUMNS
            + (["ft_feature_weight", "ft_kd_alpha", "ft_lr", "recover_between"] if variant else [])
            + ([] if args.max_layer_ratio is None else ["max_layer_ratio"])
        )
        for seed in args.seeds:
            todo = [
                (meth, sch, kind, b)
                for meth in args.methods
                for sch in args.schedules
                for kind, b in budgets
                if (name, meth, sch, kind, f"{b:.2f}", str(seed)) not in done
            ]
            if not todo:
                continue
            model, info = task.base_model(data, args.cache, args.epochs, seed)
            model.eval()
            p_base, pv_base = task.predict(model, data["test"][0]), task.predict(model, data["val"][0])
            acc_base, auc_base = task.metrics(data["test"][1], p_base)
            val_acc_base = task.metrics(data["val"][1], pv_base)[0]
            np.savez(preds / f"{name}_base_s{seed}.npz", **task.saved(data["test"][1], p_base))
            print(
                f"[base] {name} s{seed}: test {task.metric} {acc_base:.4f} AUC {auc_base:.4f} val {task.metric} "
                f"{val_acc_base:.4f} ({info})",
                flush=True,
            )
            macs_base, params_base = count_macs(model, x1), count_params(model)
            cal = task.calibration(data, n_calib, seed)
            for meth, sch, kind, b in todo:
                if meth not in METHODS:
                    print(f"[skip] method {meth!r} not available (have {sorted(METHODS)})")
                    continue
                m = copy.deepcopy(model)
                rel_kw = {"seed": seed} if meth == "random" else {}
                target_kw: dict[str, Any] = (
                    {"target": "macs"} if kind == "macs"
                    else {"target": "latency", "latency_table": table, "threads": args.threads}
                )  # fmt: skip
                if args.raw_ranking:
                    target_kw["cost_aware"] = False
                if args.max_layer_ratio is not None:
                    target_kw["max_layer_ratio"] = args.max_layer_ratio
                t = time.perf_counter()
                try:
                    if sch == "oneshot":
                        if kind == "macs":
                            res = [
                                prune_step(
                                    m, cal, meth, b, relevance_kwargs=rel_kw, example_inputs=x1, **target_kw
                                )
                            ]
                        else:
                            res = [
                                prune_step(
                                    m,
                                    cal,
                                    meth,
                                    0.5,
                                    speedup=b,
                                    relevance_kwargs=rel_kw,
                                    example_inputs=x1,
                                    **target_kw,
                                )
                            ]
                    else:
                        recover = (  # gradual: the fine-tune's length split over the stages
                            Recovery(task, data, ft_epochs / args.steps, seed)
                            if args.recover_between
                            else None
                        )
                        res = prune_iteratively(
                            m, cal, meth, b if kind == "macs" else 0.5, steps=args.steps,
                            speedup=b if kind == "latency" else None, relevance_kwargs=rel_kw,
                            example_inputs=x1, progress=False, recover=recover, **target_kw,
                        )  # fmt: skip
                except (ValueError, FloatingPointError) as e:
                    print(f"[fail] {name} {meth} {sch} {kind} {b}: {type(e).__name__}: {e}", flush=True)
                    continue
                t_prune = time.perf_counter() - t
                macs = count_macs(m, x1)
                est = None
                if table is not None:
                    est = table.estimate_model(model) / table.estimate_model(m)
                p_pr, pv_pr = task.predict(m, data["test"][0]), task.predict(m, data["val"][0])
                acc_pr, auc_pr = task.metrics(data["test"][1], p_pr)
                vacc_pr, vauc_pr = task.metrics(data["val"][1], pv_pr)
                t = time.perf_counter()
                feature_weight = kd_alpha = ft_lr = ""
                if args.ft_feature or args.ft_kd or args.ft_lr:
                    m, feature_weight, kd_alpha, ft_lr = finetune_variants(
                        task, m, model, [r.history for r in res], data, ft_epochs, seed, args.ft_feature,
                        args.ft_kd, args.ft_lr,
                    )  # fmt: skip
                elif args.recover_between and sch == "iterative":  # what the recoveries left of the fine-tune
                    task.finetune_part(m, data, ft_epochs - recover.spent, seed)
                else:
                    task.finetune(m, data, ft_epochs, seed)
                t_ft = time.perf_counter() - t
                p_ft, pv_ft = task.predict(m, data["test"][0]), task.predict(m, data["val"][0])
                acc_ft, auc_ft = task.metrics(data["test"][1], p_ft)
                vacc_ft = task.metrics(data["val"][1], pv_ft)[0]
                key = tag(name, meth, sch, kind, b, seed)
                yt = data["test"][1]
                np.savez(
                    preds / f"{key}.npz",
                    **task.saved(yt, p_pr, "pruned"),
                    **task.saved(yt, p_ft, "finetuned"),
                )
                mfile = models / f"{key}.pt"
                save_pruned(m, mfile, {"dataset": name, "method": meth, "schedule": sch, "budget_kind": kind,
                                       "budget": float(b), "seed": seed}, overwrite=True)  # fmt: skip
                row = {
                    "dataset": name, "model": task.model_name, "method": meth, "schedule": sch,
                    "budget_kind": kind, "budget": float(b), "seed": seed,
                    "acc_base": acc_base, "acc_pruned": acc_pr, "acc_finetuned": acc_ft,
                    "macs_ratio": macs / macs_base, "speedup_measured": "",
                    "val_acc_pruned": vacc_pr, "val_acc_finetuned": vacc_ft, "val_acc_base": val_acc_base,
                    "auc_base": auc_base, "auc_pruned": auc_pr, "auc_finetuned": auc_ft, "val_auc_pruned": vauc_pr,
                    "params_ratio": count_params(m) / params_base, "macs_removed": 1 - macs / macs_base,
                    "cost_aware": all(r.cost_aware for r in res), "steps": len(res),
                    "speedup_estimated": "" if est is None else est,
                    "prune_time_s": t_prune, "finetune_time_s": t_ft, "calib": n_calib, "ft_epochs": ft_epochs,
                    "base_epochs": info.get("epochs", ""), "normalizer": "auto",
                    "model_file": str(mfile.relative_to(args.cache)),
                }  # fmt: skip
                if variant:
                    row["ft_feature_weight"], row["ft_kd_alpha"], row["ft_lr"] = (
                        feature_weight,
                        kd_alpha,
                        ft_lr,
                    )
                    row["recover_between"] = bool(args.recover_between and sch == "iterative")
                if args.max_layer_ratio is not None:
                    row["max_layer_ratio"] = args.max_layer_ratio
                append_row(csv_path, row, columns)
                done.add(row_key(row))
                print(
                    f"[row] {name} {meth:9s} {sch:9s} {kind} {b:.2f} s{seed}: MACs removed {row['macs_removed']:.3f} "
                    f"params x{row['params_ratio']:.3f} steps {len(res)} | ACC {acc_base:.3f} -> {acc_pr:.3f} (val {vacc_pr:.3f}) "
                    f"-> ft {acc_ft:.3f} | prune {t_prune:.0f}s ft {t_ft:.0f}s",
                    flush=True,
                )


# -------------------------------------------------------------------------------------------- latency


def phase_latency(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    csv_path = args.out / "budget.csv"
    rows = read_rows(csv_path)
    print(f"[latency] {len(rows)} rows, {args.threads} thread(s), load {os.getloadavg()}", flush=True)
    for r in rows:
        if r["dataset"] not in args.datasets or (r["speedup_measured"] and not args.force):
            continue
        task = TASKS[r["dataset"]]
        mfile = args.cache / r["model_file"]
        if not r["model_file"] or not mfile.exists():
            print(f"[skip] {row_key(r)}: no saved model {mfile}")
            continue
        x1 = task.example_input()
        # the base's weights do not change its latency; the same architecture with fresh weights is timed
        base = task.fresh_model().eval()
        pruned = load_pruned(mfile, task.fresh_model()).eval()
        tb, tp = latency_pair(base, pruned, x1, repeats=args.repeats)
        r.update(
            latency_base_ms=tb, latency_pruned_ms=tp, speedup_measured=tb / tp, latency_threads=args.threads
        )
        if args.optimized:
            with torch.no_grad():
                ob = optimize_for_inference(
                    copy.deepcopy(base), example_inputs=x1, kernels="auto", backend="jit"
                )
                op = optimize_for_inference(
                    copy.deepcopy(pruned), example_inputs=x1, kernels="auto", backend="jit"
                )
            tob, top = latency_pair(ob, op, x1, repeats=args.repeats)
            r.update(latency_base_opt_ms=tob, latency_pruned_opt_ms=top, speedup_optimized=tob / top)
        print(
            f"[latency] {' '.join(row_key(r))}: {tb:.2f} -> {tp:.2f} ms (x{tb / tp:.2f})"
            + (f", optimized x{r['speedup_optimized']:.2f}" if args.optimized else ""),
            flush=True,
        )
        write_rows(csv_path, rows)  # row by row: an interrupted run keeps what it measured
    info = args.out / "budget_latency_info.json"
    runs = json.loads(info.read_text()) if info.exists() else []
    runs.append({"command": args.command, "threads": args.threads, "repeats": args.repeats,
                 "ended": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_end": os.getloadavg()})  # fmt: skip
    info.write_text(json.dumps(runs, indent=1))


# --------------------------------------------------------------------------------------------- report


def _boot_ci(correct: np.ndarray, idx: np.ndarray) -> tuple[float, float]:
    """95 % percentile interval of the seed-mean ACC, resampling test images. ``correct``: [seeds, images]."""
    per_image = correct.mean(0)
    means = per_image[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


class Preds:
    def __init__(self, folder: Path, n_boot: int):
        self.folder, self.n_boot, self._idx = folder, n_boot, {}

    def correct(self, rows: list[dict], stage: str) -> np.ndarray | None:
        """[seeds, images] per-image score of the rows' test predictions (``stage`` pruned / finetuned): 0/1 correct,
        or the kept per-image Dice (``{stage}_score``, segmentation); None if any is missing."""
        out = []
        for r in rows:
            f = (
                self.folder
                / f"{tag(r['dataset'], r['method'], r['schedule'], r['budget_kind'], r['budget'], r['seed'])}.npz"
            )
            b = self.folder / f"{r['dataset']}_base_s{r['seed']}.npz"
            if not f.exists() or not b.exists():
                return None
            z = np.load(f)
            if f"{stage}_score" in z.files:
                out.append(z[f"{stage}_score"].astype(np.float64))
                continue
            y = np.load(b)["y"]
            out.append(((z[stage] >= 0.5).astype(np.int64) == y).astype(np.float64))
        return np.stack(out) if out else None

    def idx(self, n: int) -> np.ndarray:
        if n not in self._idx:
            self._idx[n] = np.random.default_rng(0).integers(0, n, size=(self.n_boot, n))
        return self._idx[n]

    def ci(self, rows: list[dict], stage: str) -> str:
        c = self.correct(rows, stage)
        if c is None:
            return ""
        lo, hi = _boot_ci(c, self.idx(c.shape[1]))
        return f" [{lo:.3f}, {hi:.3f}]"

    def diff_ci(self, a: list[dict], b: list[dict], stage: str) -> str:
        ca, cb = self.correct(a, stage), self.correct(b, stage)
        if ca is None or cb is None:
            return ""
        idx = self.idx(ca.shape[1])
        d = ca.mean(0)[idx].mean(1) - cb.mean(0)[idx].mean(1)
        return f" [{100 * np.percentile(d, 2.5):+.1f}, {100 * np.percentile(d, 97.5):+.1f}]"


def _mean(rows: list[dict], k: str) -> float:
    v = [_float(r[k]) for r in rows]
    v = [x for x in v if math.isfinite(x)]
    return float(np.mean(v)) if v else float("nan")


def _cell(v: float, fmt: str = ".3f") -> str:
    return "-" if not math.isfinite(v) else format(v, fmt)


def _group(rows: list[dict]) -> dict[tuple, list[dict]]:
    g: dict[tuple, list[dict]] = {}
    for r in rows:
        g.setdefault(
            (r["dataset"], r["budget_kind"], f"{float(r['budget']):.2f}", r["method"], r["schedule"]), []
        ).append(r)
    return g


def _budget_label(kind: str, b: str) -> str:
    return f"{float(b):.0%} MACs" if kind == "macs" else f"{float(b):g}x CPU"


def equal_budget_table(
    rows: list[dict], kind: str, pr: Preds, datasets: list[str], methods: list[str], metric: str = "ACC"
) -> str:
    g = _group(rows)
    lines = [
        "| dataset | budget | method | schedule | seeds | MACs removed | params kept | speed-up est. | speed-up measured | "
        "ACC base | ACC no ft [95% CI] | AUC no ft | ACC fine-tuned [95% CI] | AUC fine-tuned | val ACC no ft |".replace(
            "ACC", metric
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    n = 0
    for d in datasets:
        budgets = sorted({k[2] for k in g if k[0] == d and k[1] == kind}, key=float)
        for b in budgets:
            for m in methods:
                for s in SCHEDULES:
                    sel = g.get((d, kind, b, m, s))
                    if not sel:
                        continue
                    n += 1
                    lines.append(
                        f"| {d} | {_budget_label(kind, b)} | {m} | {s} | {len(sel)} | {_cell(_mean(sel, 'macs_removed'))}"
                        f"{' (!)' if kind == 'macs' and abs(_mean(sel, 'macs_removed') - float(b)) > 0.01 else ''} | "
                        f"{_cell(_mean(sel, 'params_ratio'))} | {_cell(_mean(sel, 'speedup_estimated'), '.2f')} | "
                        f"{_cell(_mean(sel, 'speedup_measured'), '.2f')} | {_cell(_mean(sel, 'acc_base'))} | "
                        f"{_cell(_mean(sel, 'acc_pruned'))}{pr.ci(sel, 'pruned')} | {_cell(_mean(sel, 'auc_pruned'))} | "
                        f"{_cell(_mean(sel, 'acc_finetuned'))}{pr.ci(sel, 'finetuned')} | {_cell(_mean(sel, 'auc_finetuned'))} | "
                        f"{_cell(_mean(sel, 'val_acc_pruned'))} |"
                    )
    note = (
        "\n\n(!) = reached MACs removal more than 1 pt off the requested budget (cost-aware pruning never stops "
        "short, but one channel of a narrow early layer can cost several pt of MACs, most of all in 3D after earlier "
        "iterative steps): not an equal-MACs comparison."
        if kind == "macs"
        else ""
    )
    return "\n".join(lines) + note if n else "(no rows yet)"


def schedule_table(
    rows: list[dict], pr: Preds, datasets: list[str], methods: list[str], metric: str = "ACC"
) -> str:
    g = _group(rows)
    lines = [
        "| dataset | budget | method | ACC no ft one-shot | iterative | diff [95% CI] | ACC fine-tuned one-shot | iterative | diff [95% CI] | MACs removed one-shot / iterative |".replace(
            "ACC", metric
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    n = 0
    for d in datasets:
        for kind in ("macs", "latency"):
            for b in sorted({k[2] for k in g if k[0] == d and k[1] == kind}, key=float):
                for m in methods:
                    a, it = g.get((d, kind, b, m, "oneshot")), g.get((d, kind, b, m, "iterative"))
                    if not a or not it:
                        continue
                    seeds = sorted({r["seed"] for r in a} & {r["seed"] for r in it})
                    a = [r for r in a if r["seed"] in seeds]
                    it = [r for r in it if r["seed"] in seeds]
                    n += 1
                    cells = []
                    for stage, col in (("pruned", "acc_pruned"), ("finetuned", "acc_finetuned")):
                        va, vi = _mean(a, col), _mean(it, col)
                        cells.append(
                            f"{va:.3f} | {vi:.3f} | {100 * (vi - va):+.1f}{pr.diff_ci(it, a, stage)}"
                        )
                    lines.append(
                        f"| {d} | {_budget_label(kind, b)} | {m} | {cells[0]} | {cells[1]} | "
                        f"{_mean(a, 'macs_removed'):.3f} / {_mean(it, 'macs_removed'):.3f} |"
                    )
    return "\n".join(lines) if n else "(no method has both schedules yet)"


def _choose_config(rows: list[dict], kind: str, budgets: list[str], val_col: str) -> tuple[str, str] | None:
    """The attribution (method, schedule) with the best mean validation ACC over all datasets, budgets and seeds
    (one configuration for all datasets; test ACC never enters the choice). Needs rows on every dataset present."""
    datasets = sorted({r["dataset"] for r in rows})
    best = None
    for m in ATTRIBUTION:
        for s in SCHEDULES:
            per_d = []
            for d in datasets:
                sel = [r for r in rows if r["dataset"] == d and r["method"] == m and r["schedule"] == s
                       and r["budget_kind"] == kind and f"{float(r['budget']):.2f}" in budgets]  # fmt: skip
                if not sel:
                    break
                per_d.append(_mean(sel, val_col))
            else:
                if per_d:
                    score = float(np.mean(per_d))
                    if best is None or score > best[0]:
                        best = (score, m, s)
    return None if best is None else (best[1], best[2])


def verdict_latency(rows: list[dict], datasets: list[str], pr: Preds) -> tuple[str, dict]:
    budgets = ["2.00", "3.00"]
    lat = [r for r in rows if r["budget_kind"] == "latency" and f"{float(r['budget']):.2f}" in budgets]
    head = (
        "**(a) Equal latency, no fine-tune** (BatchNorm re-estimated): the best attribution configuration "
        "(method x schedule among lrp / ig / dlb, ONE for all datasets, chosen on mean validation ACC over datasets, "
        "2x and 3x and seeds; test ACC never enters the choice) against the best reference among taylor / magnitude / "
        "random, either schedule, picked per dataset and budget on TEST ACC (the strictest comparison). Goal: >= +3 pt "
        "test ACC at both 2x and 3x on >= 2 of 3 datasets, and never more than 1 pt below any reference configuration."
    )
    cfg = _choose_config(lat, "latency", budgets, "val_acc_pruned")
    if cfg is None:
        return (
            head + "\n\nNot evaluable: no latency rows yet (they need the latency tables: `--phase tables`).",
            {"evaluable": False},
        )
    lines = [head, "", f"Chosen on validation: **{cfg[0]} {cfg[1]}**.", "",
             "| dataset | speed-up | attribution ACC | best reference | ref. ACC | diff [95% CI] | worst diff vs any reference | measured speed-up attr. / ref. |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    g = _group(lat)
    data: dict[str, Any] = {"config": list(cfg), "datasets": {}}
    gains, never_below, evaluable = 0, True, True
    for d in datasets:
        ok_d = True
        for b in budgets:
            a = g.get((d, "latency", b, cfg[0], cfg[1]))
            refs = {
                (m, s): g[(d, "latency", b, m, s)]
                for m in REFERENCE
                for s in SCHEDULES
                if (d, "latency", b, m, s) in g
            }
            if not a or not refs:
                lines.append(f"| {d} | {float(b):g}x | not run | | | | | |")
                ok_d, evaluable = False, False
                continue
            acc = _mean(a, "acc_pruned")
            (rm, rs), rsel = max(refs.items(), key=lambda kv: _mean(kv[1], "acc_pruned"))
            racc = _mean(rsel, "acc_pruned")
            worst = min(acc - _mean(v, "acc_pruned") for v in refs.values())
            never_below &= worst >= -0.01
            ok_d &= acc - racc >= 0.03
            data["datasets"].setdefault(d, {})[b] = {"acc": acc, "reference": f"{rm} {rs}", "acc_reference": racc,
                                                     "diff": acc - racc, "worst_diff": worst}  # fmt: skip
            lines.append(
                f"| {d} | {float(b):g}x | {acc:.3f} | {rm} {rs} | {racc:.3f} | {100 * (acc - racc):+.1f}"
                f"{pr.diff_ci(a, rsel, 'pruned')} | {100 * worst:+.1f} | {_cell(_mean(a, 'speedup_measured'), '.2f')} / "
                f"{_cell(_mean(rsel, 'speedup_measured'), '.2f')} |"
            )
        gains += ok_d
    goal = [d for d in datasets if d in DEFAULT_DATASETS]
    met = evaluable and len(goal) == 3 and gains >= 2 and never_below
    data.update(datasets_with_3pt=gains, never_more_than_1pt_below=never_below, met=met, evaluable=evaluable)
    lines += ["", f"Datasets with >= +3 pt at both speed-ups: {gains} of {len(datasets)}; never > 1 pt below any "
              f"reference: {'yes' if never_below else 'no'}. **Goal (a) {'met' if met else 'not met'}**"
              + ("" if evaluable and len(goal) == 3 else " (incomplete: not every dataset / budget has rows)") + "."]  # fmt: skip
    return "\n".join(lines), data


def verdict_macs(rows: list[dict], datasets: list[str], pr: Preds) -> tuple[str, dict]:
    budgets = ["0.85", "0.90"]
    mr = [r for r in rows if r["budget_kind"] == "macs" and f"{float(r['budget']):.2f}" in budgets]
    head = (
        "**(b) Equal MACs, after fine-tune**: the best attribution configuration (lrp / ig / dlb x schedule, ONE for "
        "all datasets, chosen on mean validation ACC after fine-tune at 85 % and 90 % MACs removed) must lose <= 0.5 pt "
        "mean test ACC (mean over seeds) against its own base models at >= 85 % of MACs removed on all three datasets."
    )
    cfg = _choose_config(mr, "macs", budgets, "val_acc_finetuned")
    if cfg is None:
        return head + "\n\nNot evaluable: no attribution rows at 85 / 90 % MACs removed yet.", {
            "evaluable": False
        }
    lines = [head, "", f"Chosen on validation: **{cfg[0]} {cfg[1]}**.", "",
             "| dataset | MACs removed (requested / reached) | seeds | ACC base | ACC fine-tuned [95% CI] | drop (pt) | <= 0.5 pt |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    g = _group(mr)
    data: dict[str, Any] = {"config": list(cfg), "datasets": {}}
    ok_all, evaluable = True, True
    for d in datasets:
        ok_d = False
        for b in budgets:
            a = g.get((d, "macs", b, cfg[0], cfg[1]))
            if not a:
                lines.append(f"| {d} | {float(b):.0%} | not run | | | | |")
                continue
            drop = _mean(a, "acc_base") - _mean(a, "acc_finetuned")
            ok = drop <= 0.005
            ok_d |= ok
            data["datasets"].setdefault(d, {})[b] = {"drop": drop, "ok": ok, "seeds": len(a)}
            lines.append(
                f"| {d} | {float(b):.0%} / {_mean(a, 'macs_removed'):.3f} | {len(a)} | {_mean(a, 'acc_base'):.3f} | "
                f"{_mean(a, 'acc_finetuned'):.3f}{pr.ci(a, 'finetuned')} | {100 * drop:+.1f} | {'yes' if ok else 'no'} |"
            )
        if d not in data["datasets"]:
            evaluable = False
        ok_all &= ok_d
    goal = [d for d in DEFAULT_DATASETS if d in datasets]
    met = evaluable and len(goal) == 3 and ok_all
    data.update(met=met, evaluable=evaluable)
    lines += ["", f"**Goal (b) {'met' if met else 'not met'}**"
              + ("" if evaluable and len(goal) == 3 else " (incomplete: not every dataset has rows)") + "."]  # fmt: skip
    return "\n".join(lines), data


def majority_acc(preds: Path, d: str) -> float:
    """Test ACC of always predicting the most frequent test label (what a collapsed network scores); segmentation:
    the better Dice of predicting one class everywhere (kept as ``trivial``)."""
    files = sorted(preds.glob(f"{d}_base_s*.npz"))
    if not files:
        return float("nan")
    z = np.load(files[0])
    if "trivial" in z.files:
        return float(z["trivial"])
    y = z["y"]
    return float(max(y.mean(), 1 - y.mean()))


def plot(rows: list[dict], datasets: list[str], methods: list[str], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    g = _group(rows)
    for d in datasets:
        measured = any(_float(r["speedup_measured"]) > 0 for r in rows if r["dataset"] == d)
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
        for ax, (stage, col) in zip(axes, (("no fine-tune", "acc_pruned"), ("fine-tuned", "acc_finetuned"))):
            base = _mean([r for r in rows if r["dataset"] == d], "acc_base")
            ax.axhline(base, color="k", lw=0.8, ls=":", label="unpruned")
            ax.axhline(
                majority_acc(out / "budget_preds", d), color="grey", lw=0.8, ls="-.", label="majority class"
            )
            for i, m in enumerate(methods):
                for s, ls, mk in (("oneshot", "-", "o"), ("iterative", "--", "^")):
                    pts = []
                    for (dd, _kind, _b, mm, ss), sel in g.items():
                        if dd != d or mm != m or ss != s:
                            continue
                        x = _mean(sel, "speedup_measured") if measured else 1 / _mean(sel, "macs_ratio")
                        if math.isfinite(x):
                            pts.append((x, _mean(sel, col)))
                    if pts:
                        pts.sort()
                        ax.plot(*zip(*pts), ls, marker=mk, ms=4, color=f"C{i}", label=f"{m} {s}")
            ax.set_xlabel(
                "measured CPU speed-up (batch 1)" if measured else "MACs speed-up (latency not measured yet)"
            )
            ax.set_ylabel(f"test {TASKS[d].metric}")
            ax.set_title(f"{d}: {stage}")
        axes[1].legend(fontsize=6, loc="lower left", ncol=2)
        fig.tight_layout()
        f = out / f"budget_{d}.png"
        fig.savefig(f, dpi=90)
        plt.close(fig)
        files.append(f.name)
    return files


def segmentation_section(
    rows: list[dict], pr: Preds, d: str, methods: list[str], out: Path, report_cmd: str, cmd_acc: str
) -> str:
    """The tables of a segmentation dataset (Dice in the ACC columns), beside the MedMNIST ones: no goal."""
    task, sel = TASKS[d], [r for r in rows if r["dataset"] == d]
    m = task.metric
    mine = [c for c in cmd_acc.split("`; `") if f" {d}" in c.split("--datasets", 1)[-1].split(" --")[0]]
    cmd_acc = "`; `".join(mine) if mine else cmd_acc  # the commands that named this dataset
    return "\n\n".join(
        [
            f"### Segmentation beside them: {d} ({task.model_name}; {m}, no goal)",
            f"Rows: {len(sel)} (`{cmd_acc}`; tables: `{report_cmd}`). {task.description} Test {m} of the unpruned "
            f"network: {_mean(sel, 'acc_base'):.3f} (validation {_mean(sel, 'val_acc_base'):.3f}); predicting "
            f"one class everywhere scores {majority_acc(out / 'budget_preds', d):.3f}. Calibration: "
            f"{sel[0]['calib']} random training crops chosen by the seed (relevance target: the membrane logit over "
            f"the labelled membrane pixels; BatchNorm re-estimated on the crops). Fine-tune: "
            f"{'/'.join(sorted({r['ft_epochs'] for r in sel}))} epochs on random crops (base: "
            f"{'/'.join(sorted({r['base_epochs'] for r in sel}))}). 95 % CIs: bootstrap over the test images. AUC "
            "columns: not defined here (-).",
            f"#### Equal MACs ({m})\n\n" + equal_budget_table(rows, "macs", pr, [d], methods, m),
            f"#### Equal latency ({m})\n\n" + equal_budget_table(rows, "latency", pr, [d], methods, m),
            f"#### One-shot vs iterative ({m}, diff in points)\n\n"
            + schedule_table(rows, pr, [d], methods, m),
        ]
    )


def _speedup_summary(rows: list[dict]) -> dict[tuple[str, str], str]:
    """``{(dataset, requested): "median measured (min-max), n"}`` of the measured latency rows."""
    out: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["budget_kind"] == "latency" and r["speedup_measured"]:
            out.setdefault((r["dataset"], f"{float(r['budget']):g}"), []).append(float(r["speedup_measured"]))
    return {
        k: f"{np.median(v):.2f}x ({min(v):.2f}-{max(v):.2f}, {len(v)} rows)" for k, v in sorted(out.items())
    }


def latency_model_section(rows: list[dict], datasets: list[str], args: argparse.Namespace) -> str:
    """The latency tables' fitted non-layer time and requested vs measured speed-ups, beside the constant-overhead
    model's rows (``budget_latency_v1.csv``, kept for the record) where that file exists."""
    lines = [
        "### Latency model: requested vs measured speed-up",
        "The tables (`--phase tables`) fit the time outside the conv / linear layers as a constant plus a part per "
        "element the layers output (fitted on the base network and a copy with half of every layer's channels "
        "removed, `measure_latency_table`). Until 2026-11-30 that time was one constant; its rows are kept in "
        "`benchmarks/results/budget_latency_v1.csv` (not in the tables above).",
        "",
        "| dataset | table: layers / constant / per element | requested | measured now | measured with the constant model |",
        "|---|---|---|---|---|",
    ]
    now = _speedup_summary(rows)
    v1_file = args.out / "budget_latency_v1.csv"
    before = _speedup_summary(read_rows(v1_file)) if v1_file.exists() else {}
    for d in datasets:
        table = load_table(table_path(args.cache, d, args.threads))
        if table is None:
            continue
        desc = (
            f"{1000 * sum(t(t.in_channels[-1], t.out_channels[-1]) for t in table.layers.values()):.2f} ms / "
            f"{1000 * table.overhead:.2f} ms / {1e9 * table.activation_seconds:.2f} ns"
        )
        for b in sorted({k[1] for k in (*now, *before) if k[0] == d}, key=float):
            lines.append(f"| {d} | {desc} | {b}x | {now.get((d, b), '-')} | {before.get((d, b), '-')} |")
    return "\n".join(lines)


def phase_report(args: argparse.Namespace) -> str:
    rows = read_rows(args.out / "budget.csv")
    if not rows:
        print("no rows")
        return "no rows"
    datasets = [d for d in TASKS if any(r["dataset"] == d for r in rows)]
    goal_ds = [d for d in datasets if TASKS[d].goal]  # the verdicts and main tables; the others beside them
    goal_rows = [r for r in rows if r["dataset"] in goal_ds]
    methods = [m for m in ALL_METHODS if any(r["method"] == m for r in rows)]
    pr = Preds(args.out / "budget_preds", args.n_boot)

    def rel(p: Path) -> Path:
        root = HERE.parent.resolve()
        return p.resolve().relative_to(root) if p.resolve().is_relative_to(root) else p

    cmd_acc = "OMP_NUM_THREADS=1 python benchmarks/budget.py --phase accuracy " + " ".join(
        f"--{k.replace('_', '-')} " + " ".join(map(str, v))
        for k, v in (
            ("seeds", sorted({int(r["seed"]) for r in rows})),
            ("datasets", datasets),
            ("methods", methods),
        )
    )
    acc_info = args.out / "budget_run_info.json"
    acc_runs = [r for r in (json.loads(acc_info.read_text()) if acc_info.exists() else []) if r["rows_added"]]
    if acc_runs:
        cmd_acc = "`; `".join(dict.fromkeys("OMP_NUM_THREADS=1 " + r["command"] for r in acc_runs))
    lat_info = args.out / "budget_latency_info.json"
    lat_runs = json.loads(lat_info.read_text()) if lat_info.exists() else []
    recent = []  # the latest run over every dataset and the partial runs after it (rows they added)
    for r in reversed(lat_runs):
        recent.insert(0, r)
        if "--datasets" not in r["command"] or all(d in r["command"] for d in datasets):
            break
    lat_cmd = (
        "; ".join(
            f"`{r['command']}` ({r['threads']} thread(s), load average at end {r['load_end'][0]:.1f})"
            for r in recent
        )
        if recent
        else "not run yet"
    )
    n_rows = {d: sum(r["dataset"] == d for r in rows) for d in datasets}
    have = {(r["dataset"], r["method"], r["schedule"]) for r in rows}
    missing = [
        f"{d}: " + ", ".join(f"{m} {s}" for m in methods for s in SCHEDULES if (d, m, s) not in have)
        for d in datasets
        if any((d, m, s) not in have for m in methods for s in SCHEDULES)
    ]
    ft = {d: sorted({r["ft_epochs"] for r in rows if r["dataset"] == d}) for d in datasets}
    va, da = verdict_latency(goal_rows, goal_ds, pr)
    vb, db = verdict_macs(goal_rows, goal_ds, pr)
    files = plot(rows, datasets, methods, args.out)
    (args.out / "budget_verdicts.json").write_text(
        json.dumps({"a_equal_latency": da, "b_equal_macs": db}, indent=1)
    )
    report_cmd = f"python benchmarks/budget.py --phase report --out {rel(args.out)}"
    md = "\n\n".join(
        [
            "## Budgeted pruning: equal MACs and equal CPU latency, one-shot vs iterative (MedMNIST, issue #17)",
            f"Rows: `{rel(args.out / 'budget.csv')}` ({', '.join(f'{d} {n}' for d, n in n_rows.items())}), written by "
            f"`{cmd_acc}` (accuracy phase: no timing; fine-tune epochs per dataset: "
            + ", ".join(f"{d} {'/'.join(v)}" for d, v in ft.items())
            + f"). Measured speed-ups: {lat_cmd}. Tables, plots and verdicts: `{report_cmd}`. "
            + (
                "Not run (method schedule): " + "; ".join(missing) + "."
                if missing
                else "Every method x schedule ran."
            ),
            "Each seed prunes its own base model (trained with that seed; calibration subset of "
            f"{rows[0]['calib']} training images chosen by the seed). No ft = right after pruning and BatchNorm "
            "re-estimation; fine-tuned = after the same short fine-tune for every row (best validation epoch, the "
            "pruned weights included). `oneshot` = one relevance pass; `iterative` = "
            f"{STEPS} steps, relevance re-scored and BatchNorm re-estimated after each. MACs budgets use "
            '`prune(target="macs")` (cost-aware); latency budgets `prune(target="latency")` with the base model\'s '
            "per-layer CPU latency table at batch 1 (speed-up est. = table estimate; speed-up measured = eager "
            "batch-1 median, pruned vs unpruned interleaved in one process). 95 % CIs: bootstrap over test images "
            f"({args.n_boot} resamples, seeds averaged inside each resample). Majority-class test ACC (a network "
            "that predicts one class): "
            + ", ".join(f"{d} {majority_acc(args.out / 'budget_preds', d):.3f}" for d in goal_ds)
            + ".",
            "### Verdicts\n\n" + va + "\n\n" + vb,
            f"### Equal MACs\n\nCommand: `{report_cmd}` (rows from `{cmd_acc}`)\n\n"
            + equal_budget_table(rows, "macs", pr, goal_ds, methods),
            f"### Equal latency (requested CPU speed-up)\n\nCommand: `{report_cmd}` (rows from `{cmd_acc}` after "
            "`--phase tables`)\n\n" + equal_budget_table(rows, "latency", pr, goal_ds, methods),
            latency_model_section(rows, datasets, args),
            f"### One-shot vs iterative ({STEPS} steps)\n\nCommand: `{report_cmd}`. diff = iterative - one-shot, "
            "test ACC points, seeds both schedules have.\n\n" + schedule_table(rows, pr, goal_ds, methods),
            *(
                segmentation_section(rows, pr, d, methods, args.out, report_cmd, cmd_acc)
                for d in datasets
                if not TASKS[d].goal
            ),
            "Plots (test ACC vs measured speed-up, or vs MACs speed-up until the latency phase ran): "
            + ", ".join(f"`benchmarks/results/{f}`" for f in files)
            + ".",
        ]
    )
    (args.out / "budget.md").write_text(md + "\n")
    print(md)
    return md


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=("tables", "accuracy", "latency", "report"), default="accuracy")
    p.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS, choices=list(TASKS))
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    p.add_argument("--steps", type=int, default=STEPS, help="iterative schedule: re-scored steps")
    p.add_argument(
        "--macs-budgets", nargs="*", type=float, default=list(MACS_BUDGETS), help="fractions of MACs removed"
    )
    p.add_argument(
        "--speedups", nargs="*", type=float, default=list(SPEEDUPS), help="requested CPU speed-ups (batch 1)"
    )
    p.add_argument("--epochs", type=int, default=None, help="override the base training epochs (smoke tests)")
    p.add_argument("--ft-epochs", type=int, default=None, help="override the dataset's fine-tune epochs")
    p.add_argument("--ft-feature", nargs="+", type=float, default=None, metavar="W",
                   help="fine-tune with kept-channel feature distillation from the unpruned network at each weight "
                   "W, keeping the best on validation (column ft_feature_weight); use another --out: the rows "
                   "are not those of the plain fine-tune")  # fmt: skip
    p.add_argument("--ft-kd", nargs="+", type=float, default=None, metavar="ALPHA",
                   help="fine-tune with logit distillation from the unpruned network (loss (1 - ALPHA) CE + ALPHA "
                   "T^2 KL, T = 4) at each ALPHA in (0, 1] (with --ft-feature: every combination), keeping the best "
                   "on validation (column ft_kd_alpha); use another --out. Classification only")  # fmt: skip
    p.add_argument("--ft-lr", nargs="+", type=float, default=None, metavar="LR",
                   help="fine-tune at each peak learning rate LR (the plain fine-tune's is 1e-3; with --ft-feature / "
                   "--ft-kd: every combination), keeping the best on validation (column ft_lr); use another --out")  # fmt: skip
    p.add_argument("--recover-between", action="store_true",
                   help="iterative schedule: gradual pruning, the fine-tune's epochs split evenly over the stages "
                   "(a recovery fine-tune after each stage but the last, the rest after the last: the same total "
                   "length as the one-shot rows' fine-tune; column recover_between); use another --out. "
                   "Classification only")  # fmt: skip
    p.add_argument("--raw-ranking", action="store_true",
                   help="rank channels by relevance alone (prune(cost_aware=False); column cost_aware False) instead "
                   "of relevance per unit of the budget's cost; models kept apart; use another --out")  # fmt: skip
    p.add_argument("--max-layer-ratio", type=float, default=None, metavar="R",
                   help="cap every layer's removal at R of its channels (prune's max_layer_ratio; its default 0.9) "
                   "for a more even network at the same budget; column max_layer_ratio; models kept apart; use "
                   "another --out")  # fmt: skip
    p.add_argument("--calib", type=int, default=None,
                   help="calibration images for relevance and BatchNorm (default 256; membrane: 16 random 128^2 crops)")  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads: latency tables, pruning for latency, timing"
    )
    p.add_argument("--repeats", type=int, default=30, help="timed calls per measurement (tables, latency)")
    p.add_argument("--no-optimized", dest="optimized", action="store_false",
                   help="latency phase: skip the optimize_for_inference(kernels='auto', backend='jit') timing")  # fmt: skip
    p.add_argument(
        "--force", action="store_true", help="tables / latency: measure again what is already there"
    )
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument(
        "--limit", type=int, default=None, help="use only the first N images of each split (smoke test)"
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--cache", type=Path, default=None, help="default benchmarks/cache, or OUT/cache for another --out"
    )
    args = p.parse_args(argv)
    if args.ft_kd is not None:
        if any(not 0 < a <= 1 for a in args.ft_kd):
            p.error(f"--ft-kd: every ALPHA must lie in (0, 1], got {args.ft_kd}")
        if "membrane" in args.datasets:
            p.error("--ft-kd: logit distillation is for the classification datasets, not membrane")
    if args.recover_between:
        if "membrane" in args.datasets:
            p.error(
                "--recover-between: gradual pruning is benchmarked on the classification datasets, not membrane"
            )
        if args.ft_feature or args.ft_kd or args.ft_lr:
            p.error(
                "--recover-between: not combined with --ft-feature / --ft-kd / --ft-lr (one fine-tune variant)"
            )
    if args.ft_lr is not None:
        if any(not lr > 0 for lr in args.ft_lr):
            p.error(f"--ft-lr: every LR must be > 0, got {args.ft_lr}")
        if "membrane" in args.datasets:
            p.error("--ft-lr: for the classification datasets (membrane keeps its own learning rate)")
    if args.raw_ranking and args.out.resolve() == RESULTS.resolve():
        p.error("--raw-ranking: its rows share budget.csv's keys; write them elsewhere with --out")
    if args.max_layer_ratio is not None:
        if not 0 < args.max_layer_ratio < 1:
            p.error(f"--max-layer-ratio must lie in (0, 1), got {args.max_layer_ratio}")
        if args.out.resolve() == RESULTS.resolve():
            p.error("--max-layer-ratio: its rows share budget.csv's keys; write them elsewhere with --out")
    if args.cache is None:
        args.cache = CACHE if args.out.resolve() == RESULTS.resolve() else args.out / "cache"
    args.command = "python benchmarks/budget.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.phase == "tables":
        phase_tables(args)
    elif args.phase == "accuracy":
        phase_accuracy(args)
    elif args.phase == "latency":
        phase_latency(args)
    else:
        phase_report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
