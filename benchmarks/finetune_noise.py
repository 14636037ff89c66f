"""How precisely goal (b) of issue #17 can be measured: the short fine-tune's own run-to-run spread.

Goal (b) asks for a mean test-ACC drop <= 0.5 pt at >= 85 % of MACs removed after the short fine-tune (3 seeds,
each pruning its own base model). This study repeats that fine-tune with several fine-tune seeds (the order of the
batches and the augmentation; the pruned weights are the same) and also fine-tunes the UNPRUNED base model the same
way, so the drops of ``budget.csv`` can be read against:

- the drop of the unpruned network under the same fine-tune (what the fine-tune alone does to test ACC);
- the spread of the 3-seed mean drop over fine-tune seeds (how much one run of the goal's figure can move).

Pruning is ``budget.py``'s one-shot row (``prune_step(target="macs")``, the seed's calibration subset, BN
re-estimated), so fine-tune seed 0 (the run seed itself) reproduces ``budget.csv``'s ``acc_finetuned``: a check
printed at the end. Accuracy only, nothing timed (safe beside other jobs at one thread each).

    OMP_NUM_THREADS=1 python benchmarks/finetune_noise.py --datasets breastmnist pneumoniamnist adrenalmnist3d
    python benchmarks/finetune_noise.py --phase report

Rows: ``OUT/finetune_noise.csv`` (resumes: rows already there are skipped); report: ``OUT/finetune_noise.md`` and
``OUT/finetune_noise.png``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from budget import TASKS, append_row, read_rows  # noqa: E402
from run import CACHE, RESULTS  # noqa: E402

from monai_iaprune.pruning import count_macs, prune_step  # noqa: E402

COLUMNS = [
    "dataset", "seed", "arm", "method", "budget", "ft_seed", "ft_epochs", "acc_base", "acc_pruned", "acc_finetuned",
    "val_acc_base", "val_acc_finetuned", "best_epoch", "macs_removed",
]  # fmt: skip
FT_SEED_STRIDE = (
    1000  # fine-tune seed k of run seed s trains with s + 1000 k (k = 0: budget.py's own fine-tune)
)
GOAL_PT = 0.5


def key(r: dict) -> tuple[str, ...]:
    return (r["dataset"], str(r["seed"]), r["arm"], f"{float(r['budget']):.2f}", str(r["ft_seed"]))


def phase_accuracy(args: argparse.Namespace) -> None:
    csv_path = args.out / "finetune_noise.csv"
    done = {key(r) for r in read_rows(csv_path, COLUMNS)}
    arms = [("unpruned", 0.0)] + [(args.method, b) for b in args.budgets]
    for name in args.datasets:
        task = TASKS[name]
        if not task.data_path().exists():
            print(f"[skip] {name}: {task.data_path()} not present")
            continue
        data = task.load(None)
        x1 = task.example_input()
        for seed in args.seeds:
            todo = [(a, b, k) for a, b in arms for k in range(args.ft_seeds)]
            todo = [t for t in todo if (name, str(seed), t[0], f"{t[1]:.2f}", str(t[2])) not in done]
            if not todo:
                continue
            model, _ = task.base_model(data, args.cache, None, seed)
            model.eval()
            acc_base = task.metrics(data["test"][1], task.predict(model, data["test"][0]))[0]
            val_base = task.metrics(data["val"][1], task.predict(model, data["val"][0]))[0]
            macs_base = count_macs(model, x1)
            cal = task.calibration(data, task.default_calib, seed)
            pruned: dict[tuple[str, float], object] = {}
            for arm, b, k in todo:
                if (arm, b) not in pruned:
                    m = copy.deepcopy(model)
                    if arm != "unpruned":
                        prune_step(m, cal, arm, b, example_inputs=x1, target="macs")
                    pruned[(arm, b)] = m
                m = copy.deepcopy(pruned[(arm, b)])
                acc_pr = task.metrics(data["test"][1], task.predict(m, data["test"][0]))[0]
                hist = task.finetune(m, data, task.ft_epochs, seed + FT_SEED_STRIDE * k)
                acc_ft = task.metrics(data["test"][1], task.predict(m, data["test"][0]))[0]
                val_ft = task.metrics(data["val"][1], task.predict(m, data["val"][0]))[0]
                row = {
                    "dataset": name, "seed": seed, "arm": arm, "method": "" if arm == "unpruned" else arm,
                    "budget": b, "ft_seed": k, "ft_epochs": task.ft_epochs, "acc_base": acc_base,
                    "acc_pruned": acc_pr, "acc_finetuned": acc_ft, "val_acc_base": val_base,
                    "val_acc_finetuned": val_ft, "best_epoch": hist.get("best_epoch", ""),
                    "macs_removed": 1 - count_macs(m, x1) / macs_base,
                }  # fmt: skip
                append_row(csv_path, row, COLUMNS)
                done.add(key(row))
                print(
                    f"[row] {name} s{seed} {arm} {b:.2f} ft-seed {k}: ACC {acc_base:.3f} -> {acc_pr:.3f} -> ft "
                    f"{acc_ft:.3f} (best epoch {row['best_epoch']})",
                    flush=True,
                )


def summarise(rows: list[dict]) -> dict[tuple[str, str, str], dict]:
    """Per (dataset, arm, budget): the 3-seed mean test drop for every fine-tune seed, and their mean / SD."""
    by: dict[tuple[str, str, str], dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        drop = 100 * (float(r["acc_base"]) - float(r["acc_finetuned"]))
        by[(r["dataset"], r["arm"], f"{float(r['budget']):.2f}")][int(r["ft_seed"])].append(drop)
    picks = chosen_on_validation(rows)
    out = {}
    for k, per_ft in by.items():
        n_seeds = max(len(v) for v in per_ft.values())
        means = [float(np.mean(v)) for _, v in sorted(per_ft.items()) if len(v) == n_seeds]
        seeds_sd = [float(np.std(v, ddof=1)) for v in per_ft.values() if len(v) > 1]
        out[k] = {
            "seeds": n_seeds, "ft_seeds": len(means), "means": means, "mean": float(np.mean(means)),
            "sd": float(np.std(means, ddof=1)) if len(means) > 1 else float("nan"),
            "seed_sd": float(np.mean(seeds_sd)) if seeds_sd else float("nan"),
            "met": sum(m <= GOAL_PT for m in means),
            "chosen": float(np.mean(picks[k])), "chosen_seeds": len(picks[k]),
        }  # fmt: skip
    return out


def chosen_on_validation(rows: list[dict]) -> dict[tuple[str, str, str], list[float]]:
    """Per (dataset, arm, budget): for every run seed, the test drop of its fine-tune with the highest VALIDATION ACC
    among the fine-tune seeds (ties: the lowest fine-tune seed): restarts of the short fine-tune, the test split
    never looked at."""
    best: dict[tuple[str, str, str, str], tuple[float, int, float]] = {}
    for r in rows:
        k = (r["dataset"], r["arm"], f"{float(r['budget']):.2f}", str(r["seed"]))
        cand = (
            float(r["val_acc_finetuned"]),
            -int(r["ft_seed"]),
            100 * (float(r["acc_base"]) - float(r["acc_finetuned"])),
        )
        if k not in best or cand[:2] > best[k][:2]:
            best[k] = cand
    out: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for (d, arm, b, _), (_, _, drop) in sorted(best.items()):
        out[(d, arm, b)].append(drop)
    return out


def check_budget_rows(rows: list[dict], budget_csv: Path) -> str:
    """Fine-tune seed 0 against ``budget.csv``'s one-shot rows of the same dataset / method / budget / seed."""
    ref = {
        (r["dataset"], r["method"], f"{float(r['budget']):.2f}", r["seed"]): float(r["acc_finetuned"])
        for r in read_rows(budget_csv)
        if r["schedule"] == "oneshot" and r["budget_kind"] == "macs"
    }
    pairs = [
        (float(r["acc_finetuned"]), ref[k])
        for r in rows
        if r["arm"] != "unpruned" and r["ft_seed"] == "0"
        and (k := (r["dataset"], r["arm"], f"{float(r['budget']):.2f}", r["seed"])) in ref
    ]  # fmt: skip
    if not pairs:
        return "no fine-tune seed 0 row has a budget.csv row to compare with"
    worst = max(abs(a - b) for a, b in pairs)
    return f"fine-tune seed 0 vs budget.csv acc_finetuned: {len(pairs)} rows, largest difference {worst:.4f}"


def plot(summary: dict, datasets: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), squeeze=False)
    for ax, d in zip(axes[0], datasets, strict=True):
        keys = sorted((k for k in summary if k[0] == d), key=lambda k: float(k[2]))
        for i, k in enumerate(keys):
            s = summary[k]
            ax.scatter([i] * len(s["means"]), s["means"], color="C0", alpha=0.7)
            ax.errorbar(i + 0.15, s["mean"], yerr=s["sd"], fmt="o", color="C3", capsize=4)
        ax.axhline(GOAL_PT, color="k", ls="--", lw=1, label=f"goal (b): drop <= {GOAL_PT} pt")
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(["unpruned" if k[1] == "unpruned" else f"{k[1]} {float(k[2]):.0%}" for k in keys])
        ax.set_title(d)
        ax.set_ylabel("3-seed mean test drop (pt)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Short fine-tune repeated with other fine-tune seeds (blue: one per seed; red: mean +- SD)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def shown(path: Path) -> str:
    """``path`` relative to the repository root where it lies inside it (as the commands are given)."""
    try:
        return str(path.resolve().relative_to(HERE.parent))
    except ValueError:
        return str(path)


def phase_report(args: argparse.Namespace) -> str:
    rows = read_rows(args.out / "finetune_noise.csv", COLUMNS)
    if not rows:
        raise SystemExit(f"no rows in {args.out / 'finetune_noise.csv'}; run --phase accuracy first")
    summary = summarise(rows)
    datasets = [d for d in TASKS if any(k[0] == d for k in summary)]
    plot(summary, datasets, args.out / "finetune_noise.png")
    lines = [
        "Command: `OMP_NUM_THREADS=1 python benchmarks/finetune_noise.py --datasets "
        f"{' '.join(datasets)}` (accuracy only, nothing timed); report: "
        "`python benchmarks/finetune_noise.py --phase report`.",
        "",
        "Each cell is over the fine-tune seeds: the goal's figure (test drop, mean over the run seeds, each with its "
        "own base model) once per fine-tune seed. SD = standard deviation of that figure over fine-tune seeds; "
        "seed SD = the spread over run seeds of one fine-tune seed's drops (mean over fine-tune seeds). Best of the "
        "fine-tune seeds on validation = for each run seed the fine-tune with the highest validation ACC (restarts of "
        "the short fine-tune, chosen without the test split), its test drop, mean over run seeds.",
        "",
        "| dataset | arm | MACs removed | run seeds | fine-tune seeds | drop per fine-tune seed (pt) | mean (pt) | "
        f"SD (pt) | seed SD (pt) | fine-tune seeds with drop <= {GOAL_PT} pt | best of the fine-tune seeds on "
        "validation: test drop (pt) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in datasets:
        for k in sorted((k for k in summary if k[0] == d), key=lambda k: float(k[2])):
            s = summary[k]
            lines.append(
                f"| {d} | {k[1]} | {float(k[2]):.0%} | {s['seeds']} | {s['ft_seeds']} | "
                f"{' / '.join(f'{m:+.1f}' for m in s['means'])} | {s['mean']:+.2f} | {s['sd']:.2f} | "
                f"{s['seed_sd']:.2f} | {s['met']} of {s['ft_seeds']} | {s['chosen']:+.2f} |"
            )
    lines += [
        "",
        check_budget_rows(rows, args.budget_csv) + ".",
        "",
        f"Plot: `{shown(args.out / 'finetune_noise.png')}`.",
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "finetune_noise.md").write_text(text)
    print(text)
    return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", choices=("accuracy", "report"), default="accuracy")
    p.add_argument("--datasets", nargs="+", default=["breastmnist", "pneumoniamnist", "adrenalmnist3d"],
                   choices=sorted(t for t, v in TASKS.items() if v.goal))  # fmt: skip
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--ft-seeds", type=int, default=5, help="fine-tunes per pruned model (seed 0 = budget.py's)"
    )
    p.add_argument("--method", default="lrp")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.85, 0.9], help="fractions of MACs removed")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument(
        "--budget-csv", type=Path, default=RESULTS / "budget.csv", help="rows fine-tune seed 0 must match"
    )
    args = p.parse_args(argv)
    if args.ft_seeds < 1:
        p.error(f"--ft-seeds must be >= 1, got {args.ft_seeds}")
    if any(not 0 < b < 1 for b in args.budgets):
        p.error(f"--budgets are fractions of MACs removed in (0, 1), got {args.budgets}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase == "accuracy":
        phase_accuracy(args)
    phase_report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
