"""Cost of each relevance method on one batch, as a multiple of one forward + backward pass.

Networks: MONAI DenseNet121, 2D (input 4x1x64x64) and 3D (2x1x64^3), random weights, eval mode, two
classes, the explained output is class 0's logit. The reference "forward + backward" is one forward pass
and ``(selection * output).sum().backward()`` with parameter gradients, as in a training step. Each
registered method (``lrp``, ``ig``, ``dlb``, ``taylor``, ``magnitude``, ``random``) is timed on the same
batch through its per-batch function (what ``channel_relevance`` calls per batch), after one warm-up
call; the median of ``--repeats`` calls is reported. Methods not registered are reported as missing, and
a method that fails on a network is reported with its error.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/relevance_cost.py                 # both nets, 3 repeats
    OMP_NUM_THREADS=1 python benchmarks/relevance_cost.py --dims 2 --repeats 5
    python benchmarks/relevance_cost.py --device cuda --update-benchmarks-md

Writes ``benchmarks/results/relevance_cost.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from monai_iaprune.relevance.layers import prunable_layers  # noqa: E402
from monai_iaprune.relevance.registry import METHODS  # noqa: E402
from monai_iaprune.relevance.targets import target_selection  # noqa: E402

METHOD_ORDER = ("lrp", "ig", "dlb", "taylor", "magnitude", "random")
# ig_chunk: IG's internal_batch_size (rows of samples x path points per pass); 3D caps memory at ~3 points
CONFIGS = {
    2: {"name": "densenet121-2d", "input_shape": (4, 1, 64, 64), "ig_chunk": None},
    3: {"name": "densenet121-3d", "input_shape": (2, 1, 64, 64, 64), "ig_chunk": 6},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    fn: Callable[[], Any], repeats: int, device: torch.device, slow_s: float = float("inf")
) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn``, after one untimed warm-up call.

    Args:
        fn: the work to time.
        repeats: number of timed calls.
        device: synchronised before and after each call when it is a GPU.
        slow_s: when the warm-up call takes longer than this, time a single call only.
    """
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    if time.perf_counter() - t0 > slow_s:
        repeats = 1
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def forward_backward(
    model: nn.Module, x: torch.Tensor, select: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """One forward pass and the backward pass of the explained logit, with parameter gradients."""
    model.zero_grad(set_to_none=True)
    out = model(x)
    (select(out) * out).sum().backward()


def forward_backward_to_input(
    model: nn.Module, x: torch.Tensor, select: Callable[[torch.Tensor], torch.Tensor]
) -> None:
    """One forward pass and the backward pass to the input only (parameters frozen, as relevance methods do)."""
    from monai_iaprune.relevance.hooks import no_param_grad

    with no_param_grad(model):
        xi = x.detach().requires_grad_(True)
        out = model(xi)
        torch.autograd.grad((select(out) * out).sum(), xi)


def method_kwargs(name: str, n_steps: int, ig_chunk: int | None) -> dict[str, Any]:
    """Settings the methods are timed with (the project defaults, with IG's step count explicit)."""
    return {"n_steps": n_steps, "internal_batch_size": ig_chunk} if name == "ig" else {}


def bench_config(
    dims: int, methods: Sequence[str], repeats: int, n_steps: int, device: torch.device, slow_s: float
) -> dict[str, Any]:
    """Time the reference pass and every method on DenseNet121 of ``dims`` spatial dims.

    Args:
        dims: 2 or 3.
        methods: method names to time (unregistered ones are reported as missing).
        repeats: timed calls per method (median reported).
        n_steps: IG path steps.
        device: where to run.
        slow_s: a method whose warm-up call takes longer is timed once.
    """
    from monai.networks.nets import DenseNet121

    cfg = CONFIGS[dims]
    torch.manual_seed(0)
    model = DenseNet121(spatial_dims=dims, in_channels=1, out_channels=2).to(device).eval()
    x = torch.randn(*cfg["input_shape"], device=device)
    layers = prunable_layers(model)

    def select(output: torch.Tensor) -> torch.Tensor:
        return target_selection(output, None, 0)

    ref = timed(lambda: forward_backward(model, x, select), repeats, device)
    model.zero_grad(set_to_none=True)
    ref_s = statistics.median(ref)
    ref_in = timed(lambda: forward_backward_to_input(model, x, select), repeats, device)
    row: dict[str, Any] = {
        "input_shape": list(cfg["input_shape"]),
        "layers": len(layers),
        "forward_backward_s": ref_s,
        "forward_backward_repeats_s": ref,
        "forward_backward_to_input_s": statistics.median(ref_in),
        "ig_chunk": cfg["ig_chunk"],
        "methods": {},
    }
    print(
        f"{cfg['name']}: forward+backward {ref_s:.3f} s, to the input only {row['forward_backward_to_input_s']:.3f} s "
        f"({len(layers)} layers)",
        flush=True,
    )
    for name in methods:
        if name not in METHODS:
            row["methods"][name] = {"status": "missing"}
            print(f"  {name}: missing (not registered)", flush=True)
            continue
        fn = METHODS[name]
        kwargs = method_kwargs(name, n_steps, cfg["ig_chunk"])
        inputs = None if fn.data_free else x

        def call(fn=fn, inputs=inputs, kwargs=kwargs) -> None:
            fn(model, inputs, select, layers, **kwargs)

        try:
            times = timed(call, repeats, device, slow_s)
        except Exception as e:  # a method that cannot handle this net is reported, not fatal
            row["methods"][name] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:300]}
            print(f"  {name}: error {type(e).__name__}: {e}", flush=True)
            continue
        med = statistics.median(times)
        row["methods"][name] = {
            "status": "ok",
            "kwargs": kwargs,
            "median_s": med,
            "repeats_s": times,
            "ratio": med / ref_s,
        }
        print(f"  {name}: {med:.3f} s = {med / ref_s:.2f} x forward+backward", flush=True)
    return row


def markdown_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per method, one column per network (ratio to forward + backward)."""
    configs = results["configs"]
    names = list(configs)
    lines = [
        "| method | "
        + " | ".join(f"{n} ({'x'.join(map(str, configs[n]['input_shape']))})" for n in names)
        + " |",
        "|---|" + "---:|" * len(names),
        "| forward+backward, with parameter gradients (s) = 1x | "
        + " | ".join(f"{configs[n]['forward_backward_s']:.3f}" for n in names)
        + " |",
        "| forward+backward to the input only (s) | "
        + " | ".join(f"{configs[n]['forward_backward_to_input_s']:.3f}" for n in names)
        + " |",
    ]
    for m in results["methods"]:
        cells = []
        for n in names:
            r = configs[n]["methods"][m]
            if r["status"] == "ok":
                cells.append(f"{r['ratio']:.2f}x ({r['median_s']:.3f} s)")
            else:
                cells.append(r["status"])
        label = f"{m} (n_steps={results['n_steps']})" if m == "ig" else m
        if m == "ig" and any(
            configs[n]["methods"][m].get("kwargs", {}).get("internal_batch_size") for n in names
        ):
            label += " †"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    chunks = {n: c.get("ig_chunk") for n, c in configs.items() if c.get("ig_chunk")}
    if chunks:
        lines.append("")
        lines.append(
            "† IG run in chunks of "
            + ", ".join(f"{v} rows (samples x path points) on {n}" for n, v in chunks.items())
            + " to bound memory."
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dims", type=int, nargs="+", default=[2, 3], choices=[2, 3], help="which DenseNet121s")
    p.add_argument("--methods", nargs="+", default=list(METHOD_ORDER), help="methods to time")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per method (median reported)")
    p.add_argument("--n-steps", type=int, default=8, help="IG path steps")
    p.add_argument("--device", default="cpu", help="torch device")
    p.add_argument(
        "--slow-s", type=float, default=120.0, help="time a method once when its warm-up exceeds this"
    )
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "relevance_cost.json")
    p.add_argument("--update-benchmarks-md", action="store_true", help="write the table into BENCHMARKS.md")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device(args.device)
    results: dict[str, Any] = {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_start": os.getloadavg(),
        "repeats": args.repeats,
        "n_steps": args.n_steps,
        "methods": list(args.methods),
        "registered": sorted(METHODS),
        "configs": {},
    }
    for dims in args.dims:
        results["configs"][CONFIGS[dims]["name"]] = bench_config(
            dims, args.methods, args.repeats, args.n_steps, device, args.slow_s
        )
    results["load_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    table = markdown_table(results)
    print()
    print(table)
    print(f"\nwrote {args.out}")
    if args.update_benchmarks_md:
        from mdsections import update_section

        body = (
            "## Relevance cost\n\n"
            f"Time of one batch of each relevance method as a multiple of one forward + backward pass "
            f"(MONAI DenseNet121, random weights; {results['device']}, {results['threads']} thread(s), "
            f"median of {args.repeats}; `benchmarks/relevance_cost.py`).\n\n" + table
        )
        update_section("relevance_cost", body)
    return results


if __name__ == "__main__":
    main()
