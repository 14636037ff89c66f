"""CPU latency gain vs MACs gain of pruned MONAI networks, with and without ``optimize_for_inference``.

Every model is pruned by 50 % of channels (``target="channels"``, magnitude criterion: the criterion does not
change the shapes' cost much) and timed against its unpruned copy interleaved in one process (median of
repeats, ``torch.inference_mode``); both copies get the same treatment. Variants: plain eval; ``round_to=8``;
BatchNorm folded; folded + channels_last; folded + per-layer conv kernel choice (``kernels="auto"``);
that + frozen TorchScript (``backend="jit"``), with and without channels_last. A per-op profile (torch.profiler,
self CPU time) of the plain and the fastest variant and a conv-kernel microbenchmark say where the time goes.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/latency.py [--repeats 20] [--batch 1 8] [--models resnet18_3d ...]``
(writes benchmarks/results/latency.csv, latency_profile.csv, latency_kernels.csv and the "Inference latency"
section of BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
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


def _variant(round_to=None, fold_bn=False, memory_format=None, kernels="default", backend="eager") -> dict:
    return {
        "round_to": round_to,
        "fold_bn": fold_bn,
        "memory_format": memory_format,
        "kernels": kernels,
        "backend": backend,
    }


VARIANTS = {
    "plain": _variant(),
    "round_to=8": _variant(round_to=8),
    "fold BN": _variant(fold_bn=True),
    "fold BN + channels_last": _variant(fold_bn=True, memory_format="channels_last"),
    "fold BN + auto kernels": _variant(fold_bn=True, kernels="auto"),
    "fold BN + auto kernels + jit": _variant(fold_bn=True, kernels="auto", backend="jit"),
    "fold BN + channels_last + auto kernels + jit": _variant(
        fold_bn=True, memory_format="channels_last", kernels="auto", backend="jit"
    ),
}
PROFILED = ("plain", "fold BN + auto kernels + jit")

# torch.profiler op names -> what they are; the rest (allocation, views, dispatch wrappers) is "other"
_NATIVE_CONV = ("slow_conv", "thnn_conv", "_slow_conv2d")
_ONEDNN_CONV = (
    "mkldnn_convolution",
    "mkldnn::",
    "aten::_convolution",
)  # oneDNN transposed convs run inside _convolution
_MEMORY_BOUND = (
    "batch_norm", "instance_norm", "group_norm", "layer_norm", "relu", "clamp", "prelu", "add", "mul", "cat",
    "pool", "copy_", "to_mkldnn", "to_dense", "sigmoid", "softmax", "elu", "leaky",
)  # fmt: skip


def _category(op: str) -> str:
    if any(k in op for k in _NATIVE_CONV):
        return "native conv"
    if any(k in op for k in _ONEDNN_CONV):
        return "oneDNN conv"
    if any(k in op for k in _MEMORY_BOUND):
        return "memory-bound ops"
    return "other"


@torch.inference_mode()
def profile_ops(model: Callable, x: torch.Tensor, n: int = 10) -> dict[str, float]:
    """Self CPU ms per forward by op category (torch.profiler), plus ``"wall"`` (plain median, no profiler)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        model(x)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            model(x)
    out = dict.fromkeys(("native conv", "oneDNN conv", "memory-bound ops", "other"), 0.0)
    for e in prof.key_averages():
        out[_category(e.key)] += e.self_cpu_time_total / n / 1000
    times = []
    for _ in range(n):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
    out["wall"] = 1000 * statistics.median(times)
    return out


def measure(
    name: str,
    factory: Callable[[], nn.Module],
    shape: tuple[int, ...],
    repeats: int,
    variants: Sequence[str],
    batch: int,
    profile: bool,
) -> tuple[list[dict], list[dict]]:
    torch.manual_seed(0)
    base = factory().eval()
    x1 = torch.randn(*shape)
    x = torch.randn(batch, *shape[1:])
    rel = channel_relevance(base, None, "magnitude", progress=False)
    rows, prof_rows = [], []
    pruned_cache: dict[int | None, nn.Module] = {}
    plain_unpruned_ms = None
    for v in variants:
        opt = VARIANTS[v]
        if opt["round_to"] not in pruned_cache:
            m = copy.deepcopy(base)
            prune(m, rel, 0.5, target="channels", example_inputs=x1, round_to=opt["round_to"])
            pruned_cache[opt["round_to"]] = m
        a, b = copy.deepcopy(base), copy.deepcopy(pruned_cache[opt["round_to"]])
        macs_a, macs_b = count_macs(a, x1), count_macs(b, x1)
        with torch.no_grad():
            ref_a, ref_b = a(x), b(x)
        t0 = time.perf_counter()
        if opt != _variant(round_to=opt["round_to"]):
            kw = {k: opt[k] for k in ("fold_bn", "memory_format", "kernels", "backend")}
            a = optimize_for_inference(a, example_inputs=x, **kw)
            b = optimize_for_inference(b, example_inputs=x, **kw)
        prep_s = time.perf_counter() - t0
        xi = to_memory_format(x, opt["memory_format"])
        with torch.inference_mode():
            err = max((a(xi) - ref_a).abs().max().item(), (b(xi) - ref_b).abs().max().item())
        ta, tb = latency_pair(a, b, xi, repeats=repeats)
        if v == "plain":
            plain_unpruned_ms = ta
        macs_gain, lat_gain = macs_a / macs_b, ta / tb
        rows.append(
            {
                "model": name,
                "input": "x".join(map(str, x.shape)),
                "batch": batch,
                "variant": v,
                "threads": torch.get_num_threads(),
                "macs_unpruned": macs_a,
                "macs_pruned": macs_b,
                "latency_unpruned_ms": round(ta, 3),
                "latency_pruned_ms": round(tb, 3),
                "macs_gain": round(macs_gain, 3),
                "latency_gain": round(lat_gain, 3),
                "latency_gain_over_macs_gain": round(lat_gain / macs_gain, 3),
                "pruned_speedup_vs_plain_unpruned": round(plain_unpruned_ms / tb, 3)
                if plain_unpruned_ms
                else "",
                "max_abs_diff_vs_eager": f"{err:.1e}",
                "prepare_s": round(prep_s, 2),
            }
        )
        print(rows[-1], flush=True)
        if profile and v in PROFILED:
            for which, m in (("unpruned", a), ("pruned", b)):
                p = profile_ops(m, xi)
                prof_rows.append({"model": name, "batch": batch, "variant": v, "network": which} | {
                    k: round(val, 3) for k, val in p.items()
                })  # fmt: skip
    return rows, prof_rows


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # not timed: oneDNN creates its primitive on the first call
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def kernel_microbenchmark(repeats: int = 10) -> list[dict]:
    """One 3x3(x3) conv (C -> C) and one 3/2 max pool at batch 1: PyTorch's default kernel vs oneDNN."""
    aten = torch.ops.aten
    rows = []
    for dims, size in ((3, 16), (3, 32), (2, 28)):
        for c in (4, 8, 16, 32, 64):
            x, w = torch.randn(1, c, *([size] * dims)), torch.randn(c, c, *([3] * dims))
            conv = nn.functional.conv3d if dims == 3 else nn.functional.conv2d
            ones = [1] * dims
            default = _median_ms(lambda: conv(x, w, None, 1, 1), repeats)  # noqa: B023 (called in this iteration)
            onednn = _median_ms(lambda: aten.mkldnn_convolution(x, w, None, ones, ones, ones, 1), repeats)  # noqa: B023
            flop = 2 * c * c * 3**dims * size**dims
            rows.append(
                {
                    "layer": f"{dims}D conv {size}^{dims}",
                    "channels": c,
                    "default_ms": round(default, 3),
                    "onednn_ms": round(onednn, 3),
                    "default_gflops": round(flop / default / 1e6, 1),
                    "onednn_gflops": round(flop / onednn / 1e6, 1),
                }
            )
    for c in (4, 8, 16, 32, 64):
        x = torch.randn(1, c, 32, 32, 32)
        pool = nn.MaxPool3d(3, 2, 1)
        rows.append(
            {
                "layer": "3D max pool 32^3",
                "channels": c,
                "default_ms": round(_median_ms(lambda: pool(x), repeats), 3),  # noqa: B023
                "onednn_ms": round(_median_ms(lambda: pool(x.to_mkldnn()).to_dense(), repeats), 3),  # noqa: B023
            }
        )
    return rows


def _summary(rows: list[dict], best: str = "fold BN + auto kernels + jit") -> list[str]:
    """One line per model (batch 1): the ratio plain vs ``best``, and what ``best`` did to both networks."""
    by = {(r["model"], r["variant"]): r for r in rows if r.get("batch") == 1}
    out = []
    for model in dict.fromkeys(m for m, _ in by):
        p, b = by.get((model, "plain")), by.get((model, best))
        if not (p and b):
            continue
        same_net = [
            r for (m, _), r in by.items() if m == model and r["macs_gain"] == p["macs_gain"]
        ]  # not round_to
        top = max(same_net, key=lambda r: r["latency_gain_over_macs_gain"])
        out.append(
            f"- {model}: gain / MACs gain {p['latency_gain_over_macs_gain']:.2f} plain, "
            f"{b['latency_gain_over_macs_gain']:.2f} with {best} (pruned {p['latency_pruned_ms']:.2f} -> "
            f"{b['latency_pruned_ms']:.2f} ms, unpruned {p['latency_unpruned_ms']:.2f} -> "
            f"{b['latency_unpruned_ms']:.2f} ms); best row {top['latency_gain_over_macs_gain']:.2f} ({top['variant']})"
        )
    if out:
        out = ["Summary, batch 1 (goal 0.8):", "", *out, ""]
    return out


def _num(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def _markdown(rows, prof_rows, kernels, command, minutes, load0, load1) -> str:
    lines = [
        "## Inference latency (CPU) vs MACs, 50 % of channels removed",
        "",
        f"Command: `{command}` ({minutes:.1f} min; load average {load0:.1f} at start, {load1:.1f} at end"
        + (
            ": the machine was shared, so absolute times are noisy; pruned and unpruned are interleaved so their "
            "ratio is less so"
            if max(load0, load1) > 0.5
            else ""
        )
        + "). Gain = unpruned / pruned; goal: latency gain >= 0.8 x MACs gain. In every variant both networks get "
        "the same treatment (folded, converted, kernel choice measured for each, traced). `auto kernels` = "
        '`optimize_for_inference(kernels="auto")`: per conv and pooling layer, the faster of PyTorch\'s default '
        'kernel and oneDNN, timed on the real input; `jit` = `backend="jit"` (trace + `torch.jit.freeze`). "pruned vs plain '
        "unpruned\" = plain unpruned latency / this variant's pruned latency (what a user gains by pruning *and* "
        "optimising). All outputs equal the eager model's within 1e-4 (column max_abs_diff_vs_eager in "
        "benchmarks/results/latency.csv).",
        "",
    ]
    for batch in sorted({r["batch"] for r in rows if "batch" in r}):
        lines += [
            f"Batch {batch}:",
            "",
            "| model | variant | MACs gain | unpruned ms | pruned ms | latency gain | gain / MACs gain "
            "| pruned vs plain unpruned |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r.get("batch") != batch:
                continue
            lines.append(
                f"| {r['model']} | {r['variant']} | {r['macs_gain']:.2f} | {r['latency_unpruned_ms']:.2f} | "
                f"{r['latency_pruned_ms']:.2f} | {r['latency_gain']:.2f} | **{r['latency_gain_over_macs_gain']:.2f}** "
                f"| {_num(r['pruned_speedup_vs_plain_unpruned'])} |"
            )
        lines.append("")
    for r in rows:
        if "batch" not in r:
            lines.append(f"- {r['model']}: {r['variant']}")
    if prof_rows:
        lines += [
            "Where the time goes (torch.profiler self CPU ms per forward, unpruned / pruned, gain in brackets; "
            "oneDNN conv includes `aten::_convolution`, inside which oneDNN transposed convs run; memory-bound = "
            "norms, activations, adds, concatenations, pooling, copies and layout conversions; other = allocation, "
            "views and dispatch; Python time is in no column; the profiler adds overhead, wall = median without it):",
            "",
            "| model | batch | variant | native conv | oneDNN conv | memory-bound ops | other | wall |",
            "|---|---|---|---|---|---|---|---|",
        ]
        keyed = {(p["model"], p["batch"], p["variant"], p["network"]): p for p in prof_rows}
        for (model, batch, variant, network), p in keyed.items():
            if network != "unpruned":
                continue
            q = keyed[(model, batch, variant, "pruned")]
            cells = []
            for k in ("native conv", "oneDNN conv", "memory-bound ops", "other", "wall"):
                gain = f" ({p[k] / q[k]:.1f}x)" if q[k] > 0.005 else ""
                cells.append(f"{p[k]:.2f} / {q[k]:.2f}{gain}")
            lines.append(f"| {model} | {batch} | {variant} | " + " | ".join(cells) + " |")
        lines.append("")
    if kernels:
        lines += [
            "One layer at batch 1 (conv 3x3 or 3x3x3, C -> C channels; max pool 3, stride 2): PyTorch's default "
            "kernel vs oneDNN, ms (GFLOP/s). At batch 1 PyTorch picks its native im2col + GEMM conv kernel when "
            "N x C x D x H <= 20480 (`use_mkldnn`, ATen Convolution.cpp; for 3D convs W is not in the product), "
            "else oneDNN; its max pool never uses oneDNN on ordinary tensors:",
            "",
            "| layer | " + " | ".join(f"C={c}" for c in sorted({k["channels"] for k in kernels})) + " |",
            "|---|" + "---|" * len({k["channels"] for k in kernels}),
        ]
        for layer in dict.fromkeys(k["layer"] for k in kernels):
            ks = [k for k in kernels if k["layer"] == layer]
            for label, t, g in (
                ("default", "default_ms", "default_gflops"),
                ("oneDNN", "onednn_ms", "onednn_gflops"),
            ):
                cells = [f"{k[t]:.3f}" + (f" ({k[g]:.0f})" if g in k else "") for k in ks]
                lines.append(f"| {layer}, {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += _summary(rows) + WHY
    return "\n".join(lines)


WHY = [
    "Why the latency gain stays below the MACs gain, and what `optimize_for_inference` fixes:",
    "",
    '1. **Kernel dispatch (fixed by `kernels="auto"`).** At batch 1 most 3D convs of these nets, pruned or not, '
    "fall under PyTorch's threshold and run the native im2col + GEMM kernel (`slow_conv3d_forward`, the "
    '"native conv" column: 75-85 % of the profiled time of every plain 3D forward). It is 3-8x slower than oneDNN '
    "on the same conv (layer table) and its throughput falls with the channel count (5-23 GFLOP/s at 4-16 "
    "channels, 35-65 at 32-64), so the native conv time fell only ~2-3x for 3.2-5x fewer MACs. PyTorch's "
    "max pool on NCDHW tensors is 3-6x slower "
    "than oneDNN's as well (MONAI resnet18: 14 ms of its 32^3 stem). Choosing the faster kernel per layer cuts "
    "the latency of pruned and unpruned 3D nets alike, so the ratio barely moves.",
    "2. **Narrow layers (not fixable by dispatch).** Below ~16 channels a CPU conv's time follows memory traffic "
    "and per-call cost, not MACs: oneDNN computes in 16-channel (AVX-512) blocks, so a 3D conv going 4 -> 8 -> 16 "
    "channels does 4x the MACs per step for 1.5-1.9x the time (32 -> 64: ~3.7x), and every oneDNN call costs "
    "~50-70 us however small (2D rows); the native kernel's im2col buffer scales with input channels only. The "
    "benchmark's ResNets (3D widths 8-64 -> 4-32, 2D 16-128 -> 8-64), UNet's first stages and DenseNet's "
    "growth-rate convs (32 -> ~16 outputs) live there. MONAI resnet18 (64-512 -> 32-256) does not, and it "
    "reaches the 0.8 goal with channels_last + auto kernels + jit at batch 1 (0.75-0.83 at batch 8 over runs). Batch 8 does not help (its table): what "
    "drops is each narrow layer's efficiency, not a per-forward constant.",
    "3. **Unprunable full-resolution layers.** UNet's last up-block (ConvTranspose to 2 channels at 32^3 and "
    "its 2 -> 2 residual-unit conv) and the 1-channel input convs keep their size: in the plain pruned UNet they "
    "are ~16 % of the MACs but ~37 % of the conv time (per-layer timing in a separate run: 3.0 of 8.0 ms; the "
    "2 -> 2 conv at 32^3 alone 2.4 ms, 3 GFLOP/s). With auto kernels they take 1.2 of 4.2 ms.",
    '4. **Framework overhead (fixed by `backend="jit"`).** A small net spends ~0.3 ms per forward in Python '
    "module calls that pruning does not shrink (2D benchmark ResNet, pruned: ~0.65 ms eager with BN folded, "
    "~0.35 ms as a frozen trace). Elementwise ops (norms, activations, adds, concatenations, pooling) are "
    "7-19 % of the profiled time of a plain forward and gain only 1.4-1.9x (they scale with channels, 2x, not MACs, 4x); BatchNorm folding "
    "and oneDNN pooling shrink them further, so they are a minor term.",
    "",
    "Tried and not kept: `torch.jit.optimize_for_inference` (whole subgraphs in oneDNN layout with conversions "
    "between them: slower than auto kernels + jit on 4 of 5 nets, e.g. pruned DenseNet 15.6 vs 9.3 ms); "
    "`torch.compile` (inductor, with or without `freezing`: 5-100 s to compile a pair, and slower than auto "
    "kernels + jit on every pruned net tried, e.g. UNet 5.1-5.6 vs 4.1 ms, DenseNet 12.5 vs 9.2 ms; the direct "
    "oneDNN conv op has no fake-tensor kernel, so the two cannot be combined); `round_to=8` (no latency gain on "
    "these kernels, and it keeps 8-wide stages unpruned). Single rows can swing by +-0.1-0.2 in the ratio on a "
    "loaded machine; compare a model's variants within one run.",
]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes to time (e.g. 1 8)")
    p.add_argument("--no-profile", action="store_true", help="skip the per-op profile and kernel table")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--no-md", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    models = _models()
    names = args.models or list(models)
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    rows: list[dict] = []
    prof_rows: list[dict] = []
    for batch in args.batch:
        for n in names:
            try:
                r, pr = measure(n, *models[n], args.repeats, args.variants, batch, not args.no_profile)
                rows += r
                prof_rows += pr
            except Exception as e:  # report a network torch-pruning cannot handle instead of stopping
                print(f"[fail] {n}: {type(e).__name__}: {e}", flush=True)
                rows.append({"model": n, "variant": f"FAILED: {type(e).__name__}: {str(e)[:120]}"})
    kernels = [] if args.no_profile else kernel_microbenchmark()
    args.out.mkdir(parents=True, exist_ok=True)
    _write_csv(args.out / "latency.csv", rows)
    _write_csv(args.out / "latency_profile.csv", prof_rows)
    _write_csv(args.out / "latency_kernels.csv", kernels)
    command = f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/latency.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    md = _markdown(
        rows,
        prof_rows,
        kernels,
        command.strip(),
        (time.perf_counter() - t0) / 60,
        load0[0],
        os.getloadavg()[0],
    )
    print(md)
    if not args.no_md:
        from mdsections import update_section

        update_section("latency", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
