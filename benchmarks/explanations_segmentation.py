"""Explanation-preserving fine-tuning on the 3D segmentation bundle (issue #16's segmentation case).

For every seed: a copy of ``bundles/segmentation_3d`` (synthetic MRI-like phantoms generated with that seed,
anisotropic 1 x 1 x 2 mm voxels) trains its own base model once (the bundle's ``train_if_missing``), then the
bundle's own ``prune`` run removes ``--ratios`` of the MACs by LRP relevance and fine-tunes ``finetune_epochs``
twice from the same trained model and seed:

- ``plain``: the bundle's Dice-CE loss only;
- ``explain``: the same plus ``explain_weight`` (each of ``--weights``) x the explanation-consistency term (gradient x input maps of
  the foreground class over the mask, teacher = the unpruned network);
- ``feature``: the same plus ``explain_feature_weight`` (each of ``--feature_weights``) x kept-channel feature
  distillation from the unpruned network (``pruning.feature_distillation``), no map term.

Agreement is what the bundle's prune report measures on the VALIDATION phantoms (held out from training): IG
maps (an explainer the ``explain`` arm was not trained on) of the unpruned and the final network, median Spearman
and top-10 % IoU with 95 % bootstrap intervals over patches, mean deletion AUC of each network with its own maps,
and the bundle's key metric (mean Dice) after fine-tuning. Nothing of the pipeline is re-implemented here: every
number comes from ``eval/prune_report.json`` of a ``python -m monai.bundle run prune`` run.

    nice -n 10 python benchmarks/explanations_segmentation.py --seeds 0 1 2
    # rows appended to benchmarks/results/explanations_segmentation.csv (finished keys skipped), table in
    # benchmarks/results/explanations_segmentation.md

No timing is recorded (shared machine).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "segmentation_3d"
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = "['configs/train.json','configs/prune.json']"
COLUMNS = [
    "dataset", "method", "macs_removed", "seed", "finetune", "explain_weight", "explainer_train", "explainer_eval",
    "spearman", "spearman_ci_lo", "spearman_ci_hi", "iou10", "iou10_ci_lo", "iou10_ci_hi",
    "deletion_auc_base", "deletion_auc_pruned", "acc_base", "acc", "macs_ratio", "n_images", "feature_weight",
]  # fmt: skip


def _run(bundle: Path, args: list[str], log: Path) -> None:
    """One ``monai.bundle run prune`` of ``bundle``; its output goes to ``log``; a failure stops the benchmark."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "prune", "--config_file", CONFIGS, *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONPATH=str(ROOT))
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=bundle, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bundle run failed ({' '.join(args)}); see {log}")


def _key(row: dict[str, Any]) -> tuple[str, ...]:
    return tuple(
        str(row.get(k) or "")
        for k in ("dataset", "method", "macs_removed", "seed", "finetune", "explain_weight")
    ) + (str(float(row.get("feature_weight") or 0)), row.get("explainer_eval") or "ig")


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict[str, Any]) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in COLUMNS})


def row_from_report(report: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """The CSV row of one prune report (agreement, faithfulness, Dice, MACs)."""
    s_ci = report.get("expl_spearman_ci") or ["", ""]
    i_ci = report.get("expl_top10_iou_ci") or ["", ""]
    return {
        **fields,
        "explainer_eval": report.get("explanation_method"),
        "spearman": report.get("expl_spearman"),
        "spearman_ci_lo": s_ci[0],
        "spearman_ci_hi": s_ci[1],
        "iou10": report.get("expl_top10_iou"),
        "iou10_ci_lo": i_ci[0],
        "iou10_ci_hi": i_ci[1],
        "deletion_auc_base": report.get("deletion_auc_base"),
        "deletion_auc_pruned": report.get("deletion_auc_pruned"),
        "acc_base": report.get("metric_before"),
        "acc": report.get("metric_after"),
        "macs_ratio": report["macs_after"] / report["macs_before"] if report.get("macs_before") else "",
        "n_images": report.get("n_images"),
    }


def run(args: argparse.Namespace) -> None:
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {_key(r) for r in read_rows(out)}
    explain_kwargs = json.dumps({"n_images": 4, "max_samples": args.max_samples, "n_steps": args.ig_steps})
    for seed in args.seeds:
        work = args.work / f"seed{seed}"
        if not (work / "configs").is_dir():
            shutil.copytree(BUNDLE, work, ignore=shutil.ignore_patterns("models", "eval", "data"))
        for ratio in args.ratios:
            arms = [(0.0, 0.0), *((w, 0.0) for w in args.weights), *((0.0, f) for f in args.feature_weights)]
            for weight, feature in arms:
                arm = "explain" if weight > 0 else "feature" if feature > 0 else "plain"
                fields = {
                    "dataset": "segmentation_3d_synthetic",
                    "method": args.method,
                    "macs_removed": ratio,
                    "seed": seed,
                    "finetune": arm,
                    "explain_weight": weight,
                    "explainer_train": {"explain": "grad_x_input", "feature": "features"}.get(arm, ""),
                    "feature_weight": feature,
                    "explainer_eval": args.explain_method,
                }
                if _key(fields) in done:
                    continue
                print(
                    f"seed {seed}, {ratio:.0%} of MACs, {arm} fine-tune (weight {max(weight, feature):g}) ...",
                    flush=True,
                )
                extra = [
                    "--seed", str(seed), "--method", args.method, "--prune_target", "macs", "--ratio", str(ratio),
                    "--finetune_epochs", str(args.finetune_epochs), "--overwrite", "true", "--explain", "true",
                    "--explain_method", args.explain_method, "--explain_kwargs", explain_kwargs,
                    "--explain_weight", str(weight), "--explain_feature_weight", str(feature),
                ]  # fmt: skip
                _run(
                    work,
                    extra,
                    work
                    / (
                        f"log_{ratio}_{weight:g}"
                        + (f"_f{feature:g}" if feature else "")
                        + f"_{args.explain_method}.txt"
                    ),
                )
                report = json.loads((work / "eval" / "prune_report.json").read_text())
                row = row_from_report(report, **fields)
                append_row(out, row)
                print(
                    f"  Dice {row['acc']:.3f} (base {row['acc_base']:.3f}), {args.explain_method} Spearman {row['spearman']:.3f}, "
                    f"top-10 % IoU {row['iou10']:.3f}",
                    flush=True,
                )


def _f(v: str) -> str:
    try:
        return f"{float(v):.3f}"
    except ValueError:
        return "–"


def _ev(r: dict[str, str]) -> str:
    """The explainer a row's agreement was measured with (files from before the option: IG)."""
    return r.get("explainer_eval") or "ig"


def _arm(r: dict[str, str]) -> tuple[int, float]:
    """Sort key of a row's fine-tune: plain, explain (by weight), feature (by weight)."""
    feature = float(r.get("feature_weight") or 0)
    return (
        (2, feature)
        if feature > 0
        else (1 if float(r["explain_weight"]) > 0 else 0, float(r["explain_weight"]))
    )


def _arm_label(r: dict[str, str]) -> str:
    kind, weight = _arm(r)
    return ("plain", f"explain {weight:g}", f"feature {weight:g}")[kind] if kind else "plain"


def summarize(rows: list[dict[str, str]], command: str) -> str:
    """Markdown: one line per (MACs removed, seed) with both arms side by side, then the means over seeds."""
    lines = [
        f"Command: `{command}`",
        "",
        "| MACs removed | seed | fine-tune (weight) | explainer | Dice base | Dice | Spearman [95 % CI] "
        "| top-10 % IoU [95 % CI] | deletion AUC base / pruned |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (_ev(r), float(r["macs_removed"]), int(r["seed"]), _arm(r))):
        lines.append(
            f"| {float(r['macs_removed']):.0%} | {r['seed']} | {_arm_label(r)} | {_ev(r)} | {_f(r['acc_base'])} "
            f"| {_f(r['acc'])} "
            f"| {_f(r['spearman'])} [{_f(r['spearman_ci_lo'])}, {_f(r['spearman_ci_hi'])}] "
            f"| {_f(r['iou10'])} [{_f(r['iou10_ci_lo'])}, {_f(r['iou10_ci_hi'])}] "
            f"| {_f(r['deletion_auc_base'])} / {_f(r['deletion_auc_pruned'])} |"
        )
    lines += [
        "",
        "Means over seeds:",
        "",
        "| MACs removed | fine-tune (weight) | explainer | seeds | Dice | Spearman | top-10 % IoU | deletion AUC pruned |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str, tuple], list[dict[str, str]]] = {}
    for r in rows:
        groups.setdefault((_ev(r), r["macs_removed"], _arm(r)), []).append(r)
    for (ev, ratio, _), g in sorted(groups.items(), key=lambda kv: (kv[0][0], float(kv[0][1]), kv[0][2])):

        def mean(k: str, g: list[dict[str, str]] = g) -> str:
            return f"{sum(float(r[k]) for r in g) / len(g):.3f}"

        lines.append(
            f"| {float(ratio):.0%} | {_arm_label(g[0])} | {ev} | {len(g)} | {mean('acc')} | {mean('spearman')} "
            f"| {mean('iou10')} | {mean('deletion_auc_pruned')} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.7], help="fractions of MACs removed")
    p.add_argument("--method", default="lrp", help="channel relevance method of the pruning")
    p.add_argument(
        "--weights",
        nargs="*",
        type=float,
        default=[0.1, 1.0],
        help="explain_weight of each explain arm (> 0)",
    )
    p.add_argument(
        "--feature_weights",
        nargs="*",
        type=float,
        default=[],
        help="explain_feature_weight of each feature arm (> 0): kept-channel feature distillation, no map term",
    )
    p.add_argument(
        "--explain_method",
        default="ig",
        help="explainer of the agreement (the report's; never a trained one)",
    )
    p.add_argument("--finetune_epochs", type=int, default=3)
    p.add_argument("--max_samples", type=int, default=16, help="validation patches explained")
    p.add_argument("--ig_steps", type=int, default=16)
    p.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "cache" / "explanations_segmentation")
    p.add_argument("--out", type=Path, default=RESULTS / "explanations_segmentation.csv")
    p.add_argument("--md", type=Path, default=RESULTS / "explanations_segmentation.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for r in args.ratios:
        if not 0.0 < r < 1.0:
            raise SystemExit(f"bad --ratios entry {r}: a fraction of MACs removed in (0, 1)")
    for w in [*args.weights, *args.feature_weights]:
        if not w > 0:
            raise SystemExit(f"bad --weights entry {w}: an explain_weight > 0 (the plain arm always runs)")
    run(args)
    command = "python benchmarks/explanations_segmentation.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    args.md.write_text(summarize(read_rows(args.out), command.strip()))
    print(args.md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
