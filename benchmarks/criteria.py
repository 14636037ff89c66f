"""Criteria study: how the explained target and the per-layer normaliser change every criterion.

On the cached unpruned models of ``benchmarks/run.py`` (same data, same calibration subsets, same
pruning and BatchNorm re-calibration), every criterion is run at one fraction of parameters removed,
with no fine-tune, for each explained target (``"label"``: the label's logit; ``"loss"``: the
softmax-gradient / negative cross-entropy gradient) and each per-layer normaliser of ``prune``
(``mean``, ``max``, ``rank``, none). Validation and test ACC are recorded per seed: settings are
chosen on validation ACC, test ACC is what is reported. This is the evidence behind the library's
defaults (``target="label"``, ``prune(normalizer="auto")``).

Usage (from the repository root; the base models must be cached by ``benchmarks/run.py`` first, or
they are trained here with the same settings)::

    OMP_NUM_THREADS=1 python benchmarks/criteria.py                       # all three datasets
    OMP_NUM_THREADS=1 python benchmarks/criteria.py --datasets breastmnist --ratio 0.7

Writes ``benchmarks/results/criteria.csv`` (resumable: rows already there are skipped) and the
"criteria" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # noqa: E402
    ALL_METHODS,
    CACHE,
    DATA_DIR,
    DATASETS,
    DEFAULT_DATASETS,
    RESULTS,
    base_model,
    batches,
    load_split,
    metrics,
    predict,
)

from monai_iaprune import channel_relevance, prune, recalibrate_batchnorm  # noqa: E402

TARGETS = ("label", "loss")
NORMALIZERS = ("mean", "max", "rank", "none")
DATA_FREE = ("magnitude", "random")
COLUMNS = [
    "dataset", "prune_target", "ratio", "method", "target", "normalizer", "val_acc", "test_acc", "test_auc",
    "test_acc_std", "test_acc_seeds", "macs_kept", "seeds", "time_s",
]  # fmt: skip
BASE_EPOCHS = {"adrenalmnist3d": 12}  # the cached AdrenalMNIST3D base model (see BENCHMARKS.md)


def _key(d: str, what: str, ratio: float, method: str, target: str, norm: str) -> tuple[str, ...]:
    return d, what, f"{ratio:.2f}", method, target, norm


def read(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def run(args: argparse.Namespace) -> None:
    path = args.out / "criteria.csv"
    done = {
        _key(r["dataset"], r["prune_target"], float(r["ratio"]), r["method"], r["target"], r["normalizer"])
        for r in read(path)
    }
    for name in args.datasets:
        cfg = DATASETS[name]
        if not (DATA_DIR / cfg["file"]).exists():
            print(f"[skip] {name}: {DATA_DIR / cfg['file']} not present")
            continue
        data = {s: load_split(DATA_DIR / cfg["file"], s) for s in ("train", "val", "test")}
        model, _ = base_model(name, cfg, data, args.cache, epochs=BASE_EPOCHS.get(name))
        xtr, ytr = data["train"]
        x1 = data["test"][0][:1]
        for method in args.methods:
            for target in ("-",) if method in DATA_FREE else args.targets:
                for norm in args.normalizers:
                    key = _key(name, args.prune_target, args.ratio, method, target, norm)
                    if key in done:
                        continue
                    t0 = time.perf_counter()
                    val, test, auc, kept = [], [], [], []
                    for seed in args.seeds:
                        g = torch.Generator().manual_seed(1000 + seed)  # the calibration subset of run.py
                        calib = torch.randperm(len(xtr), generator=g)[: args.calib]
                        cal = list(batches(xtr[calib], ytr[calib], 32))
                        m = copy.deepcopy(model)
                        kw = {"seed": seed} if method == "random" else {}
                        if method not in DATA_FREE:
                            kw["target"] = target
                        rel = channel_relevance(m, cal, method, progress=False, **kw)
                        res = prune(
                            m,
                            rel,
                            args.ratio,
                            target=args.prune_target,
                            example_inputs=x1,
                            normalizer=None if norm == "none" else norm,
                            max_layer_ratio=0.99,
                        )
                        recalibrate_batchnorm(m, cal)
                        a, u = metrics(data["test"][1], predict(m, data["test"][0]))
                        va, _ = metrics(data["val"][1], predict(m, data["val"][0]))
                        val.append(va)
                        test.append(a)
                        auc.append(u)
                        kept.append(res.macs_after / res.macs_before)
                    row = {
                        "dataset": name,
                        "prune_target": args.prune_target,
                        "ratio": args.ratio,
                        "method": method,
                        "target": target,
                        "normalizer": norm,
                        "val_acc": float(np.mean(val)),
                        "test_acc": float(np.mean(test)),
                        "test_auc": float(np.mean(auc)),
                        "test_acc_std": float(np.std(test)),
                        "test_acc_seeds": " ".join(f"{a:.4f}" for a in test),
                        "macs_kept": float(np.mean(kept)),
                        "seeds": " ".join(map(str, args.seeds)),
                        "time_s": time.perf_counter() - t0,
                    }
                    new = not path.exists()
                    with path.open("a", newline="") as f:
                        w = csv.DictWriter(f, fieldnames=COLUMNS)
                        if new:
                            w.writeheader()
                        w.writerow(row)
                    print(
                        f"[row] {name} {method:9s} {target:5s} {norm:5s}: val {row['val_acc']:.3f} "
                        f"test {row['test_acc']:.3f} ± {row['test_acc_std']:.3f} AUC {row['test_auc']:.3f}",
                        flush=True,
                    )


def summarize(path: Path, ratio: float) -> str:
    every = [r for r in read(path) if abs(float(r["ratio"]) - ratio) < 1e-9]
    if not every:
        return "no rows"
    lines = [
        f"## Criteria study: explained target and per-layer normaliser ({ratio:.0%} removed, no fine-tune)",
        "",
        "Commands: `OMP_NUM_THREADS=1 python benchmarks/criteria.py` (parameters) and "
        "`OMP_NUM_THREADS=1 python benchmarks/criteria.py --prune-target macs --targets label "
        "--normalizers mean none` (MACs); results in `benchmarks/results/criteria.csv`. Same cached base models, "
        "calibration subsets (256 training images per seed), pruning and BatchNorm re-calibration as the main "
        "grid; mean test ACC over 3 seeds, validation ACC in brackets, MACs kept (pruned / unpruned) after the "
        "slash. **Bold**: the setting with the best validation ACC per criterion and dataset (the choice a user "
        "could make without the test set).",
        "",
    ]
    for what in dict.fromkeys(r["prune_target"] for r in every):
        rows = [r for r in every if r["prune_target"] == what]
        lines += [f"### {ratio:.0%} of {'parameters' if what == 'params' else 'MACs'} removed", ""]
        lines += _tables(rows)
    return "\n".join(lines)


def _tables(rows: list[dict[str, str]]) -> list[str]:
    lines: list[str] = []
    for d in dict.fromkeys(r["dataset"] for r in rows):
        sub = [r for r in rows if r["dataset"] == d]
        norms = [n for n in NORMALIZERS if any(r["normalizer"] == n for r in sub)]
        lines += [f"#### {d}", "", "| criterion | target | " + " | ".join(norms) + " |"]
        lines.append("|---|---|" + "---|" * len(norms))
        for method in ALL_METHODS:
            ms = [r for r in sub if r["method"] == method]
            if not ms:
                continue
            best = max(ms, key=lambda r: float(r["val_acc"]))
            for target in dict.fromkeys(r["target"] for r in ms):
                cells = []
                for norm in norms:
                    r = next((r for r in ms if r["target"] == target and r["normalizer"] == norm), None)
                    if r is None:
                        cells.append("-")
                        continue
                    c = f"{float(r['test_acc']):.3f} ({float(r['val_acc']):.3f})"
                    if r.get("macs_kept"):
                        c += f" / {float(r['macs_kept']):.2f}"
                    cells.append(f"**{c}**" if r is best else c)
                lines.append(f"| {method} | {target} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS, choices=list(DATASETS))
    p.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=list(ALL_METHODS))
    p.add_argument("--targets", nargs="+", default=list(TARGETS))
    p.add_argument("--normalizers", nargs="+", default=list(NORMALIZERS), choices=list(NORMALIZERS))
    p.add_argument("--ratio", type=float, default=0.7)
    p.add_argument("--prune-target", default="params", choices=["params", "macs"], help="what ratio removes")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--no-md", action="store_true", help="do not touch BENCHMARKS.md")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        run(args)
    md = summarize(args.out / "criteria.csv", args.ratio)
    print(md)
    if not args.no_md:
        from mdsections import update_section

        update_section("criteria", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
