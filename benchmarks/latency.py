"""CPU latency gain vs MACs gain of pruned MONAI networks, with and without ``optimize_for_inference``.

Every model is pruned by 50 % of channels (``target="channels"``, magnitude criterion: the criterion does not
change the shapes' cost much) and timed against its unpruned copy interleaved in one process (median of
repeats, batch 1, ``torch.inference_mode``). Variants: plain eval; ``round_to=8``; BatchNorm folded
(``optimize_for_inference``); folded + channels_last.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/latency.py [--repeats 20] [--models resnet18_3d ...]``
(writes benchmarks/results/latency.csv and the "Inference latency" section of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import latency_pair, make_model  # noqa: E402

from monai_iaprune import channel_relevance, prune  # noqa: E402
from monai_iaprune.pruning.prune import count_macs  # noqa: E402
from monai_iaprune.pruning.speed import optimize_for_inference, to_memory_format  # noqa: E402


def _models() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    from monai.networks.nets import UNet, densenet121, resnet18

    return {
        "densenet121_3d": (
            lambda: densenet121(spatial_dims=3, in_channels=1, out_channels=2),
            (1, 1, 32, 32, 32),
        ),
        "resnet18_3d": (
            lambda: resnet18(spatial_dims=3, n_input_channels=1, num_classes=2),
            (1, 1, 32, 32, 32),
        ),
        "unet_3d": (
            lambda: UNet(3, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2),
            (1, 1, 32, 32, 32),
        ),
        "bench_resnet18_2d_w16": (lambda: make_model(2, (16, 32, 64, 128)), (1, 1, 28, 28)),
        "bench_resnet18_3d_w8": (lambda: make_model(3, (8, 16, 32, 64)), (1, 1, 28, 28, 28)),
    }


VARIANTS = {
    "plain": {"round_to": None, "fold_bn": False, "memory_format": None},
    "round_to=8": {"round_to": 8, "fold_bn": False, "memory_format": None},
    "fold BN": {"round_to": None, "fold_bn": True, "memory_format": None},
    "fold BN + channels_last": {"round_to": None, "fold_bn": True, "memory_format": "channels_last"},
}


def measure(
    name: str, factory: Callable[[], nn.Module], shape: tuple[int, ...], repeats: int, variants: Sequence[str]
) -> list[dict]:
    torch.manual_seed(0)
    base = factory().eval()
    x = torch.randn(*shape)
    rel = channel_relevance(base, None, "magnitude", progress=False)
    rows = []
    pruned_cache: dict[int | None, nn.Module] = {}
    for v in variants:
        opt = VARIANTS[v]
        if opt["round_to"] not in pruned_cache:
            m = copy.deepcopy(base)
            prune(m, rel, 0.5, target="channels", example_inputs=x, round_to=opt["round_to"])
            pruned_cache[opt["round_to"]] = m
        a, b = copy.deepcopy(base), copy.deepcopy(pruned_cache[opt["round_to"]])
        macs_a, macs_b = count_macs(a, x), count_macs(b, x)
        if opt["fold_bn"] or opt["memory_format"]:
            optimize_for_inference(a, fold_bn=opt["fold_bn"], memory_format=opt["memory_format"])
            optimize_for_inference(b, fold_bn=opt["fold_bn"], memory_format=opt["memory_format"])
        xi = to_memory_format(x, opt["memory_format"])
        ta, tb = latency_pair(a, b, xi, repeats=repeats)
        macs_gain, lat_gain = macs_a / macs_b, ta / tb
        rows.append(
            {
                "model": name,
                "input": "x".join(map(str, shape)),
                "variant": v,
                "threads": torch.get_num_threads(),
                "macs_unpruned": macs_a,
                "macs_pruned": macs_b,
                "latency_unpruned_ms": round(ta, 3),
                "latency_pruned_ms": round(tb, 3),
                "macs_gain": round(macs_gain, 3),
                "latency_gain": round(lat_gain, 3),
                "latency_gain_over_macs_gain": round(lat_gain / macs_gain, 3),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--no-md", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    models = _models()
    names = args.models or list(models)
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    rows: list[dict] = []
    for n in names:
        try:
            rows += measure(n, *models[n], args.repeats, args.variants)
        except Exception as e:  # report a network torch-pruning cannot handle instead of stopping
            print(f"[fail] {n}: {type(e).__name__}: {e}", flush=True)
            rows.append({"model": n, "variant": f"FAILED: {type(e).__name__}: {str(e)[:120]}"})
    args.out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with (args.out / "latency.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    lines = [
        "## Inference latency (CPU) vs MACs, 50 % of channels removed",
        "",
        f"Command: `OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/latency.py --repeats {args.repeats}` "
        f"({(time.perf_counter() - t0) / 60:.1f} min; load average {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end: "
        "the machine was shared, so absolute times are noisy; pruned and unpruned are interleaved so their ratio is less so). "
        "Gain = unpruned / pruned; goal: latency gain >= 0.8 x MACs gain. In the fold-BN variants both networks are folded.",
        "",
        "| model | input | variant | MACs gain | latency unpruned ms | latency pruned ms | latency gain | latency gain / MACs gain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "macs_gain" not in r:
            lines.append(f"| {r['model']} | | {r['variant']} | | | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['input']} | {r['variant']} | {r['macs_gain']:.2f} | {r['latency_unpruned_ms']:.2f} | "
            f"{r['latency_pruned_ms']:.2f} | {r['latency_gain']:.2f} | {r['latency_gain_over_macs_gain']:.2f} |"
        )
    md = "\n".join(lines)
    print(md)
    if not args.no_md:
        from mdsections import update_section

        update_section("latency", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
