"""Latency honesty of ``prune(target="latency")`` on real-size MONAI 3D networks (issue #17).

For each network: measure its per-layer latency table once (cached), prune a copy to each requested CPU speed-up
(magnitude scores: data-free, the selection under test is the budget, not the criterion), then time the unpruned and
the pruned network side by side in this process (eager, batch 1, the stated threads) and write requested vs achieved
speed-up to ``benchmarks/results/latency_target.csv``. Run it alone on a quiet machine.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/latency_target.py [--threads 1] [--speedups 1.5 2] [--models ...]``
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from run import latency_pair  # noqa: E402

from monai_iaprune import channel_relevance, prune  # noqa: E402
from monai_iaprune.pruning import count_macs, count_params, measure_latency_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CACHE = ROOT / "benchmarks" / "cache" / "latency_target"
COLUMNS = [
    "model", "device", "threads", "input", "requested_speedup", "achieved_speedup", "estimated_speedup",
    "macs_ratio", "params_ratio", "base_ms", "pruned_ms", "load_start", "note",
]  # fmt: skip


def models() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    """The four networks of the issue, at the input sizes of the latency tables (spleen UNet at 96^3)."""
    from monai.networks.nets import UNet, densenet121, resnet18

    def unet() -> (
        nn.Module
    ):  # the spleen CT bundle's network: channels 16-256, strides 2, 2 residual units, BN
        return UNet(
            3, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="batch"
        )

    return {
        "spleen_unet_96": (unet, (1, 1, 96, 96, 96)),
        "densenet121_3d": (
            lambda: densenet121(spatial_dims=3, in_channels=1, out_channels=2),
            (1, 1, 32, 32, 32),
        ),
        "resnet18_3d": (
            lambda: resnet18(spatial_dims=3, n_input_channels=1, num_classes=2),
            (1, 1, 32, 32, 32),
        ),
        "unet_3d": (unet, (1, 1, 32, 32, 32)),
    }


def run(names: Sequence[str], speedups: Sequence[float], threads: int, repeats: int, out: Path) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for name in names:
        build, shape = models()[name]
        torch.manual_seed(0)
        base = build().eval()
        x = torch.randn(*shape)
        t0 = time.perf_counter()
        table = measure_latency_table(base, x, device="cpu", threads=threads, cache_dir=CACHE)
        print(f"[table] {name}: {time.perf_counter() - t0:.0f}s", flush=True)
        rel = channel_relevance(base, None, "magnitude", progress=False)
        for s in speedups:
            row = {"model": name, "device": "cpu", "threads": threads, "input": "x".join(map(str, shape[2:])),
                   "requested_speedup": s, "load_start": round(os.getloadavg()[0], 2)}  # fmt: skip
            net = copy.deepcopy(base)
            try:
                res = prune(net, rel, target="latency", speedup=s, example_inputs=x, latency_table=table,
                            threads=threads)  # fmt: skip
            except ValueError as e:
                row["note"] = f"unreachable: {e}"[:300]
                rows.append(row)
                print(f"[skip] {name} {s}x: {e}", flush=True)
                continue
            with torch.no_grad():
                tb, tp = latency_pair(base, net.eval(), x, repeats=repeats)
            row.update(
                achieved_speedup=tb / tp, estimated_speedup=res.latency_estimated_speedup,
                macs_ratio=count_macs(net, x) / count_macs(base, x), params_ratio=count_params(net) / count_params(base),
                base_ms=tb, pruned_ms=tp,
            )  # fmt: skip
            rows.append(row)
            print(f"[row] {name} {s}x: achieved {tb / tp:.2f}x ({tb:.1f} -> {tp:.1f} ms), "
                  f"MACs x{row['macs_ratio']:.2f}", flush=True)  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(models()))
    p.add_argument("--speedups", nargs="+", type=float, default=[1.5, 2.0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=RESULTS / "latency_target.csv")
    a = p.parse_args(argv)
    run(a.models, a.speedups, a.threads, a.repeats, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
