"""Time of one ``prune()`` call (dependency graph, ratio search, physical pruning) on MONAI DenseNet121 2D / 3D.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/prune_time.py

Prints a Markdown table: seconds per ``prune`` for ``target="params"`` (ratio search) and ``target="channels"``
(one pass), median of ``--repeats`` runs on fresh copies of the same network.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from monai.networks.nets import DenseNet121

from monai_iaprune import channel_relevance, prune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ratio", type=float, default=0.5)
    args = p.parse_args()
    rows = []
    for dims, shape in ((2, (1, 1, 64, 64)), (3, (1, 1, 32, 32, 32))):
        torch.manual_seed(0)
        net = DenseNet121(spatial_dims=dims, in_channels=1, out_channels=2).eval()
        x = torch.randn(*shape)
        rel = channel_relevance(net, [x], "magnitude", progress=False)
        for target in ("params", "channels"):
            times, reached = [], 0.0
            for _ in range(args.repeats):
                m = copy.deepcopy(net)
                t = time.perf_counter()
                res = prune(m, rel, args.ratio, target=target, example_inputs=x)
                times.append(time.perf_counter() - t)
                reached = res.params_removed
            rows.append((f"densenet121-{dims}d {tuple(shape)}", target, statistics.median(times), reached))
    print(f"| network | target | prune() s (median of {args.repeats}) | params removed |")
    print("|---|---|---:|---:|")
    for name, target, t, r in rows:
        print(f"| {name} | {target} {args.ratio} | {t:.2f} | {r:.3f} |")


if __name__ == "__main__":
    main()
