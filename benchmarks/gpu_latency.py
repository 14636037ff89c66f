"""GPU latency of pruned MONAI networks vs their unpruned copies, against the MACs they save.

The five networks and the pruning recipe of ``benchmarks/latency.py`` (50 % of channels, ``target="channels"``,
magnitude criterion; pruned on the CPU, then both copies moved to the device), at batch 1 and 8, in three
variants: ``fp32`` (PyTorch defaults: cuDNN may run float32 convs in TF32, the flags are recorded),
``fp32 cudnn.benchmark`` (cuDNN autotunes each conv shape on its first call) and ``bf16 autocast``
(``torch.autocast(dtype=torch.bfloat16)`` with ``cudnn.benchmark``). Unpruned and pruned forwards are
interleaved under ``torch.inference_mode``; each call is timed wall-clock between ``torch.cuda.synchronize``
calls (the latency a caller sees, launch overhead included) and by CUDA events (GPU time); medians after a
warm-up. A time budget stops early (rows written so far are kept) so the run fits a short GPU lease.

Usage (repository root): ``python benchmarks/gpu_latency.py [--out DIR] [--repeats 50] [--batch 1 8]``;
a CPU smoke test of the same code: ``python benchmarks/gpu_latency.py --device cpu --repeats 3 --out /tmp/g``.
Writes ``DIR/latency_gpu.csv`` and ``DIR/latency_gpu.json`` (torch / CUDA / cuDNN versions, GPU name, flags)
and prints a Markdown table (also ``DIR/latency_gpu.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import platform
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

VARIANTS = {  # name: (cudnn.benchmark, autocast dtype, CUDA graph)
    "fp32": (False, None, False),
    "fp32 cudnn.benchmark": (True, None, False),
    "bf16 autocast": (True, torch.bfloat16, False),
    "fp32 cuda graph": (True, None, True),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def time_pair(
    a: nn.Module,
    b: nn.Module,
    x: torch.Tensor,
    repeats: int,
    warmup: int,
    autocast_dtype: torch.dtype | None = None,
    graph: bool = False,
) -> dict[str, float]:
    """Median ms per forward of ``a`` and ``b`` on ``x``, interleaved: wall-clock (synchronized) and GPU (events).

    With ``graph`` (CUDA only), each network's forward is captured once in a CUDA graph and replayed: the CPU's
    per-kernel launch cost, which dominates small networks at small batches, is gone from the timing.
    """
    device = x.device
    cuda = device.type == "cuda"
    if graph and cuda:
        a, b = _graphed(a, x, warmup), _graphed(b, x, warmup)
    wall: dict[str, list[float]] = {"a": [], "b": []}
    gpu: dict[str, list[float]] = {"a": [], "b": []}
    with _autocast(device, autocast_dtype):
        for _ in range(warmup):  # cudnn.benchmark tunes here; allocator and kernels warm up
            a(x)
            b(x)
        _sync(device)
        for _ in range(repeats):
            for key, model in (("a", a), ("b", b)):
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t = time.perf_counter()
                if cuda:
                    start.record()
                model(x)
                if cuda:
                    end.record()
                _sync(device)
                wall[key].append(1000 * (time.perf_counter() - t))
                if cuda:
                    gpu[key].append(start.elapsed_time(end))
    out = {"base_ms": statistics.median(wall["a"]), "pruned_ms": statistics.median(wall["b"])}
    if cuda:
        out |= {"base_gpu_ms": statistics.median(gpu["a"]), "pruned_gpu_ms": statistics.median(gpu["b"])}
    return out


def _graphed(model: nn.Module, x: torch.Tensor, warmup: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` captured in a CUDA graph on a static copy of ``x``; the returned callable replays it."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(3, warmup)):
            model(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = model(static_x)

    def replay(inp: torch.Tensor) -> torch.Tensor:
        static_x.copy_(inp)
        g.replay()
        return static_y

    return replay


def pruned_pair(
    factory: Callable[[], nn.Module], shape: tuple[int, ...], round_to: int | None = None
) -> tuple[nn.Module, nn.Module, float]:
    """The unpruned network and its copy with 50 % of channels removed (latency.py's recipe), on the CPU, and the
    MACs ratio unpruned / pruned at ``shape``."""
    from monai_iaprune import channel_relevance, prune
    from monai_iaprune.pruning.prune import count_macs

    torch.manual_seed(0)
    base = factory().eval()
    x1 = torch.randn(*shape)
    rel = channel_relevance(base, None, "magnitude", progress=False)
    pruned = copy.deepcopy(base)
    prune(pruned, rel, 0.5, target="channels", example_inputs=x1, round_to=round_to)
    return base, pruned.eval(), count_macs(base, x1) / count_macs(pruned, x1)


def environment(device: torch.device) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        from importlib import metadata

        for name in ("monai", "torch-pruning"):
            info[name] = metadata.version(name)
    except Exception as e:  # versions are informative only
        info["versions_error"] = repr(e)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "gpu": torch.cuda.get_device_name(device),
            "gpu_capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    return info


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        f"GPU latency, 50 % of channels removed ({info.get('gpu', info['device'])}, torch {info['torch']}; "
        "median ms per forward, wall-clock between synchronizations; speed-up = base / pruned):",
        "",
        "| model | input | variant | MACs ratio | base ms | pruned ms | speed-up | speed-up / MACs gain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "speedup" not in r:
            lines.append(
                f"| {r['model']} | {r.get('input', '')} | {r.get('variant', '')} | {r['status']} |||||"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['input']} | {r['variant']}{' round_to ' + str(r['round_to']) if r.get('round_to') else ''} | {r['macs_ratio']:.2f} | {r['base_ms']:.3f} | "
            f"{r['pruned_ms']:.3f} | {r['speedup']:.2f} | **{r['speedup_over_macs_gain']:.2f}** |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results", help="output folder")
    p.add_argument("--models", nargs="+", default=None, help="subset of latency.py's models")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=50, help="timed forwards per network (median)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--size", type=int, default=None, help="spatial size of every input axis (default latency.py's)"
    )
    p.add_argument("--round-to", type=int, default=None, help="prune(round_to=...) for the pruned copy")
    p.add_argument("--budget-s", type=float, default=165.0, help="stop starting new models after this long")
    args = p.parse_args(argv)

    from latency import _models

    t0 = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu for a smoke test", file=sys.stderr)
        return 2
    models = _models()
    names = args.models or list(models)
    unknown = [n for n in names if n not in models]
    if unknown:
        p.error(f"unknown models {unknown}; choose from {list(models)}")
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "latency_gpu.csv"
    info = environment(device) | {
        "command": "python benchmarks/gpu_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "repeats": args.repeats,
        "warmup": args.warmup,
        "variants": {
            k: {"cudnn.benchmark": v[0], "autocast": str(v[1]), "cuda_graph": v[2]}
            for k, v in VARIANTS.items()
        },
    }
    print(json.dumps(info), flush=True)
    (args.out / "latency_gpu.json").write_text(json.dumps(info, indent=2) + "\n")  # rewritten at the end
    saved_benchmark = torch.backends.cudnn.benchmark
    rows: list[dict] = []
    for name in names:
        if time.perf_counter() - t0 > args.budget_s:
            rows.append({"model": name, "status": f"skipped: time budget {args.budget_s:.0f} s spent"})
            print(rows[-1], flush=True)
            continue
        factory, shape = models[name]
        if args.size:
            shape = (*shape[:2], *[args.size] * (len(shape) - 2))
        try:
            t_prune = time.perf_counter()
            base, pruned, macs_ratio = pruned_pair(factory, shape, args.round_to)
            prune_s = time.perf_counter() - t_prune
            base, pruned = base.to(device), pruned.to(device)
            for batch in args.batch:
                x = torch.randn(batch, *shape[1:], device=device)
                for variant in args.variants:
                    bench, dtype, graph = VARIANTS[variant]
                    if graph and device.type != "cuda":
                        continue
                    torch.backends.cudnn.benchmark = bench
                    try:
                        t = time_pair(base, pruned, x, args.repeats, args.warmup, dtype, graph)
                    finally:
                        torch.backends.cudnn.benchmark = saved_benchmark
                    speedup = t["base_ms"] / t["pruned_ms"]
                    rows.append(
                        {
                            "model": name,
                            "input": "x".join(map(str, x.shape)),
                            "batch": batch,
                            "variant": variant,
                            "round_to": args.round_to or "",
                            "macs_ratio": round(macs_ratio, 3),
                            **{k: round(v, 4) for k, v in t.items()},
                            "speedup": round(speedup, 3),
                            "speedup_over_macs_gain": round(speedup / macs_ratio, 3),
                            "gpu_time_speedup": round(t["base_gpu_ms"] / t["pruned_gpu_ms"], 3)
                            if "base_gpu_ms" in t
                            else "",
                            "prune_s": round(prune_s, 2),
                            "status": "ok",
                        }
                    )
                    print(rows[-1], flush=True)
                    _write_csv(csv_path, rows)  # kept if the run is stopped from outside
            del base, pruned
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:  # report a network that fails and go on with the others
            rows.append({"model": name, "status": f"FAILED: {type(e).__name__}: {str(e)[:200]}"})
            print(rows[-1], flush=True)
    info["wall_s"] = round(time.perf_counter() - t0, 1)
    if device.type == "cuda":
        info["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    _write_csv(csv_path, rows)
    (args.out / "latency_gpu.json").write_text(json.dumps(info, indent=2) + "\n")
    md = markdown(rows, info)
    (args.out / "latency_gpu.md").write_text(md)
    print(md)
    print(f"wrote {csv_path}, latency_gpu.json, latency_gpu.md ({info['wall_s']} s)")
    return 1 if any(r["status"].startswith("FAILED") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
