"""Recovery after large MACs budgets (issue #17, goal (b)): fine-tune length and feature distillation, summarised.

Reads rows that ``budget.py --phase accuracy`` wrote (one-shot pruning at 85 / 90 % MACs removed, BN
re-calibrated, then the recovery fine-tune) for two studies and writes ``recovery.md`` and ``recovery.png``:

- ``--ftlen CSV``: the same pruning with the plain fine-tune at several lengths (``budget.py --ft-epochs N`` into
  separate ``--out`` folders, rows concatenated; ``ft_epochs`` tells them apart);
- ``--feature CSV``: the fine-tune of each dataset's default length with kept-channel feature distillation from the
  unpruned network (``budget.py --ft-feature 1 3 10``: the weight chosen on validation ACC per row).

Drops are test (and validation) ACC points of the base model minus the fine-tuned pruned model, mean over seeds
(each seed prunes its own base model); the goal is a mean test drop <= 0.5 pt at >= 85 % of MACs removed.

    python benchmarks/recovery.py --ftlen benchmarks/results/budget_ftlen.csv \\
        --feature benchmarks/results/budget_feature.csv
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
DATASETS = ("breastmnist", "pneumoniamnist", "adrenalmnist3d")


def read(path: Path | None) -> list[dict[str, str]]:
    if path is None or not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def drops(rows: list[dict[str, str]]) -> tuple[float, float, int]:
    """Mean test and validation drop (ACC points) of ``rows`` and how many rows (seeds) they are."""
    test = [100 * (float(r["acc_base"]) - float(r["acc_finetuned"])) for r in rows]
    val = [100 * (float(r["val_acc_base"]) - float(r["val_acc_finetuned"])) for r in rows]
    return float(np.mean(test)), float(np.mean(val)), len(rows)


def group(rows: list[dict[str, str]], *keys: str) -> dict[tuple[str, ...], list[dict[str, str]]]:
    out: dict[tuple[str, ...], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def ftlen_table(rows: list[dict[str, str]]) -> list[str]:
    g = group(rows, "dataset", "method", "budget", "ft_epochs")
    epochs = {d: sorted({int(k[3]) for k in g if k[0] == d}) for d in DATASETS}
    lines = [
        "| dataset | method | MACs removed | " + " | ".join(f"length {i + 1}" for i in range(max(map(len, epochs.values()), default=0))) + " |",
        "|---|---|---|" + "---|" * max(map(len, epochs.values()), default=0),
    ]  # fmt: skip
    for d in DATASETS:
        for m in sorted({k[1] for k in g if k[0] == d}, key=lambda m: (m != "lrp", m)):
            for b in sorted({k[2] for k in g if k[0] == d}, key=float):
                cells = []
                for e in epochs[d]:
                    sel = g.get((d, m, b, str(e)))
                    if sel:
                        t, v, n = drops(sel)
                        cells.append(f"{e} ep: **{t:+.1f}** / {v:+.1f}" + ("" if n == 3 else f" ({n} seeds)"))
                lines.append(f"| {d} | {m} | {float(b):.0%} | " + " | ".join(cells) + " |")
    return lines


def feature_table(feature: list[dict[str, str]], plain: list[dict[str, str]]) -> list[str]:
    gf = group(feature, "dataset", "method", "budget")
    gp = group(plain, "dataset", "method", "budget", "ft_epochs")
    lines = [
        "| dataset | method | MACs removed | seeds | plain: test / val drop | feature distillation: test / val drop | "
        "weights chosen on validation |",
        "|---|---|---|---|---|---|---|",
    ]
    for (d, m, b), rows in sorted(
        gf.items(), key=lambda kv: (DATASETS.index(kv[0][0]), kv[0][1] != "lrp", kv[0])
    ):
        t, v, n = drops(rows)
        seeds = {r["seed"] for r in rows}  # the plain rows of the same seeds (base models)
        ref = [r for r in gp.get((d, m, b, rows[0]["ft_epochs"]), []) if r["seed"] in seeds]
        p = f"{drops(ref)[0]:+.1f} / {drops(ref)[1]:+.1f}" if ref else "n/a"
        weights = ", ".join(
            f"{float(r['ft_feature_weight']):g}" for r in sorted(rows, key=lambda r: r["seed"])
        )
        lines.append(f"| {d} | {m} | {float(b):.0%} | {n} | {p} | **{t:+.1f}** / {v:+.1f} | {weights} |")
    return lines


def plot(ftlen: list[dict[str, str]], feature: list[dict[str, str]], out: Path) -> Path | None:
    if not ftlen:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DATASETS), figsize=(4.4 * len(DATASETS), 3.4), squeeze=False)
    g = group(ftlen, "dataset", "method", "budget", "ft_epochs")
    gf = group(feature, "dataset", "method", "budget")
    for ax, d in zip(axes[0], DATASETS):
        for (m, b), style in {("lrp", "0.85"): "C0-o", ("lrp", "0.9"): "C0--o", ("taylor", "0.85"): "C1-s",
                              ("taylor", "0.9"): "C1--s"}.items():  # fmt: skip
            pts = sorted((int(k[3]), drops(v)[0]) for k, v in g.items() if k[:3] == (d, m, b))
            if pts:
                ax.plot(*zip(*pts), style, ms=4, label=f"{m} {float(b):.0%} plain")
            if (d, m, b) in gf:
                e = int(gf[(d, m, b)][0]["ft_epochs"])
                ax.plot(e, drops(gf[(d, m, b)])[0], style[:2] + "*", ms=11, mec="k",
                        label=f"{m} {float(b):.0%} + features")  # fmt: skip
        ax.axhline(0.5, color="r", lw=0.7)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fine-tune epochs")
        ax.set_title(d, fontsize=9)
    axes[0][0].set_ylabel("test ACC drop (pt), mean of 3 seeds")
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=7, loc="upper right", ncol=4)
    fig.suptitle("recovery at 85 / 90 % MACs removed (red: the 0.5 pt goal)", fontsize=9, x=0.25)
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ftlen", type=Path, default=RESULTS / "budget_ftlen.csv")
    p.add_argument("--feature", type=Path, default=RESULTS / "budget_feature.csv")
    p.add_argument("--md", type=Path, default=RESULTS / "recovery.md")
    args = p.parse_args(argv)
    ftlen, feature = read(args.ftlen), read(args.feature)
    if not ftlen and not feature:
        raise SystemExit(f"neither {args.ftlen} nor {args.feature} has rows")
    command = "python benchmarks/recovery.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"Command: `{command.strip()}`", ""]
    if ftlen:
        lines += [
            "Fine-tune length (plain fine-tune; cells: epochs: **test drop** / validation drop, ACC points, mean of "
            "the seeds; the first length is each dataset's default):",
            "",
            *ftlen_table(ftlen),
            "",
        ]
    if feature:
        lines += [
            "Kept-channel feature distillation in the fine-tune of the default length (plain: the first length above):",
            "",
            *feature_table(feature, ftlen),
            "",
        ]
    png = plot(ftlen, feature, args.md.with_name("recovery.png"))
    if png is not None:
        lines.append(f"Plot: `benchmarks/results/{png.name}`.")
    args.md.write_text("\n".join(lines) + "\n")
    print(args.md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
