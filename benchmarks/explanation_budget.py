"""Explanation budget on MedMNIST (issue #16, deliverable 2): how much compute ``prune_to_min_agreement`` removes
while the explanations stay above ``min_agreement`` on validation images, and what that choice keeps on held-out
test images.

For each dataset and seed: the seed's own base model (``budget.py``'s, cached under ``--cache``), channel
relevance (``--method``, default LRP) on the seed's calibration subset (256 training images), then
``report.prune_to_min_agreement(target="macs")`` over the MACs budgets 0.9, 0.8, ..., 0.1 (largest first) with
agreement measured by ``--explainers`` on the first ``--val`` validation images, BatchNorm re-estimated on the
calibration subset, no fine-tune. The chosen network is then checked on the first ``--test`` TEST images, which the
choice never saw: median Spearman and top-10 % IoU of its maps against the unpruned network's (95 % bootstrap CIs
over the images), and test ACC of both networks. When no budget reaches the threshold the row says so (``ratio``
0, ``note``).

    python benchmarks/explanation_budget.py                      # all datasets, seeds 0 1 2, LRP and IG, 0.8 / 0.9
    python benchmarks/explanation_budget.py --report             # tables and plot from the CSV only

Writes ``OUT/explanation_budget.csv`` (rows already there are skipped: an interrupted run resumes),
``OUT/explanation_budget.md`` and ``OUT/explanation_budget.png`` (validation agreement against MACs removed, per
dataset and explainer, with the thresholds).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from budget import TASKS  # noqa: E402
from run import CACHE, RESULTS  # noqa: E402

from monai_iaprune import channel_relevance  # noqa: E402
from monai_iaprune.pruning import count_macs  # noqa: E402
from monai_iaprune.report import AgreementNotReached, prune_to_min_agreement  # noqa: E402
from monai_iaprune.report.explanations import (  # noqa: E402
    agreement_from_maps,
    attribution_maps,
    explained_selection,
)

DATASETS = ("breastmnist", "pneumoniamnist", "adrenalmnist3d")
RATIOS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
COLUMNS = [
    "dataset", "seed", "method", "ranking", "explainer", "min_agreement", "ratio", "macs_removed", "val_spearman",
    "val_images", "test_spearman", "test_spearman_ci_lo", "test_spearman_ci_hi", "test_iou10", "test_iou10_ci_lo",
    "test_iou10_ci_hi", "test_images", "acc_base", "acc_pruned", "tried", "time_s", "note",
]  # fmt: skip


def read_rows(path: Path) -> list[dict[str, str]]:
    """The CSV's rows; rows written before the ``ranking`` column were cost-aware (the only ranking then)."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{**r, "ranking": r.get("ranking") or "cost"} for r in csv.DictReader(f)]


def append_row(path: Path, row: dict) -> None:
    if path.is_file():
        with path.open(newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:  # an older CSV: rewrite it with today's columns first, nothing dropped
            old = read_rows(path)
            with path.open("w", newline="") as f:
                w = csv.DictWriter(f, COLUMNS)
                w.writeheader()
                w.writerows({k: r.get(k, "") for k in COLUMNS} for r in old)
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        if new:
            w.writeheader()
        w.writerow(row)


def test_agreement(
    base: torch.nn.Module, pruned: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, explainer: str
):
    """Agreement of ``pruned``'s maps with ``base``'s on held-out images (both explain the base's selection)."""
    base.eval(), pruned.eval()
    selection = explained_selection(base, x, y, "label")
    return agreement_from_maps(
        attribution_maps(base, x, explainer, selection=selection),
        attribution_maps(pruned, x, explainer, selection=selection),
    )


def run_rows(args: argparse.Namespace, csv_path: Path) -> None:
    done = {
        (r["dataset"], r["seed"], r["ranking"], r["explainer"], r["min_agreement"])
        for r in read_rows(csv_path)
    }
    for name in args.datasets:
        task = TASKS[name]
        if not task.data_path().exists():
            print(f"[skip] {name}: {task.data_path()} not present")
            continue
        data = task.load(args.limit)
        x1 = task.example_input()
        xv, yv = (t[: args.val] for t in data["val"])
        xt, yt = (t[: args.test] for t in data["test"])
        for seed in args.seeds:
            todo = [
                (k, e, t)
                for k in args.rankings
                for e in args.explainers
                for t in args.thresholds
                if (name, str(seed), k, e, f"{t:g}") not in done
            ]
            if not todo:
                continue
            model, _ = task.base_model(data, args.cache, args.epochs, seed)
            model.eval()
            acc_base = task.metrics(data["test"][1], task.predict(model, data["test"][0]))[0]
            cal = task.calibration(data, args.calib, seed)
            relevance = channel_relevance(model, cal, args.method, progress=False)
            macs_base = count_macs(model, x1)
            for ranking, explainer, threshold in todo:
                t0 = time.perf_counter()
                row = {"dataset": name, "seed": seed, "method": args.method, "ranking": ranking, "explainer": explainer,
                       "min_agreement": f"{threshold:g}", "val_images": len(xv), "test_images": len(xt),
                       "acc_base": acc_base}  # fmt: skip
                try:
                    chosen = prune_to_min_agreement(
                        model, relevance, (xv, yv), min_agreement=threshold, explainer=explainer, ratios=RATIOS,
                        target="macs", calibration_data=cal, example_inputs=x1, max_samples=None,
                        cost_aware=ranking == "cost",
                    )  # fmt: skip
                except AgreementNotReached as e:
                    row.update(ratio=0.0, macs_removed=0.0, note=str(e))
                    row["tried"] = json.dumps([[r, round(a, 4)] for r, a in e.tried])
                    append_row(csv_path, {**row, "time_s": time.perf_counter() - t0})
                    print(
                        f"[row] {name} s{seed} {ranking} {explainer} >= {threshold:g}: not reached",
                        flush=True,
                    )
                    continue
                pruned = chosen.model.eval()
                agree = test_agreement(model, pruned, xt, yt, explainer)
                row.update(
                    ratio=chosen.ratio,
                    macs_removed=1 - count_macs(pruned, x1) / macs_base,
                    val_spearman=chosen.agreement,
                    test_spearman=agree["spearman_median"],
                    test_spearman_ci_lo=agree["spearman_ci"][0],
                    test_spearman_ci_hi=agree["spearman_ci"][1],
                    test_iou10=agree["top10_iou_median"],
                    test_iou10_ci_lo=agree["top10_iou_ci"][0],
                    test_iou10_ci_hi=agree["top10_iou_ci"][1],
                    acc_pruned=task.metrics(data["test"][1], task.predict(pruned, data["test"][0]))[0],
                    tried=json.dumps([[r, round(a, 4)] for r, a in chosen.tried]),
                    note="",
                )
                append_row(csv_path, {**row, "time_s": time.perf_counter() - t0})
                print(
                    f"[row] {name} s{seed} {ranking} {explainer} >= {threshold:g}: MACs removed {row['macs_removed']:.2f} "
                    f"(ratio {chosen.ratio}), val {chosen.agreement:.3f} -> test {row['test_spearman']:.3f} "
                    f"IoU {row['test_iou10']:.3f}, ACC {acc_base:.3f} -> {row['acc_pruned']:.3f}",
                    flush=True,
                )


def _f(v: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def either_rows(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """What ``prune_to_min_agreement(cost_aware="either")`` picks, from the cost and raw rows of each seed: both
    rankings are tried at every budget, largest first, so it returns the larger validation-chosen budget of the two
    (the higher validation agreement at an equal budget), with that row's test check; not reached when neither is."""
    pairs: dict[tuple[str, ...], dict[str, dict[str, str]]] = defaultdict(dict)
    for r in rows:
        pairs[(r["dataset"], r["seed"], r["method"], r["explainer"], r["min_agreement"])][r["ranking"]] = r
    out = []
    for p in pairs.values():
        if {"cost", "raw"} <= set(p):
            best = max((p["cost"], p["raw"]), key=lambda r: (_f(r["ratio"]), _f(r["val_spearman"]) or -2.0))
            out.append({**best, "ranking": "either"})
    return out


def report(rows: list[dict[str, str]], out: Path, command: str) -> str:
    groups: dict[tuple[str, str, str], list[dict[str, str]]] = defaultdict(list)
    for r in rows + either_rows(rows):
        groups[(r["dataset"], r["ranking"], r["explainer"], r["min_agreement"])].append(r)
    order = {d: i for i, d in enumerate(DATASETS)}
    lines = [
        f"Command: `{command}` (relevance: {', '.join(sorted({r['method'] for r in rows}))}; no fine-tune, BatchNorm "
        "re-estimated; agreement on validation chooses, test images check)",
        "",
        "| dataset | ranking | explainer | min_agreement | seeds | MACs removed (per seed) | val Spearman | **test "
        "Spearman** [95% CI] | test top-10 % IoU | test below the threshold | ACC base -> pruned |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (d, k, e, t), rs in sorted(
        groups.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][2], float(kv[0][3]), kv[0][1])
    ):
        rs = sorted(rs, key=lambda r: int(r["seed"]))
        reached = [r for r in rs if _f(r["ratio"]) > 0]
        per_seed = ", ".join(f"{_f(r['macs_removed']):.0%}" if _f(r["ratio"]) > 0 else "none" for r in rs)
        if reached:
            ts = [_f(r["test_spearman"]) for r in reached]
            ci = (np.mean([_f(r["test_spearman_ci_lo"]) for r in reached]),
                  np.mean([_f(r["test_spearman_ci_hi"]) for r in reached]))  # fmt: skip
            below = sum(v < float(t) for v in ts)
            cells = (
                f"{np.mean([_f(r['val_spearman']) for r in reached]):.3f} | **{np.mean(ts):.3f}** "
                f"[{ci[0]:.2f}, {ci[1]:.2f}] | {np.mean([_f(r['test_iou10']) for r in reached]):.3f} | "
                f"{below} of {len(reached)} | {np.mean([_f(r['acc_base']) for r in reached]):.3f} -> "
                f"{np.mean([_f(r['acc_pruned']) for r in reached]):.3f}"
            )
        else:
            cells = "- | - | - | - | -"
        lines.append(f"| {d} | {k} | {e} | {t} | {len(rs)} | {per_seed} | {cells} |")
    lines += [
        "",
        "Means over the seeds that reached the threshold; CI: mean of the per-seed 95 % bootstrap intervals of the "
        "test median. MACs removed: the budget chosen on validation, measured on the pruned network. Ranking: `cost` = "
        "relevance per unit of MACs saved (`prune(cost_aware=True)`, the default for a MACs budget), `raw` = relevance "
        "alone (`cost_aware=False`), both filling the same MACs budget; `either` = what `prune_to_min_agreement("
        'cost_aware="either")` (the bundles\' default when `cost_aware` is unset) picks: of the two, the larger '
        "budget on validation, derived from the cost and raw rows of each seed.",
    ]
    png = plot(rows, out.with_suffix(".png"))
    if png is not None:
        lines.append(f"Plot: `benchmarks/results/{png.name}` (validation agreement of every budget tried).")
    text = "\n".join(lines) + "\n"
    out.write_text(text)
    return text


def plot(rows: list[dict[str, str]], path: Path) -> Path | None:
    tried = [r for r in rows if r["tried"]]
    if not tried:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in tried)]
    explainers = sorted({r["explainer"] for r in tried})
    fig, axes = plt.subplots(
        len(explainers), len(datasets), figsize=(3.8 * len(datasets), 3.0 * len(explainers)), squeeze=False
    )
    for i, e in enumerate(explainers):
        for j, d in enumerate(datasets):
            ax = axes[i][j]
            for k, seed in enumerate(sorted({r["seed"] for r in tried if r["dataset"] == d})):
                for ranking, style in (("cost", "o-"), ("raw", "s--")):
                    curve: dict[float, float] = {}
                    for r in tried:
                        if (r["dataset"], r["explainer"], r["seed"], r["ranking"]) == (d, e, seed, ranking):
                            curve.update({float(a): float(b) for a, b in json.loads(r["tried"])})
                    if curve:
                        xs = sorted(curve)
                        ax.plot(xs, [curve[x] for x in xs], style, ms=3, color=f"C{k}",
                                label=f"seed {seed} {ranking}")  # fmt: skip
            for t in sorted({float(r["min_agreement"]) for r in rows}):
                ax.axhline(t, color="r", lw=0.6, ls="--")
            ax.set_title(f"{d}, {e}", fontsize=9)
            ax.set_xlabel("pruning ratio (MACs removed)", fontsize=8)
            ax.set_ylabel("val median Spearman", fontsize=8)
            ax.legend(fontsize=6)
    fig.suptitle(
        "explanation budget: agreement of each budget tried (largest first; red: thresholds)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--method", default="lrp", help="channel relevance that orders the pruning")
    p.add_argument(
        "--rankings",
        nargs="+",
        default=["cost"],
        choices=["cost", "raw"],
        help="how channels are ranked for the MACs budget: relevance per MACs saved (cost) or relevance alone (raw)",
    )
    p.add_argument(
        "--explainers", nargs="+", default=["lrp", "ig"], help="agreement measured with these maps"
    )
    p.add_argument("--thresholds", nargs="+", type=float, default=[0.8, 0.9], help="min_agreement values")
    p.add_argument("--val", type=int, default=64, help="validation images that choose the budget")
    p.add_argument("--test", type=int, default=128, help="held-out test images that check it")
    p.add_argument("--calib", type=int, default=256, help="calibration images (relevance, BatchNorm)")
    p.add_argument("--epochs", type=int, default=None, help="override the base training epochs (smoke tests)")
    p.add_argument("--limit", type=int, default=None, help="first N images of each split (smoke tests)")
    p.add_argument("--report", action="store_true", help="only the tables and plot from the CSV")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--cache", type=Path, default=None, help="default benchmarks/cache, or OUT/cache for another --out"
    )
    args = p.parse_args(argv)
    for t in args.thresholds:
        if not 0 < t <= 1 or math.isnan(t):
            p.error(f"--thresholds: each min_agreement must lie in (0, 1], got {t}")
    if args.cache is None:
        args.cache = CACHE if args.out.resolve() == RESULTS.resolve() else args.out / "cache"
    args.command = "python benchmarks/explanation_budget.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "explanation_budget.csv"
    if not args.report:
        torch.set_num_threads(1)
        run_rows(args, csv_path)
    rows = read_rows(csv_path)
    if not rows:
        raise SystemExit(f"no rows in {csv_path}")
    print(report(rows, args.out / "explanation_budget.md", args.command.strip()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
