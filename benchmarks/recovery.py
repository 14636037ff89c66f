"""Recovery after large MACs budgets (issue #17, goal (b)): fine-tune length, distillation, gradual pruning.

Reads rows that ``budget.py --phase accuracy`` wrote (one-shot pruning at 85 / 90 % MACs removed, BN
re-calibrated, then the recovery fine-tune) for these studies and writes ``recovery.md`` and ``recovery.png``:

- ``--ftlen CSV``: the same pruning with the plain fine-tune at several lengths (``budget.py --ft-epochs N`` into
  separate ``--out`` folders, rows concatenated; ``ft_epochs`` tells them apart);
- ``--feature CSV``: the fine-tune of each dataset's default length with kept-channel feature distillation from the
  unpruned network (``budget.py --ft-feature 1 3 10``: the weight chosen on validation ACC per row);
- ``--kd CSV``: the same with logit distillation from the unpruned network (``budget.py --ft-kd 0.5 0.9``: the
  alpha chosen on validation ACC per row);
- ``--lr CSV``: the plain fine-tune at peak learning rates 3e-4 / 1e-3 / 3e-3 (``budget.py --ft-lr 3e-4 1e-3 3e-3``,
  the rate chosen on validation);
- ``--feature-kd CSV``: both (``budget.py --ft-feature 1 3 10 --ft-kd 0.9``, the weight chosen on validation);
- ``--raw CSV``: the MACs budget filled by relevance alone (``budget.py --raw-ranking``), plain fine-tune;
- ``--raw-kd CSV``: the same with logit distillation (``budget.py --raw-ranking --ft-kd 0.5 0.9``);
- ``--cap CSV``: the plain fine-tune after pruning with a per-layer cap (``budget.py --max-layer-ratio R`` into
  separate ``--out`` folders, rows concatenated; one study per cap);
- ``--gradual CSV``: gradual pruning, 3 re-scored stages with the same fine-tune length split over them
  (``budget.py --schedules iterative --recover-between``), against the one-shot rows of the plain fine-tune.

Drops are test (and validation) ACC points of the base model minus the fine-tuned pruned model, mean over seeds
(each seed prunes its own base model); the goal is a mean test drop <= 0.5 pt at >= 85 % of MACs removed.

    python benchmarks/recovery.py --ftlen benchmarks/results/budget_ftlen.csv \\
        --feature benchmarks/results/budget_feature.csv --kd benchmarks/results/budget_kd.csv \\
        --feature-kd benchmarks/results/budget_feature_kd.csv --gradual benchmarks/results/budget_gradual.csv \\
        --lr benchmarks/results/budget_ftlr.csv

The last table picks, per dataset and budget, the recovery with the smallest mean VALIDATION drop for LRP (the
attribution configuration of the budget benchmark) among the plain fine-tune of the default length and the variants,
and gives its test drop: the goal's figure with nothing chosen on the test split.
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


def variant_table(
    variant: list[dict[str, str]], plain: list[dict[str, str]], name: str, choice: str | None
) -> list[str]:
    """``variant`` rows against the ``plain`` (one-shot) rows of the same dataset, method, budget, length and seeds;
    ``choice``: the column holding what was chosen on validation per row (None: nothing chosen)."""
    gv = group(variant, "dataset", "method", "budget")
    gp = group(
        [r for r in plain if r.get("schedule", "oneshot") == "oneshot"],
        "dataset",
        "method",
        "budget",
        "ft_epochs",
    )
    lines = [
        f"| dataset | method | MACs removed | seeds | plain: test / val drop | {name}: test / val drop |"
        + (" chosen on validation |" if choice else ""),
        "|---|---|---|---|---|---|" + ("---|" if choice else ""),
    ]
    for (d, m, b), rows in sorted(
        gv.items(), key=lambda kv: (DATASETS.index(kv[0][0]), kv[0][1] != "lrp", kv[0])
    ):
        t, v, n = drops(rows)
        seeds = {r["seed"] for r in rows}  # the plain rows of the same seeds (base models)
        ref = [r for r in gp.get((d, m, b, rows[0]["ft_epochs"]), []) if r["seed"] in seeds]
        p = f"{drops(ref)[0]:+.1f} / {drops(ref)[1]:+.1f}" if ref else "n/a"
        cell = f"| {d} | {m} | {float(b):.0%} | {n} | {p} | **{t:+.1f}** / {v:+.1f} |"
        if choice:
            cell += (
                " " + ", ".join(f"{float(r[choice]):g}" for r in sorted(rows, key=lambda r: r["seed"])) + " |"
            )
        lines.append(cell)
    return lines


def chosen_table(
    plain: list[dict[str, str]], variants: dict[str, list[dict[str, str]]], method: str = "lrp"
) -> list[str]:
    """Per dataset and budget: the recovery with the smallest mean validation drop among the plain fine-tune of the
    default length (each dataset's shortest in ``plain``) and ``variants`` (on the seeds every candidate has)."""
    lines = [
        "| dataset | MACs removed | seeds | chosen on validation | its val drop | **its test drop** | goal <= 0.5 pt |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in DATASETS:
        default = min((int(r["ft_epochs"]) for r in plain if r["dataset"] == d), default=None)
        cands = {"plain": [r for r in plain if r["dataset"] == d and int(r["ft_epochs"]) == default]}
        cands.update({n: [r for r in rows if r["dataset"] == d] for n, rows in variants.items()})
        for b in sorted(
            {r["budget"] for rows in cands.values() for r in rows if r["method"] == method}, key=float
        ):
            sel = {
                n: [r for r in rows if r["method"] == method and r["budget"] == b]
                for n, rows in cands.items()
            }
            sel = {n: rows for n, rows in sel.items() if rows}
            seeds = set.intersection(*({r["seed"] for r in rows} for rows in sel.values()))
            if not seeds:
                continue
            scored = {n: drops([r for r in rows if r["seed"] in seeds]) for n, rows in sel.items()}
            name = min(scored, key=lambda n: (scored[n][1], n != "plain"))
            t, v, n = scored[name]
            lines.append(
                f"| {d} | {float(b):.0%} | {n} | {name} | {v:+.1f} | **{t:+.1f}** | {'met' if t <= 0.5 else 'not met'} |"
            )
    return lines


def plot(
    ftlen: list[dict[str, str]], variants: dict[str, tuple[list[dict[str, str]], str]], out: Path
) -> Path | None:
    """Test drop against fine-tune length per dataset (plain), each variant a marker at its length."""
    if not ftlen:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DATASETS), figsize=(4.4 * len(DATASETS), 3.4), squeeze=False)
    g = group(ftlen, "dataset", "method", "budget", "ft_epochs")
    gv = {
        label: (group(rows, "dataset", "method", "budget"), marker)
        for label, (rows, marker) in variants.items()
    }
    for ax, d in zip(axes[0], DATASETS):
        for (m, b), style in {("lrp", "0.85"): "C0-o", ("lrp", "0.9"): "C0--o", ("taylor", "0.85"): "C1-s",
                              ("taylor", "0.9"): "C1--s"}.items():  # fmt: skip
            pts = sorted((int(k[3]), drops(v)[0]) for k, v in g.items() if k[:3] == (d, m, b))
            if pts:
                ax.plot(*zip(*pts), style, ms=4, label=f"{m} {float(b):.0%} plain")
            for label, (gr, marker) in gv.items():
                if (d, m, b) in gr:
                    e = int(gr[(d, m, b)][0]["ft_epochs"])
                    ax.plot(e, drops(gr[(d, m, b)])[0], style[:2] + marker, ms=9, mec="k",
                            label=f"{m} {float(b):.0%} {label}")  # fmt: skip
        ax.axhline(0.5, color="r", lw=0.7)
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fine-tune epochs")
        ax.set_title(d, fontsize=9)
    axes[0][0].set_ylabel("test ACC drop (pt), mean of 3 seeds")
    fig.legend(*axes[0][0].get_legend_handles_labels(), fontsize=6, loc="upper right", ncol=4)
    fig.suptitle("recovery at 85 / 90 % MACs removed (red: the 0.5 pt goal)", fontsize=9, x=0.25)
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ftlen", type=Path, default=RESULTS / "budget_ftlen.csv")
    p.add_argument("--feature", type=Path, default=RESULTS / "budget_feature.csv")
    p.add_argument("--kd", type=Path, default=RESULTS / "budget_kd.csv")
    p.add_argument("--feature-kd", type=Path, default=RESULTS / "budget_feature_kd.csv")
    p.add_argument("--gradual", type=Path, default=RESULTS / "budget_gradual.csv")
    p.add_argument("--lr", type=Path, default=RESULTS / "budget_ftlr.csv")
    p.add_argument("--raw", type=Path, default=RESULTS / "budget_raw.csv")
    p.add_argument("--raw-kd", type=Path, default=RESULTS / "budget_raw_kd.csv")
    p.add_argument("--cap", type=Path, default=RESULTS / "budget_cap.csv")
    p.add_argument("--md", type=Path, default=RESULTS / "recovery.md")
    args = p.parse_args(argv)
    ftlen, feature, kd, gradual = read(args.ftlen), read(args.feature), read(args.kd), read(args.gradual)
    feature_kd, ftlr, raw, raw_kd = read(args.feature_kd), read(args.lr), read(args.raw), read(args.raw_kd)
    cap = read(args.cap)
    ftlen = [r for r in ftlen if r.get("schedule", "oneshot") == "oneshot"]  # the length study is one-shot
    if not (ftlen or feature or kd or feature_kd or gradual or ftlr or raw or raw_kd or cap):
        raise SystemExit(
            f"none of {args.ftlen}, {args.feature}, {args.kd}, {args.feature_kd}, {args.gradual}, {args.lr}, "
            f"{args.raw}, {args.raw_kd}, {args.cap} has rows"
        )
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
    studies = (
        (feature, "feature distillation", "ft_feature_weight", "*",
         "Kept-channel feature distillation in the fine-tune of the default length (plain: the first length above; "
         "the weight chosen on validation):"),
        (kd, "logit distillation", "ft_kd_alpha", "^",
         "Logit distillation from the unpruned network in the fine-tune of the default length (loss (1 - alpha) CE + "
         "alpha T^2 KL, T = 4; the alpha chosen on validation):"),
        (feature_kd, "feature + logit distillation", "ft_feature_weight", "P",
         "Both: feature distillation (weight chosen on validation) with logit distillation (alpha 0.9):"),
        (ftlr, "learning rate", "ft_lr", "v",
         "The plain fine-tune's peak learning rate (OneCycle; default 1e-3) chosen on validation among 3e-4, 1e-3, "
         "3e-3:"),
        (gradual, "gradual", None, "D",
         "Gradual pruning: 3 stages, relevance re-scored and BatchNorm re-estimated after each, the default fine-tune "
         "length split evenly over the stages (a third after each stage), against one-shot pruning with the whole "
         "fine-tune after it:"),
        (raw, "relevance-alone ranking", None, "s",
         "The same one-shot pruning and plain fine-tune, the MACs budget filled by relevance alone "
         "(`prune(cost_aware=False)`) instead of relevance per MACs saved:"),
        (raw_kd, "relevance alone + logit distillation", "ft_kd_alpha", "X",
         "The relevance-alone ranking with logit distillation in the fine-tune (the alpha chosen on validation "
         "among 0.5, 0.9):"),
    ) + tuple(
        (rows, f"layer cap {c}", None, marker,
         f"The same one-shot pruning and plain fine-tune with no layer losing more than {float(c):.0%} of its channels "
         f"(`prune(max_layer_ratio={c})`; the default cap is 0.9), a more even network at the same MACs:")
        for ((c,), rows), marker in zip(sorted(group(cap, "max_layer_ratio").items()), "<>>>>", strict=False)
    )  # fmt: skip
    for rows, name, choice, _, text in studies:
        if rows:
            lines += [text, "", *variant_table(rows, ftlen, name, choice), ""]
    variants = {name: (rows, marker) for rows, name, _, marker, _ in studies if rows}
    if ftlen and any(rows for rows, *_ in studies):
        lines += [
            "Chosen on validation (LRP one-shot; the recovery with the smallest mean validation drop per dataset and "
            "budget, on the seeds every candidate has; the test drop is the goal's figure):",
            "",
            *chosen_table(ftlen, {name: rows for rows, name, *_ in studies if rows}),
            "",
        ]
    png = plot(ftlen, variants, args.md.with_name("recovery.png"))
    if png is not None:
        lines.append(f"Plot: `benchmarks/results/{png.name}`.")
    args.md.write_text("\n".join(lines) + "\n")
    print(args.md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
