"""Time of one ``prune()`` call (dependency graph, ratio search, physical pruning) on MONAI networks.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/prune_time.py
    OMP_NUM_THREADS=1 python benchmarks/prune_time.py --trials

Default: a Markdown table of seconds per ``prune`` on DenseNet121 2D / 3D for ``target="params"`` (ratio search)
and ``target="channels"`` (one pass), median of ``--repeats`` runs on fresh copies of the same network.

``--trials``: the MACs ratio search's trial selections counted on meta copies (shapes only) against real copies,
side by side in one run (the two alternate per repeat), on the latency-target benchmark's four 3D networks and two
big-weight 3D classifiers; the ``auto`` column says which ``prune`` uses (``META_TRIAL_PARAMS`` /
``META_TRIAL_MACS``) and ``same`` that both end on the same channels.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from monai.networks.nets import DenseNet121, SENet154, SEResNet50

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latency_target import models as latency_models  # noqa: E402

from monai_iaprune import channel_relevance, prune  # noqa: E402
from monai_iaprune.pruning import count_macs, count_params  # noqa: E402

PRUNE = sys.modules["monai_iaprune.pruning.prune"]  # the package's ``prune`` is the function


def default_table(repeats: int, ratio: float) -> None:
    rows = []
    for dims, shape in ((2, (1, 1, 64, 64)), (3, (1, 1, 32, 32, 32))):
        torch.manual_seed(0)
        net = DenseNet121(spatial_dims=dims, in_channels=1, out_channels=2).eval()
        x = torch.randn(*shape)
        rel = channel_relevance(net, [x], "magnitude", progress=False)
        for target in ("params", "channels"):
            times, reached = [], 0.0
            for _ in range(repeats):
                m = copy.deepcopy(net)
                t = time.perf_counter()
                res = prune(m, rel, ratio, target=target, example_inputs=x)
                times.append(time.perf_counter() - t)
                reached = res.params_removed
            rows.append((f"densenet121-{dims}d {tuple(shape)}", target, statistics.median(times), reached))
    print(f"| network | target | prune() s (median of {repeats}) | params removed |")
    print("|---|---|---:|---:|")
    for name, target, t, r in rows:
        print(f"| {name} | {target} {ratio} | {t:.2f} | {r:.3f} |")


def trial_networks() -> dict:
    nets = dict(latency_models())
    nets["seresnet50_3d"] = (
        lambda: SEResNet50(spatial_dims=3, in_channels=1, num_classes=2),
        (1, 1, 32, 32, 32),
    )
    nets["senet154_3d"] = (lambda: SENet154(spatial_dims=3, in_channels=1, num_classes=2), (1, 1, 32, 32, 32))
    return nets


def timed_prune(net, rel, x, ratio: float, meta: bool):
    PRUNE.META_TRIAL_PARAMS, PRUNE.META_TRIAL_MACS = (0, 0) if meta else (float("inf"), float("inf"))
    m = copy.deepcopy(net)
    t = time.perf_counter()
    res = prune(m, rel, ratio, target="macs", example_inputs=x)
    return time.perf_counter() - t, res


def trials_table(repeats: int, ratio: float, names: list[str] | None) -> None:
    defaults = (PRUNE.META_TRIAL_PARAMS, PRUNE.META_TRIAL_MACS)
    print(
        "| network | input | params | MACs | auto | real copies s | meta copies s | real / meta | same | "
        "MACs removed |\n|---|---|---:|---:|---|---:|---:|---:|---|---:|"
    )
    for name, (build, shape) in trial_networks().items():
        if names and name not in names:
            continue
        torch.manual_seed(0)
        net = build().eval()
        x = torch.randn(*shape)
        params, macs = count_params(net), count_macs(net, x)
        auto = "meta" if params >= defaults[0] or macs >= defaults[1] else "real"
        rel = channel_relevance(net, [x], "magnitude", progress=False)
        times: dict[bool, list[float]] = {True: [], False: []}
        results = {}
        for _ in range(repeats):
            for meta in (False, True):
                t, res = timed_prune(net, rel, x, ratio, meta)
                times[meta].append(t)
                results[meta] = (res.channel_ratio, res.channels, res.macs_after)
        real, meta = statistics.median(times[False]), statistics.median(times[True])
        same = "yes" if results[True] == results[False] else "NO"
        print(
            f"| {name} | {tuple(shape[2:])} | {params / 1e6:.1f}M | {macs / 1e9:.2f}G | {auto} | {real:.2f} | "
            f"{meta:.2f} | {real / meta:.2f}x | {same} | {1 - results[True][2] / macs:.3f} |",
            flush=True,
        )
    PRUNE.META_TRIAL_PARAMS, PRUNE.META_TRIAL_MACS = defaults


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--trials", action="store_true", help="meta vs real trial copies under target='macs'")
    p.add_argument("--networks", nargs="*", default=None, help="--trials: only these (default: all)")
    args = p.parse_args()
    if args.trials:
        trials_table(args.repeats, args.ratio, args.networks)
    else:
        default_table(args.repeats, args.ratio)


if __name__ == "__main__":
    main()
