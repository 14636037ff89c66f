"""Depth vs width vs combined pruning at equal MACs and equal CPU latency (issue #15, deliverable 4).

MedMNIST rows prune a copy of one seed's own base model (``run.py``'s MONAI ResNet-18 narrow; the same cached base
models and calibration subsets as ``budget.py``), re-estimate BatchNorm on the calibration subset, and record test /
validation ACC with no fine-tune and after the same short fine-tune (``run.train(include_start=True)``). Modes:

* ``width``: channels only (``prune_step``, exactly ``budget.py``'s one-shot rows; ``--reuse-budget`` copies those
  rows from ``budget.csv`` instead of recomputing them, ``source`` says so).
* ``depth``: whole residual blocks only (``block_relevance`` -> ``prune_depth``, stage rule
  ``min_blocks_per_stage=1``); a budget the removable blocks cannot reach is a row with the reachable figure in
  ``note`` and no accuracy.
* ``both``: depth first, then width to the rest of the budget. Split: half of the budget in log space each (depth to
  ``sqrt(speed-up)`` / to ``1 - sqrt(1 - MACs removed)``, then width on the depth-pruned network to the total). It
  is the simplest split that uses both without a search; no other split was run.

Budgets: ``macs`` = fraction of MACs removed; ``latency`` = requested CPU speed-up at batch 1, estimated with the
base model's per-layer latency table (``budget.py --phase tables``; layers of removed blocks cost 0 s and the
overhead is constant, so depth's estimate is low). Equal measured latency comes from the ``latency`` phase: the
report interpolates each (mode, method)'s ACC at a measured speed-up along its budgets.

The 3D networks of the latency tables (``latency_target.py``: spleen UNet 96^3, DenseNet121-3D, resnet18-3D,
UNet-3D, untrained): same modes at the same budgets with magnitude scores (data-free) and
``min_blocks_per_stage=0`` (each UNet level holds a single residual unit; no accuracy is at stake); accuracy columns
empty, ``macs_ratio`` vs ``speedup_measured`` is the figure.

Phases (``--phase``): ``accuracy`` (no timing of its own; safe beside other jobs), ``latency`` (quiet machine: times
every saved pruned model against its base, batch 1, ``--threads``; ``--quick`` = 3 repeats on the first rows, to
check it works), ``report`` (``OUT/depth.md`` + ``OUT/depth_<dataset>.png``, verdicts in ``OUT/depth_verdicts.json``).

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/depth.py --phase accuracy --seeds 0 --cache /work/main/benchmarks/cache
    OMP_NUM_THREADS=1 python benchmarks/depth.py --phase accuracy --nets3d --cache ...        # 3D nets, no data
    OMP_NUM_THREADS=1 python benchmarks/depth.py --phase latency --threads 1 --cache ...      # quiet machine
    python benchmarks/depth.py --phase report

Rows already in depth.csv are skipped, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import budget  # noqa: E402
from budget import (  # noqa: E402
    TASKS,
    _float,
    _mean,
    append_row,
    load_table,
    read_rows,
    table_path,
    write_rows,
)
from run import (  # noqa: E402
    ALL_METHODS,
    CACHE,
    DATASETS,
    DEFAULT_DATASETS,
    RESULTS,
    base_model,
    batches,
    latency_pair,
    metrics,
    model_name,
    predict,
    train,
)

from monai_iaprune.pruning import (  # noqa: E402
    count_macs,
    count_params,
    load_pruned,
    prune,
    prune_depth,
    prune_step,
    recalibrate_batchnorm,
    save_pruned,
)
from monai_iaprune.pruning.depth import DepthBudgetUnreachable, latency_table_for  # noqa: E402
from monai_iaprune.relevance import channel_relevance  # noqa: E402
from monai_iaprune.relevance.blocks import block_relevance  # noqa: E402

MODES = ("width", "depth", "both")
MACS_BUDGETS = (0.5,)
SPEEDUPS = (1.5, 2.0)
NETS3D_METHOD = "magnitude"

COLUMNS = [
    "dataset", "model", "method", "mode", "budget_kind", "budget", "seed",
    "acc_base", "acc_pruned", "acc_finetuned", "macs_ratio", "speedup_measured",
    "val_acc_base", "val_acc_pruned", "val_acc_finetuned", "params_ratio", "macs_removed",
    "blocks_removed", "depth_speedup_estimated", "speedup_estimated",
    "latency_base_ms", "latency_pruned_ms", "latency_threads",
    "prune_time_s", "finetune_time_s", "calib", "ft_epochs", "source", "note", "model_file",
]  # fmt: skip


def row_key(r: dict[str, Any]) -> tuple[str, ...]:
    return (
        r["dataset"],
        r["method"],
        r["mode"],
        r["budget_kind"],
        f"{float(r['budget']):.2f}",
        str(r["seed"]),
    )


def tag(d: str, method: str, mode: str, kind: str, budget_: float, seed: int | str) -> str:
    return f"{d}_{method}_{mode}_{kind}{float(budget_):.2f}_s{seed}"


# ------------------------------------------------------------------------------------------- pruning


def _split(kind: str, b: float) -> float:
    """The depth part of a ``both`` budget: half of it in log space."""
    return math.sqrt(b) if kind == "latency" else 1.0 - math.sqrt(1.0 - b)


def prune_mode(
    m: nn.Module,
    mode: str,
    method: str,
    kind: str,
    b: float,
    cal: list,
    x1: torch.Tensor,
    table: Any,
    threads: int,
    seed: int,
    recalibrate: bool = True,
    min_blocks: int = 1,
) -> dict[str, Any]:
    """Prune ``m`` in place to budget ``b`` by ``mode``; returns the row's pruning columns.

    Raises:
        ValueError: the budget cannot be reached by this mode (message has the reachable figure).
    """
    rel_kw = {"seed": seed} if method == "random" else {}
    macs0 = count_macs(m, x1)
    info: dict[str, Any] = {"blocks_removed": 0}
    if mode in ("depth", "both"):
        part = b if mode == "depth" else _split(kind, b)
        brel = block_relevance(m, cal, method, **rel_kw)
        try:
            res = _depth(m, brel, kind, part, x1, table, min_blocks)
        except DepthBudgetUnreachable as e:
            if mode == "depth":
                raise
            # ``both``: depth's half of the budget is more than whole blocks hold; take all depth can give
            share = e.reachable * (1 - 1e-9)
            res = _depth(
                m, brel, kind, 1 / (1 - share) if kind == "latency" else share, x1, table, min_blocks
            )
            info["note"] = (
                f"depth part capped at {e.reachable:.3f} of {kind} (asked {1 - 1 / part if kind == 'latency' else part:.3f})"
            )
        if kind == "latency":
            info["depth_speedup_estimated"] = res.latency_estimated_speedup
        info["blocks_removed"] = len(res.removed)
        if recalibrate and cal:
            recalibrate_batchnorm(m, cal)
    if mode in ("width", "both"):
        if kind == "latency":
            t = latency_table_for(table, m)
            left = b / _estimate(table, m)  # the speed-up still to find, relative to the depth-pruned network
            if left > 1.0 + 1e-3:
                _width(m, method, cal, x1, rel_kw, recalibrate, target="latency", speedup=left, latency_table=t,
                       threads=threads)  # fmt: skip
        else:
            left = 1.0 - (1.0 - b) * macs0 / count_macs(m, x1)
            if left > 1e-3:
                _width(m, method, cal, x1, rel_kw, recalibrate, target="macs", ratio=left)
    if table is not None:
        info["speedup_estimated"] = _estimate(table, m)
    return info


def _depth(m, brel, kind, part, x1, table, min_blocks):
    if kind == "latency":
        return prune_depth(m, brel, target="latency", speedup=part, latency_table=table, example_inputs=x1,
                           min_blocks_per_stage=min_blocks)  # fmt: skip
    return prune_depth(m, brel, part, target="macs", example_inputs=x1, min_blocks_per_stage=min_blocks)


def _estimate(table: Any, m: nn.Module) -> float:
    """Estimated speed-up of ``m`` over the base the (unrestricted) ``table`` was measured on."""
    return table.estimate({}) / latency_table_for(table, m).estimate_model(m)


def _width(m, method, cal, x1, rel_kw, recalibrate, ratio=0.5, **target_kw) -> None:
    if cal:
        prune_step(m, cal, method, ratio, relevance_kwargs=rel_kw, example_inputs=x1, recalibrate_bn=recalibrate,
                   **target_kw)  # fmt: skip
    else:  # 3D nets: data-free scores, nothing to re-estimate BatchNorm on
        prune(m, channel_relevance(m, None, method, progress=False, **rel_kw), ratio, example_inputs=x1,
              **target_kw)  # fmt: skip


# ------------------------------------------------------------------------------------------- accuracy


def _reused(args: argparse.Namespace) -> dict[tuple, dict[str, str]]:
    """``budget.py``'s one-shot rows by (dataset, method, kind, budget, seed): the same width pruning."""
    if not args.reuse_budget:
        return {}
    rows = read_rows(args.out / "budget.csv", budget.COLUMNS)
    return {(r["dataset"], r["method"], r["budget_kind"], f"{float(r['budget']):.2f}", r["seed"]): r
            for r in rows if r["schedule"] == "oneshot"}  # fmt: skip


def phase_accuracy(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    csv_path = args.out / "depth.csv"
    n_before = len(read_rows(csv_path, COLUMNS))
    entry = {"command": args.command, "threads": args.threads, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    try:
        if args.nets3d:
            _nets3d_rows(args, csv_path)
        else:
            _medmnist_rows(args, csv_path)
    finally:  # an interrupted run is recorded too: its rows are in the CSV
        entry.update(ended=time.strftime("%Y-%m-%dT%H:%M:%S"),
                     rows_added=len(read_rows(csv_path, COLUMNS)) - n_before)  # fmt: skip
        info = args.out / "depth_run_info.json"
        runs = json.loads(info.read_text()) if info.exists() else []
        info.write_text(json.dumps(runs + [entry], indent=1))


def _budgets(args: argparse.Namespace, table: Any) -> list[tuple[str, float]]:
    return [("latency", s) for s in args.speedups if table is not None] + [
        ("macs", b) for b in args.macs_budgets
    ]


def _medmnist_rows(args: argparse.Namespace, csv_path: Path) -> None:
    done = {row_key(r) for r in read_rows(csv_path, COLUMNS)}
    reuse = _reused(args)
    preds, models = args.out / "depth_preds", args.cache / "depth_models"
    preds.mkdir(parents=True, exist_ok=True)
    models.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        if not TASKS[name].data_path().exists():
            print(f"[skip] {name}: {TASKS[name].data_path()} not present")
            continue
        cfg = DATASETS[name]
        data = TASKS[name].load(args.limit)
        x1 = TASKS[name].example_input()
        table = load_table(table_path(args.cache, name, args.threads))
        if table is None and args.speedups:
            print(f"[skip] {name}: latency rows need {table_path(args.cache, name, args.threads)} "
                  f"(budget.py --phase tables --threads {args.threads}, quiet machine)")  # fmt: skip
        ft_epochs = args.ft_epochs if args.ft_epochs is not None else cfg["ft_epochs"]
        xtr, ytr = data["train"]
        for seed in args.seeds:
            todo = [(kind, b, meth, mode) for kind, b in _budgets(args, table) for meth in args.methods
                    for mode in args.modes if (name, meth, mode, kind, f"{b:.2f}", str(seed)) not in done]  # fmt: skip
            if not todo:
                continue
            t = time.perf_counter()
            model, info = base_model(name, cfg, data, args.cache, epochs=args.epochs, seed=seed)
            t_base = time.perf_counter() - t
            model.eval()
            acc_base = metrics(data["test"][1], predict(model, data["test"][0]))[0]
            val_acc_base = metrics(data["val"][1], predict(model, data["val"][0]))[0]
            print(f"[base] {name} s{seed}: test ACC {acc_base:.4f} val {val_acc_base:.4f} ({t_base:.0f}s, {info})",
                  flush=True)  # fmt: skip
            macs_base, params_base = count_macs(model, x1), count_params(model)
            g = torch.Generator().manual_seed(
                1000 + seed
            )  # as run.py / budget.py: the seed's calibration subset
            calib = torch.randperm(len(xtr), generator=g)[: args.calib]
            cal = list(batches(xtr[calib], ytr[calib], 32))
            common = {"dataset": name, "model": model_name(cfg), "seed": seed, "acc_base": acc_base,
                      "val_acc_base": val_acc_base, "calib": args.calib, "ft_epochs": ft_epochs}  # fmt: skip
            for kind, b, meth, mode in todo:
                row = {**common, "method": meth, "mode": mode, "budget_kind": kind, "budget": float(b)}
                old = reuse.get((name, meth, kind, f"{b:.2f}", str(seed))) if mode == "width" else None
                if (
                    old is not None
                    and str(old["ft_epochs"]) == str(ft_epochs)
                    and str(old["calib"]) == str(args.calib)
                ):
                    row.update(
                        {k: old[k] for k in COLUMNS if k in old and k not in row and k != "model_file"}
                    )
                    row.update(source="budget.csv", model_file=f"budget_models/{budget.tag(name, meth, 'oneshot', kind, b, seed)}.pt",
                               blocks_removed=0)  # fmt: skip
                    _add(csv_path, row, done)
                    continue
                m = copy.deepcopy(model)
                t = time.perf_counter()
                try:
                    info_p = prune_mode(m, mode, meth, kind, b, cal, x1, table, args.threads, seed)
                except (ValueError, FloatingPointError) as e:
                    row.update(source="depth.py", note=f"unreachable: {e}"[:400])
                    _add(csv_path, row, done)
                    continue
                t_prune = time.perf_counter() - t
                p_pr, pv_pr = predict(m, data["test"][0]), predict(m, data["val"][0])
                t = time.perf_counter()
                train(m, data["train"], data["val"], ft_epochs, cfg["batch"], seed=seed, include_start=True)
                t_ft = time.perf_counter() - t
                p_ft, pv_ft = predict(m, data["test"][0]), predict(m, data["val"][0])
                key = tag(name, meth, mode, kind, b, seed)
                np.savez(preds / f"{key}.npz", pruned=p_pr.astype(np.float32), finetuned=p_ft.astype(np.float32),
                         y=data["test"][1].numpy())  # fmt: skip
                mfile = models / f"{key}.pt"
                save_pruned(m, mfile, {"dataset": name, "method": meth, "mode": mode, "budget_kind": kind,
                                       "budget": float(b), "seed": seed}, overwrite=True)  # fmt: skip
                macs = count_macs(m, x1)
                row.update(info_p)
                row.update(
                    acc_pruned=metrics(data["test"][1], p_pr)[0], acc_finetuned=metrics(data["test"][1], p_ft)[0],
                    val_acc_pruned=metrics(data["val"][1], pv_pr)[0], val_acc_finetuned=metrics(data["val"][1], pv_ft)[0],
                    macs_ratio=macs / macs_base, macs_removed=1 - macs / macs_base,
                    params_ratio=count_params(m) / params_base, prune_time_s=t_prune, finetune_time_s=t_ft,
                    source="depth.py", model_file=str(mfile.relative_to(args.cache)),
                )  # fmt: skip
                _add(csv_path, row, done)


def _add(csv_path: Path, row: dict[str, Any], done: set) -> None:
    append_row(csv_path, row, COLUMNS)
    done.add(row_key(row))
    cells = " ".join(f"{k} {_float(row.get(k)):.3f}" for k in ("macs_ratio", "speedup_estimated", "acc_pruned",
                                                                 "acc_finetuned") if k in row)  # fmt: skip
    print(f"[row] {' '.join(row_key(row))} ({row.get('source')}, blocks {row.get('blocks_removed', '')}): {cells}"
          + (f" | {row['note'][:160]}" if row.get("note") else ""), flush=True)  # fmt: skip


def nets3d() -> dict[str, tuple]:
    import latency_target

    return latency_target.models()


def _nets3d_table(name: str, base: nn.Module, x: torch.Tensor, args: argparse.Namespace) -> Any:
    """The cached table of ``latency_target.py`` (not measured here: the accuracy phase times nothing)."""
    from monai_iaprune.pruning import measure_latency_table

    cache = args.cache / "latency_target"
    if not (cache / "latency_table.json").exists():
        return None
    t = time.perf_counter()
    table = measure_latency_table(
        base, x, device="cpu", threads=args.threads, cache_dir=cache, progress=False
    )
    if time.perf_counter() - t > 30:
        print(f"[warn] {name}: the latency table was not (all) cached and was measured now", flush=True)
    return table


def _nets3d_rows(args: argparse.Namespace, csv_path: Path) -> None:
    done = {row_key(r) for r in read_rows(csv_path, COLUMNS)}
    models = args.cache / "depth_models"
    models.mkdir(parents=True, exist_ok=True)
    for name, (build, shape) in nets3d().items():
        if args.nets3d_models and name not in args.nets3d_models:
            continue
        torch.manual_seed(0)
        base = build().eval()
        x = torch.randn(*shape)
        table = _nets3d_table(name, base, x, args)
        macs_base, params_base = count_macs(base, x), count_params(base)
        for kind, b in _budgets(args, table):
            for mode in args.modes:
                row = {"dataset": name, "model": name, "method": NETS3D_METHOD, "mode": mode, "budget_kind": kind,
                       "budget": float(b), "seed": 0, "source": "depth.py"}  # fmt: skip
                if row_key(row) in done:
                    continue
                m = copy.deepcopy(base)
                t = time.perf_counter()
                try:
                    info_p = prune_mode(
                        m, mode, NETS3D_METHOD, kind, b, [], x, table, args.threads, 0, min_blocks=0
                    )
                except (ValueError, FloatingPointError) as e:
                    row["note"] = f"unreachable: {e}"[:400]
                    _add(csv_path, row, done)
                    continue
                mfile = models / f"{tag(name, NETS3D_METHOD, mode, kind, b, 0)}.pt"
                save_pruned(m, mfile, {"dataset": name, "mode": mode, "budget_kind": kind, "budget": float(b)},
                            overwrite=True)  # fmt: skip
                macs = count_macs(m, x)
                row.update(info_p)
                row.update(macs_ratio=macs / macs_base, macs_removed=1 - macs / macs_base,
                           params_ratio=count_params(m) / params_base, prune_time_s=time.perf_counter() - t,
                           model_file=str(mfile.relative_to(args.cache)))  # fmt: skip
                _add(csv_path, row, done)


# -------------------------------------------------------------------------------------------- latency


def phase_latency(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    csv_path = args.out / "depth.csv"
    rows = read_rows(csv_path, COLUMNS)
    repeats = 3 if args.quick else args.repeats
    print(f"[latency] {len(rows)} rows, {args.threads} thread(s), {repeats} repeats, load {os.getloadavg()}",
          flush=True)  # fmt: skip
    builders = nets3d()
    n = 0
    for r in rows:
        if (r["speedup_measured"] and not args.force) or not r["model_file"]:
            continue
        if args.quick and n >= args.quick:
            break
        mfile = args.cache / r["model_file"]
        if not mfile.exists():
            print(f"[skip] {' '.join(row_key(r))}: no saved model {mfile}")
            continue
        if r["dataset"] in DATASETS:
            x, build = TASKS[r["dataset"]].example_input(), TASKS[r["dataset"]].fresh_model
        else:
            build, shape = builders[r["dataset"]]
            x = torch.randn(*shape)
        torch.manual_seed(0)
        base = build().eval()  # the base's weights do not change its latency: the same architecture is timed
        pruned = load_pruned(mfile, build()).eval()
        tb, tp = latency_pair(base, pruned, x, repeats=repeats)
        r.update(
            latency_base_ms=tb, latency_pruned_ms=tp, speedup_measured=tb / tp, latency_threads=args.threads
        )
        n += 1
        print(f"[latency] {' '.join(row_key(r))}: {tb:.2f} -> {tp:.2f} ms (x{tb / tp:.2f}, MACs x"
              f"{_float(r['macs_ratio']):.3f})", flush=True)  # fmt: skip
        if not args.quick:
            write_rows(csv_path, rows, COLUMNS)  # row by row: an interrupted run keeps what it measured
    if args.quick:
        print(f"[latency] --quick: {n} row(s) timed, nothing written")
        return
    info = args.out / "depth_latency_info.json"
    runs = json.loads(info.read_text()) if info.exists() else []
    runs.append({"command": args.command, "threads": args.threads, "repeats": repeats,
                 "ended": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_end": os.getloadavg()})  # fmt: skip
    info.write_text(json.dumps(runs, indent=1))


# --------------------------------------------------------------------------------------------- report


SPEED = {"measured": "speedup_measured", "estimated": "speedup_estimated"}
SPEED_KIND = [
    "estimated"
]  # set by the report: "measured" once every row with an accuracy has a measured speed-up


def _speed(r: dict[str, str]) -> tuple[float, str]:
    """The report's speed-up kind for every row (one kind for all: measured and estimated never mix)."""
    v = _float(r[SPEED[SPEED_KIND[0]]])
    return (v, SPEED_KIND[0]) if math.isfinite(v) and v > 0 else (float("nan"), SPEED_KIND[0])


def acc_at(rows: list[dict], speed: float, col: str) -> tuple[float, str]:
    """ACC at ``speed`` interpolated along the rows' (speed-up, ACC) points (seed-mean per budget);
    outside the points' range: nan with the reason."""
    if rows and all(r["note"].startswith("unreachable") for r in rows):
        return float("nan"), "unreachable"
    by_b: dict[tuple, list] = {}
    for r in rows:
        if _float(r[col]) == _float(r[col]):
            by_b.setdefault((r["budget_kind"], r["budget"]), []).append(r)
    pts = sorted((float(np.mean([_speed(r)[0] for r in v])), _mean(v, col)) for v in by_b.values())
    if not pts:
        return float("nan"), "no rows"
    xs, ys = zip(*pts)
    if speed < xs[0] - 0.05 or speed > xs[-1] + 0.05:
        return float("nan"), f"reached {xs[0]:.2f}-{xs[-1]:.2f}x"
    return float(np.interp(speed, xs, ys)), ""


def verdict(rows: list[dict], datasets: list[str], methods: list[str], speed: float) -> tuple[str, dict]:
    lines = [f"| dataset | method | stage | width-only ACC at {speed:g}x | depth+width ACC | depth-only ACC | "
             "both - width (pt) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    data: dict[str, Any] = {"speed": speed, "datasets": {}}
    wins = {"acc_pruned": 0, "acc_finetuned": 0}
    kinds = set()
    for d in datasets:
        for col, stage in (("acc_pruned", "no ft"), ("acc_finetuned", "fine-tuned")):
            diffs = []
            for m in methods:
                sel = {mode: [r for r in rows if r["dataset"] == d and r["method"] == m and r["mode"] == mode
                              and r["budget_kind"] == "latency"] for mode in MODES}  # fmt: skip
                kinds |= {_speed(r)[1] for v in sel.values() for r in v if r["acc_pruned"]}
                acc = {mode: acc_at(v, speed, col) for mode, v in sel.items()}
                diff = acc["both"][0] - acc["width"][0]
                if math.isfinite(diff):
                    diffs.append(diff)
                cell = lambda a: f"{a[0]:.3f}" if math.isfinite(a[0]) else f"- ({a[1]})"  # noqa: E731
                lines.append(f"| {d} | {m} | {stage} | {cell(acc['width'])} | {cell(acc['both'])} | "
                             f"{cell(acc['depth'])} | {_cell(100 * diff, '+.1f')} |")  # fmt: skip
            mean = float(np.mean(diffs)) if diffs else float("nan")
            data["datasets"].setdefault(d, {})[col] = {"mean_diff": mean, "methods": len(diffs),
                                                       "methods_both_higher": int(sum(x > 0 for x in diffs))}  # fmt: skip
            wins[col] += int(mean > 0)
    measured = kinds == {"measured"}
    ok = all(v >= 2 for v in wins.values()) and len(datasets) >= 3
    met = ok and measured
    data.update(wins=wins, met=met, on_estimate=ok, speed_from=sorted(kinds))
    lines += ["", f"Datasets where depth+width beats width-only (mean over the criteria both modes reached, ACC "
              f"interpolated at {speed:g}x): no fine-tune {wins['acc_pruned']} of {len(datasets)}, fine-tuned "
              f"{wins['acc_finetuned']} of {len(datasets)} (speed-ups: {', '.join(sorted(kinds)) or 'none'}). "
              + (f"**Goal {'met' if met else 'not met'}.**" if measured else
                 f"**Goal not evaluable yet**: the speed-ups are latency-table estimates, not measured (run the latency "
                 f"phase on a quiet machine); on the estimate it would be {'met' if ok else 'not met'}.")]  # fmt: skip
    return "\n".join(lines), data


ATTRIBUTION = ("lrp", "ig", "dlb")
MACS_GOAL = (0.85, 0.9)  # issue #17 goal (b): <= 0.5 pt mean test-ACC drop after the short fine-tune


def equal_macs(rows: list[dict], datasets: list[str], methods: list[str]) -> tuple[str, dict]:
    """Depth + width vs width-only at 85 / 90 % of MACs removed (issue #17, goal (b)), seed means.

    The attribution configuration (criterion x mode) is chosen on mean VALIDATION ACC after the fine-tune over
    datasets, both budgets and seeds, as ``budget.py`` chooses its (b) configuration; the test split never enters.
    """
    sel = {(r["dataset"], r["method"], r["mode"], round(float(r["budget"]), 2)): [] for r in rows}
    for r in rows:
        if r["budget_kind"] == "macs" and r["mode"] in ("width", "both") and r["acc_finetuned"]:
            sel[(r["dataset"], r["method"], r["mode"], round(float(r["budget"]), 2))].append(r)
    lines = ["| dataset | method | MACs removed (requested / reached) | mode | seeds | ACC base | ACC no ft | "
             "ACC fine-tuned | drop after ft (pt) | speed-up measured | val ACC fine-tuned |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    configs: dict[tuple[str, str], list[float]] = {}
    for d in datasets:
        for m in methods:
            for b in MACS_GOAL:
                for mode in ("width", "both"):
                    v = sel.get((d, m, mode, b), [])
                    if not v:
                        continue
                    drop = 100 * (_mean(v, "acc_base") - _mean(v, "acc_finetuned"))
                    lines.append(
                        f"| {d} | {m} | {b:.0%} / {_mean(v, 'macs_removed'):.3f} | {mode} | {len(v)} | "
                        f"{_mean(v, 'acc_base'):.3f} | {_mean(v, 'acc_pruned'):.3f} | {_mean(v, 'acc_finetuned'):.3f} | "
                        f"{drop:+.1f} | {_cell(_mean(v, 'speedup_measured'), '.2f')} | {_mean(v, 'val_acc_finetuned'):.3f} |"
                    )  # fmt: skip
                    if m in ATTRIBUTION:
                        configs.setdefault((m, mode), []).extend(_float(r["val_acc_finetuned"]) for r in v)
    full = {k: v for k, v in configs.items() if len(v) == len(datasets) * len(MACS_GOAL) * 3}
    data: dict[str, Any] = {"budgets": list(MACS_GOAL), "chosen": None, "drops": {}}
    if not full:
        lines += ["", "No attribution configuration has every dataset, budget and 3 seeds yet: no verdict."]
        return "\n".join(lines), data
    m, mode = max(full, key=lambda k: float(np.mean(full[k])))
    drops = {f"{d} {b:.0%}": 100 * (_mean(v, "acc_base") - _mean(v, "acc_finetuned"))
             for d in datasets for b in MACS_GOAL if (v := sel.get((d, m, mode, b)))}  # fmt: skip
    met = all(x <= 0.5 for x in drops.values())
    data.update(chosen=[m, mode], drops=drops, met=met)
    lines += ["", f"Chosen on validation among {', '.join(ATTRIBUTION)} x width / both: **{m} {mode}**; test drops "
              + ", ".join(f"{k} {x:+.1f} pt" for k, x in drops.items())
              + f". **Goal (b) {'met' if met else 'not met'}** by this configuration."]  # fmt: skip
    return "\n".join(lines), data


def _cell(v: float, fmt: str = ".3f") -> str:
    return format(v, fmt) if math.isfinite(v) else "-"


def nets3d_table(rows: list[dict]) -> tuple[str, dict]:
    order = {n: i for i, n in enumerate(nets3d())}
    rows = sorted(
        rows, key=lambda r: (order.get(r["dataset"], 99), r["mode"], r["budget_kind"], float(r["budget"]))
    )
    lines = ["| network | mode | budget | blocks removed | MACs kept | MACs speed-up | speed-up est. | speed-up measured | "
             "latency gain / MACs gain | note |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    ratios: dict[str, list[float]] = {}
    for r in rows:
        mr, sm = _float(r["macs_ratio"]), _float(r["speedup_measured"])
        ratio = sm * mr if math.isfinite(sm) and math.isfinite(mr) else float("nan")
        if r["mode"] == "depth" and math.isfinite(ratio):
            ratios.setdefault(r["dataset"], []).append(ratio)
        b = f"{float(r['budget']):g}x" if r["budget_kind"] == "latency" else f"{float(r['budget']):.0%} MACs"
        f = lambda v, fmt=".3f": format(v, fmt) if math.isfinite(v) else "-"  # noqa: E731
        lines.append(f"| {r['dataset']} | {r['mode']} | {b} | {r['blocks_removed'] or '-'} | {f(mr)} | "
                     f"{f(1 / mr if mr else float('nan'), '.2f')} | {f(_float(r['speedup_estimated']), '.2f')} | "
                     f"{f(sm, '.2f')} | {f(ratio, '.2f')} | {r['note'][:120]} |")  # fmt: skip
    data = {n: {"min": min(v), "mean": float(np.mean(v))} for n, v in ratios.items()}
    met = bool(data) and all(v["min"] >= 0.9 for v in data.values())
    lines += ["", "Depth-only latency gain / MACs gain (measured speed-up x MACs kept): "
              + (", ".join(f"{n} min {v['min']:.2f} mean {v['mean']:.2f}" for n, v in data.items()) or "not measured yet")
              + f". **Goal (>= 0.9 on the 3D networks) {'met' if met else 'not met'}"
              + ("" if data else " (no measured rows)") + "**."
              + ("" if met or not data else " Why, per op category (base vs the deepest depth-pruned copy): section "
                 "\"Where depth-pruned 3D networks spend their CPU time\" (`benchmarks/depth_profile.py`).")]  # fmt: skip
    return "\n".join(lines), {"networks": data, "met": met}


def plot(rows: list[dict], datasets: list[str], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    for d in datasets:
        sel = [r for r in rows if r["dataset"] == d and r["acc_pruned"]]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        kinds = set()
        for ax, (stage, col) in zip(axes, (("no fine-tune", "acc_pruned"), ("fine-tuned", "acc_finetuned"))):
            ax.axhline(_mean(sel, "acc_base"), color="k", lw=0.8, ls=":", label="unpruned")
            for i, mode in enumerate(MODES):
                pts: dict[tuple, list] = {}
                for r in sel:
                    if r["mode"] == mode:
                        pts.setdefault((r["budget_kind"], r["budget"], r["method"]), []).append(r)
                xy = []
                for v in pts.values():
                    sp = [_speed(r) for r in v]
                    kinds |= {k for _, k in sp}
                    xy.append((float(np.mean([s for s, _ in sp])), _mean(v, col)))
                if xy:  # one dot per criterion x budget (seed mean), the line through the criteria means
                    ax.scatter(*zip(*xy), color=f"C{i}", s=12, alpha=0.6)
                    line: dict[tuple, list] = {}
                    for (kind, b, _m), v in pts.items():
                        line.setdefault((kind, b), []).extend(v)
                    mean = sorted(
                        (float(np.mean([_speed(r)[0] for r in v])), _mean(v, col)) for v in line.values()
                    )
                    ax.plot(*zip(*mean), "-o", color=f"C{i}", ms=5, label=f"{mode} (mean of criteria)")
            ax.set_title(f"{d}: {stage}")
            ax.set_xlabel(f"CPU speed-up, batch 1 ({'/'.join(sorted(kinds))})")
        axes[0].set_ylabel("test ACC")
        axes[1].legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        f = out / f"depth_{d}.png"
        fig.savefig(f, dpi=90)
        plt.close(fig)
        files.append(f.name)
    return files


def phase_report(args: argparse.Namespace) -> str:
    rows = read_rows(args.out / "depth.csv", COLUMNS)
    if not rows:
        print("no rows")
        return "no rows"
    med = [r for r in rows if r["dataset"] in DATASETS]
    n3d = [r for r in rows if r["dataset"] not in DATASETS]
    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in med)]
    timed = [r for r in med if r["acc_pruned"]]
    SPEED_KIND[0] = (
        "measured" if timed and all(_float(r["speedup_measured"]) > 0 for r in timed) else "estimated"
    )
    methods = [m for m in ALL_METHODS if any(r["method"] == m for r in med)]
    va, da = verdict(med, datasets, methods, args.speed)
    vb, db = nets3d_table(n3d)
    vc, dc = equal_macs(med, datasets, methods)
    files = plot(med, datasets, args.out)
    (args.out / "depth_verdicts.json").write_text(
        json.dumps({"equal_latency": da, "nets3d": db, "equal_macs": dc}, indent=1)
    )
    info = args.out / "depth_run_info.json"
    cmds = [r["command"] for r in (json.loads(info.read_text()) if info.exists() else []) if r["rows_added"]]
    lat = args.out / "depth_latency_info.json"
    lat_runs = json.loads(lat.read_text()) if lat.exists() else []
    seeds = sorted({r["seed"] for r in med})
    missing = [f"{d} s{s}: {n}" for d in datasets for s in seeds
               if (n := sum(r["dataset"] == d and r["seed"] == s for r in med)) < len(methods) * 3 * 3]  # fmt: skip
    unreached = sorted({f"{r['dataset']} {r['mode']} {r['budget_kind']} {float(r['budget']):g}" for r in rows
                        if r["note"].startswith("unreachable")})  # fmt: skip
    md = "\n\n".join([
        "## Depth vs width vs combined pruning (issue #15)",
        f"Rows: `benchmarks/results/depth.csv` ({len(med)} MedMNIST rows, seeds {', '.join(seeds)}; {len(n3d)} 3D-network "
        f"rows), written by `{'`; `'.join(dict.fromkeys('OMP_NUM_THREADS=1 ' + c for c in cmds)) or 'not recorded'}` "
        "(accuracy phase: no timing). Measured speed-ups: "
        + (f"`{lat_runs[-1]['command']}` ({lat_runs[-1]['threads']} thread(s), load at end {lat_runs[-1]['load_end'][0]:.1f})"
           if lat_runs else "**not measured yet** (`python benchmarks/depth.py --phase latency --threads 1` on a quiet "
           "machine); until then the speed-up axis is the latency-table estimate")
        + ". GPU latency: no GPU was lent to this task. Report: `python benchmarks/depth.py --phase report`.",
        "Width = channels (`prune_step`, one-shot, the rows of `budget.csv` where they exist); depth = whole residual "
        "blocks (`block_relevance` with the same criterion -> `prune_depth`, one block per stage kept); both = depth to "
        "half the budget in log space (capped at what whole blocks hold), then width to the total. BatchNorm re-estimated after each step; fine-tune = "
        "the dataset's short fine-tune (budget.py's). Estimated speed-ups come from the base model's per-layer latency "
        "table (layers of removed blocks cost 0 s; their norms / activations stay in the constant overhead, so depth's "
        "estimate is low). Rows per dataset and seed below the full grid: "
        + ("; ".join(missing) or "none") + ". Budgets a mode cannot reach (row with the reachable figure in `note`): "
        + ("; ".join(unreached) or "none") + ".",
        f"### Equal CPU latency ({args.speed:g}x), MedMNIST\n\n" + va,
        "### Equal MACs (85 / 90 % removed), after the short fine-tune: depth + width vs width-only (issue #17, "
        "goal (b))\n\nBoth = every removable block (one per stage kept; depth's half of the budget is more than the "
        "blocks hold), then channels to the total; width rows are `budget.csv`'s one-shot rows. Drop = seed-mean base "
        "ACC minus seed-mean fine-tuned ACC.\n\n" + vc,
        "### 3D networks (untrained, magnitude scores): latency gain vs MACs gain\n\n" + vb,
        "Plots (test ACC vs CPU speed-up per mode): " + ", ".join(f"`benchmarks/results/{f}`" for f in files) + ".",
    ])  # fmt: skip
    (args.out / "depth.md").write_text(md + "\n")
    if args.out.resolve() == RESULTS.resolve():
        from mdsections import update_section

        update_section("depth", md)
    print(md)
    return md


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=("accuracy", "latency", "report"), default="accuracy")
    p.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS, choices=list(DATASETS))
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--macs-budgets", nargs="*", type=float, default=list(MACS_BUDGETS))
    p.add_argument("--speedups", nargs="*", type=float, default=list(SPEEDUPS))
    p.add_argument(
        "--nets3d", action="store_true", help="accuracy phase: the 3D networks of latency_target.py"
    )
    p.add_argument("--nets3d-models", nargs="*", default=None, help="only these 3D networks")
    p.add_argument("--no-reuse-budget", dest="reuse_budget", action="store_false",
                   help="recompute width rows that budget.csv already has")  # fmt: skip
    p.add_argument("--epochs", type=int, default=None, help="override the base training epochs (smoke tests)")
    p.add_argument("--ft-epochs", type=int, default=None)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--quick", type=int, nargs="?", const=4, default=0,
                   help="latency phase: time only N rows, 3 repeats, write nothing (a check that it works)")  # fmt: skip
    p.add_argument("--force", action="store_true")
    p.add_argument("--speed", type=float, default=2.0, help="report: the equal-latency point")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--cache", type=Path, default=None, help="default benchmarks/cache, or OUT/cache for another --out"
    )
    args = p.parse_args(argv)
    if args.cache is None:
        args.cache = CACHE if args.out.resolve() == RESULTS.resolve() else args.out / "cache"
    args.command = "python benchmarks/depth.py " + " ".join(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache.mkdir(parents=True, exist_ok=True)
    {"accuracy": phase_accuracy, "latency": phase_latency, "report": phase_report}[args.phase](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
