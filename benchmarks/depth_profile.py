"""Why depth pruning's CPU latency gain falls short of its MACs gain on some 3D networks (issue #15).

For each 3D network of ``depth.py --nets3d`` (untrained, the latency tables' input sizes), the base model and its
deepest depth-pruned copy (``benchmarks/cache/depth_models``, the largest latency budget that was reachable) are
profiled with ``torch.profiler`` at batch 1: CPU time per op category (convolutions, pooling, norms, concatenation,
activations, the rest), median of ``--repeats`` profiled calls. A category whose time does not shrink with the
MACs is what holds the latency gain / MACs gain below 1.

Timings: run it on a quiet machine (nothing else on the cores); the load is printed and written with the rows.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/depth_profile.py --threads 1 --cache /work/main/benchmarks/cache

Writes ``benchmarks/results/depth_profile.{csv,md}`` and the ``depth-profile`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

CATEGORIES = {
    "conv": ("conv", "mkldnn_convolution"),
    "pool": ("pool",),
    "norm": ("batch_norm", "instance_norm", "layer_norm", "group_norm"),
    "concat": ("aten::cat",),
    "activation": ("relu", "clamp", "prelu", "gelu", "silu", "sigmoid"),
}


def category(op: str) -> str:
    for cat, keys in CATEGORIES.items():
        if any(k in op for k in keys):
            return cat
    return "other"


def profile_ms(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median per-call self CPU ms per category (and ``total``) over ``repeats`` profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    per_call: list[Counter] = []
    with torch.no_grad():
        for _ in range(3):
            model(x)
        for _ in range(repeats):
            with profile(activities=[ProfilerActivity.CPU]) as p:
                model(x)
            c: Counter = Counter()
            for e in p.key_averages():
                if e.key.startswith("aten::"):
                    c[category(e.key)] += e.self_cpu_time_total / 1000.0
            c["total"] = sum(c.values())
            per_call.append(c)
    keys = [*CATEGORIES, "other", "total"]
    return {k: statistics.median(c[k] for c in per_call) for k in keys}


def deepest(models_dir: Path, name: str) -> Path | None:
    files = sorted(models_dir.glob(f"{name}_*_depth_latency*_s0.pt"))
    return max(files, key=lambda f: float(f.stem.split("latency")[1].split("_")[0]), default=None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=HERE / "cache")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--no-md", dest="md", action="store_false", help="do not touch BENCHMARKS.md")
    p.add_argument("--report", action="store_true", help="only rewrite the tables from OUT/depth_profile.csv")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.report:
        with open(args.out / "depth_profile.csv", newline="") as fh:
            rows = [{k: v if k in ("network", "variant", "model_file") else float(v) for k, v in r.items()}
                    for r in csv.DictReader(fh)]  # fmt: skip
        write_report(rows, args)
        return

    import latency_target

    from monai_iaprune.pruning.checkpoint import load_pruned
    from monai_iaprune.pruning.prune import count_macs

    rows = []
    for name, (build, shape) in latency_target.models().items():
        f = deepest(args.cache / "depth_models", name)
        if f is None:
            print(f"[skip] {name}: no depth-pruned model in {args.cache / 'depth_models'}")
            continue
        torch.manual_seed(0)
        base = build().eval()
        pruned = load_pruned(str(f), build()).eval()
        x = torch.randn(shape)
        for variant, m in (("base", base), ("depth", pruned)):
            ms = profile_ms(m, x, args.repeats)
            rows.append({"network": name, "variant": variant, "model_file": f.name, "macs_m": count_macs(m, x) / 1e6,
                         **{f"{k}_ms": v for k, v in ms.items()}, "threads": args.threads,
                         "load": os.getloadavg()[0]})  # fmt: skip
            print(f"[{name} {variant}] " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()), flush=True)
    if not rows:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "depth_profile.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    write_report(rows, args)


def write_report(rows: list[dict], args: argparse.Namespace) -> None:
    from mdsections import update_section

    cats = [*CATEGORIES, "other", "total"]
    lines = [
        "## Where depth-pruned 3D networks spend their CPU time (issue #15)",
        "",
        f"`OMP_NUM_THREADS={args.threads} python benchmarks/depth_profile.py --threads {args.threads} "
        f"--cache {args.cache}` (batch 1, {args.threads} thread(s), torch.profiler self CPU time, median of "
        f"{args.repeats} calls; load at end {rows[-1]['load']:.1f}). Base vs the deepest depth-pruned copy of "
        "each network; gain = base ms / pruned ms per category (MACs: base MACs / pruned MACs).",
        "",
        "| network | pruned model | MACs gain | "
        + " | ".join(f"{c} ms base -> pruned (gain)" for c in cats)
        + " |",
        "|---|---|---|" + "---|" * len(cats),
    ]
    for name in dict.fromkeys(r["network"] for r in rows):
        b, d = (
            next(r for r in rows if r["network"] == name and r["variant"] == v) for v in ("base", "depth")
        )
        cells = [
            f"{b[c + '_ms']:.2f} -> {d[c + '_ms']:.2f} ({b[c + '_ms'] / d[c + '_ms']:.2f}x)"
            if d[c + "_ms"] > 0
            else f"{b[c + '_ms']:.2f} -> 0"
            for c in cats
        ]
        lines.append(
            f"| {name} | {b['model_file']} | {b['macs_m'] / d['macs_m']:.2f}x | " + " | ".join(cells) + " |"
        )
    notes = []
    for name in dict.fromkeys(r["network"] for r in rows):
        b, d = (
            next(r for r in rows if r["network"] == name and r["variant"] == v) for v in ("base", "depth")
        )
        macs_gain, gain = b["macs_m"] / d["macs_m"], b["total_ms"] / d["total_ms"]
        if gain / macs_gain >= 0.9:
            continue
        flat = [f"{c} {d[c + '_ms']:.2f} ms = {100 * d[c + '_ms'] / d['total_ms']:.0f} % of the pruned time"
                for c in (*CATEGORIES, "other") if d[c + "_ms"] > 0 and b[c + "_ms"] / d[c + "_ms"] < 1.1]  # fmt: skip
        notes.append(
            f"- {name}: latency gain {gain:.2f}x for a MACs gain of {macs_gain:.2f}x ({gain / macs_gain:.2f}). "
            f"Convolution time falls {b['conv_ms'] / d['conv_ms']:.2f}x, not {macs_gain:.2f}x: the convolutions that "
            "stay do fewer MACs per ms than the removed ones. Time that does not shrink: "
            + ("; ".join(flat) or "none")
            + "."
        )
    if notes:
        lines += ["", "Below 0.9 latency gain / MACs gain:", *notes]
    md = "\n".join(lines)
    (args.out / "depth_profile.md").write_text(md + "\n")
    if args.md:
        update_section("depth-profile", md)
    print(md)


if __name__ == "__main__":
    main()
