"""Measured forward time of every prunable layer as a function of its channel counts, cached on disk."""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

from monai_iaprune.pruning.cost import ChannelCost
from monai_iaprune.pruning.monai_fixes import monai_pruning_fixes, pruning_setup
from monai_iaprune.relevance.layers import PRUNABLE_TYPES
from monai_iaprune.utils.outputs import file_mode_for

DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
CACHE_FILE = "latency_table.json"
CALIBRATION_RATIO = (
    0.5  # the uniformly narrowed copy timed to fit the non-layer time (``measure_latency_table``)
)


def _check_device(device: torch.device | str, threads: int | None) -> tuple[torch.device, int | None]:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"bad device {device!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"latency tables are measured on 'cpu' or 'cuda', not {device.type!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        if threads is not None:
            raise ValueError("threads applies to CPU measurement only; leave it None for CUDA")
        return device, None
    if threads is None:
        threads = torch.get_num_threads()
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    return device, threads


def _device_key(device: torch.device, threads: int | None) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return f"{device.type}:{name}|torch {torch.__version__}|threads {threads}"


@contextmanager
def _num_threads(threads: int | None):
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def _time_call(fn: nn.Module, x: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn(x)`` over ``repeats`` calls after one warm-up (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn(x)
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _resized(layer: nn.Module, cin: int, cout: int) -> nn.Module:
    """A fresh layer like ``layer`` with ``cin`` input and ``cout`` output channels."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(cin, cout, bias=layer.bias is not None)
    groups = layer.groups
    if groups > 1:  # depthwise stays depthwise; other grouped convs keep their group count
        groups = cin if groups == layer.in_channels else groups
    kwargs = dict(
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=groups,
        bias=layer.bias is not None,
        padding_mode=layer.padding_mode,
    )
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        kwargs["output_padding"] = layer.output_padding
    return type(layer)(cin, cout, layer.kernel_size, **kwargs)


def _grid(n: int, fractions: Sequence[float], multiple: int) -> list[int]:
    return sorted({max(multiple, multiple * round(f * n / multiple)) for f in fractions} | {n})


def _cummax(grid: list[list[float]]) -> list[list[float]]:
    """Make a table non-decreasing in both channel counts (measurement noise must not reward width)."""
    out = [row[:] for row in grid]
    for i in range(len(out)):
        for j in range(len(out[i])):
            out[i][j] = max(out[i][j], out[i - 1][j] if i else 0.0, out[i][j - 1] if j else 0.0)
    return out


def _interp(grid: list[int], value: float) -> tuple[int, int, float]:
    if value <= grid[0]:
        return 0, 0, 0.0
    if value >= grid[-1]:
        return len(grid) - 1, len(grid) - 1, 0.0
    k = next(i for i in range(1, len(grid)) if grid[i] >= value)
    return k - 1, k, (value - grid[k - 1]) / (grid[k] - grid[k - 1])


@dataclass
class LayerLatency:
    """Seconds of one layer's forward on its real input, measured on a grid of (in, out) channel counts.

    Attributes:
        in_channels, out_channels: the grid (ascending, ending at the layer's current counts).
        seconds: ``seconds[i][j]`` at ``in_channels[i]``, ``out_channels[j]``; non-decreasing in both.
        out_elements: elements of the layer's output per output channel (batch and spatial size), the
            activation that the norms, activations and sums after it process.
    """

    in_channels: list[int]
    out_channels: list[int]
    seconds: list[list[float]]
    out_elements: float = 0.0

    def __call__(self, cin: float, cout: float) -> float:
        """Bilinear interpolation (constant beyond the grid), monotone in both channel counts."""
        i0, i1, a = _interp(self.in_channels, cin)
        j0, j1, b = _interp(self.out_channels, cout)
        s = self.seconds
        return (1 - a) * ((1 - b) * s[i0][j0] + b * s[i0][j1]) + a * ((1 - b) * s[i1][j0] + b * s[i1][j1])


@dataclass
class LatencyTable:
    """Per-layer latency tables of one network at one input size on one device.

    Network seconds = ``overhead`` + the layers' table times + ``activation_seconds`` x the elements the
    layers output. The time outside the conv / linear layers (norms, activations, residual sums,
    concatenations, pooling, Python) is thus a constant plus a part proportional to the activations, which
    shrink with the channels (fitted by ``measure_latency_table`` on the full network and a uniformly narrowed
    copy). Kept constant, as before, it made a 2x request measure 2.3-3.1x on the 28^2 ResNet-18s
    (BENCHMARKS.md, compute budgets).

    Attributes:
        layers: ``{layer name: LayerLatency}`` for every conv / linear layer run on the example input.
        overhead: the constant part of the time outside the layers (seconds).
        device: the device key (device, torch version, threads) the table was measured under.
        activation_seconds: seconds per output element of a layer spent outside the layers (0: the whole
            non-layer time is the constant ``overhead``).
    """

    layers: dict[str, LayerLatency]
    overhead: float
    device: str
    activation_seconds: float = 0.0

    def estimate(self, channels: Mapping[str, tuple[int, int]]) -> float:
        """Estimated network seconds for ``{layer name: (in channels, out channels)}`` (missing: full width)."""
        total = self.overhead
        for name, t in self.layers.items():
            cin, cout = channels.get(name, (t.in_channels[-1], t.out_channels[-1]))
            total += t(cin, cout) + self.activation_seconds * t.out_elements * cout
        return total

    def estimate_model(self, model: nn.Module) -> float:
        """Estimated seconds of ``model`` (e.g. a pruned copy) from its layers' current channel counts."""
        modules = dict(model.named_modules())
        return self.estimate({n: _channels(modules[n]) for n in self.layers if n in modules})

    def channel_cost(self, cost: ChannelCost) -> float:
        """Seconds saved per channel removed from a group: mean slope over the table of its members, plus the
        non-layer time of each producer's output channel (``activation_seconds``)."""
        saved = 0.0
        for name in cost.out_layers:
            t = self.layers.get(name)
            if t is not None:
                cin, cout = t.in_channels[-1], t.out_channels[-1]
                saved += (t(cin, cout) - t(cin, t.out_channels[0])) / max(cout - t.out_channels[0], 1)
                saved += self.activation_seconds * t.out_elements
        for name in cost.in_layers:
            t = self.layers.get(name)
            if t is not None:
                cin, cout = t.in_channels[-1], t.out_channels[-1]
                saved += (t(cin, cout) - t(t.in_channels[0], cout)) / max(cin - t.in_channels[0], 1)
        return saved


def _channels(m: nn.Module) -> tuple[int, int]:
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features
    return m.in_channels, m.out_channels


def _fit_non_layer_time(points: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """``(overhead, activation_seconds)`` of ``non-layer seconds = overhead + activation_seconds * elements``.

    ``points``: ``(whole-network seconds, the layers' table seconds, output elements)`` of the full network
    first, then narrowed copies. A least-squares line through them, kept non-negative: a slope that is not
    positive (timing noise) leaves the whole non-layer time constant, a negative intercept puts it all in the
    slope. With the full network alone it is the constant ``overhead`` of earlier versions.
    """
    rest = [(max(total - layers, 0.0), elements) for total, layers, elements in points]
    full_rest, full_elements = rest[0]
    if len(rest) < 2:
        return full_rest, 0.0
    mean_e = statistics.fmean(e for _, e in rest)
    mean_r = statistics.fmean(r for r, _ in rest)
    var = sum((e - mean_e) ** 2 for _, e in rest)
    slope = sum((e - mean_e) * (r - mean_r) for r, e in rest) / var if var > 0 else 0.0
    if not slope > 0 or not math.isfinite(slope):
        return full_rest, 0.0
    intercept = (
        full_rest - slope * full_elements
    )  # through the full network's point: the estimate is exact there
    if intercept < 0:
        return 0.0, full_rest / full_elements if full_elements else 0.0
    return intercept, slope


def _narrowed(model: nn.Module, example_inputs: torch.Tensor, ratio: float) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of every prunable layer's channels removed (magnitude, layer by layer),
    output layers kept, as ``prune`` would leave them: the second point of the non-layer time fit."""
    net = copy.deepcopy(model).eval()
    net.requires_grad_(True)  # torch-pruning traces through the autograd graph (frozen layers too)
    with torch.enable_grad():  # measure_latency_table runs under no_grad
        ignored, extra = pruning_setup(net, example_inputs)
    with torch.enable_grad(), monai_pruning_fixes(net):
        pruner = tp.pruner.MetaPruner(
            net,
            example_inputs,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=ratio,
            global_pruning=False,
            ignored_layers=ignored,
            **extra,
        )
        pruner.step()
    net.requires_grad_(False)
    with torch.no_grad():
        net(example_inputs)  # a narrowing torch-pruning mapped wrongly fails here, not in the timing
    return net


def _signature(m: nn.Module, shape: torch.Size, fractions: Sequence[float], repeats: int) -> str:
    return f"{m!r}|input {tuple(shape)}|fractions {tuple(fractions)}|repeats {repeats}"


def default_cache_dir() -> Path:
    return Path(os.environ.get("MONAI_IAPRUNE_CACHE", Path.home() / ".cache" / "monai_iaprune"))


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    repeats: int = 10,
) -> float:
    """Median seconds of one forward of ``model`` on ``example_inputs`` on ``device`` (``threads`` on CPU).

    Moves ``model`` to ``device`` and puts it in eval mode.
    """
    device, threads = _check_device(device, threads)
    model.eval().to(device)
    with _num_threads(threads):
        return _time_call(model, example_inputs.to(device), device, repeats)


@torch.no_grad()
def measure_latency_pair(
    first: nn.Module,
    second: nn.Module,
    example_inputs: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    repeats: int = 10,
) -> tuple[float, float]:
    """Median seconds of one forward of ``first`` and of ``second``, timed interleaved (call for call), so that a
    change of load or clock hits both and their ratio, a speed-up, stays honest.

    Moves both models to ``device`` and puts them in eval mode.
    """
    device, threads = _check_device(device, threads)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    models = [first.eval().to(device), second.eval().to(device)]
    x = example_inputs.to(device)
    times: list[list[float]] = [[], []]
    with _num_threads(threads):
        for m in models:
            m(x)
        sync()
        for _ in range(repeats):
            for m, t in zip(models, times):
                start = time.perf_counter()
                m(x)
                sync()
                t.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


@torch.no_grad()
def measure_latency_table(
    model: nn.Module,
    example_inputs: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    threads: int | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    repeats: int = 10,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> LatencyTable:
    """Measure (or read from the cache) each conv / linear layer's forward time over its channel counts.

    Every layer is rebuilt at ``len(fractions)``^2 (in, out) channel counts (fractions of its current ones)
    and timed on a random input of its real input size (recorded on one forward of ``example_inputs``);
    the grid is made monotone and interpolated bilinearly. Entries are cached in
    ``cache_dir/latency_table.json`` under the device (name, torch version, thread count) and a layer
    signature (layer repr, input shape, fractions, repeats), so a second call measures nothing. The time
    outside the layers is fitted from two whole-network timings: the network, and a copy with
    ``CALIBRATION_RATIO`` of every prunable layer's channels removed (``LatencyTable``: a constant ``overhead``
    plus ``activation_seconds`` per layer output element); a network torch-pruning cannot narrow keeps the
    constant overhead alone, with a warning. Timings on a loaded machine are noise.

    Args:
        model: the network (not modified; layers are rebuilt fresh).
        example_inputs: one batch at the inference size.
        device: ``"cpu"`` or ``"cuda"`` (``"cuda:1"``...).
        threads: CPU threads to measure with (default: the current ``torch.get_num_threads()``); must be
            ``None`` for CUDA.
        fractions: channel fractions in (0, 1]; the full width is always included.
        repeats: timed calls per point (median).
        cache_dir: where ``latency_table.json`` lives; default ``$MONAI_IAPRUNE_CACHE`` or
            ``~/.cache/monai_iaprune``.
        progress: show a tqdm bar over the layers measured.

    Raises:
        ValueError: bad device, thread count or fractions.
    """
    device, threads = _check_device(device, threads)
    if not fractions or any(not 0.0 < float(f) <= 1.0 for f in fractions):
        raise ValueError(f"fractions must lie in (0, 1], got {fractions!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    key = _device_key(device, threads)
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    file = path / CACHE_FILE
    cache = json.loads(file.read_text()) if file.exists() else {}
    entries = cache.setdefault(key, {})
    shapes: dict[str, torch.Size] = {}
    out_shapes: dict[str, torch.Size] = {}
    layers = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}

    def record(name: str):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            shapes.setdefault(name, args[0].shape)
            out_shapes.setdefault(name, output.shape)

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in layers.items()]
    was_training = model.training
    try:
        model.eval()(example_inputs.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    todo = [n for n in shapes if _signature(layers[n], shapes[n], fractions, repeats) not in entries]
    net_key = f"network v2 {type(model).__name__}|narrowed {CALIBRATION_RATIO}|" + "|".join(
        _signature(layers[n], shapes[n], fractions, repeats) for n in shapes
    )
    changed = False
    with _num_threads(threads):
        for name in tqdm(todo, desc="latency table", disable=not progress):
            m = layers[name]
            cin_full, cout_full = _channels(m)
            multiple = m.groups if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 else 1
            grid_in = _grid(cin_full, fractions, multiple)
            grid_out = _grid(cout_full, fractions, multiple)
            seconds = []
            for cin in grid_in:
                row = []
                for cout in grid_out:
                    layer = _resized(m, cin, cout).to(device).eval()
                    shape = list(shapes[name])
                    shape[-1 if isinstance(m, nn.Linear) else 1] = cin
                    row.append(_time_call(layer, torch.randn(shape, device=device), device, repeats))
                seconds.append(row)
            entries[_signature(m, shapes[name], fractions, repeats)] = {
                "in_channels": grid_in,
                "out_channels": grid_out,
                "seconds": _cummax(seconds),
            }
            changed = True
        if net_key not in entries:
            entries[net_key] = _time_whole_network(model, example_inputs, device, repeats, list(shapes))
            changed = True
    if changed:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path, delete=False, suffix=".tmp") as f:
            json.dump(cache, f)
            os.fchmod(f.fileno(), file_mode_for(file))
        os.replace(f.name, file)
    table = {}
    for n in shapes:
        t = LayerLatency(**entries[_signature(layers[n], shapes[n], fractions, repeats)])
        cout = t.out_channels[-1]
        t.out_elements = out_shapes[n].numel() / cout if isinstance(out_shapes[n], torch.Size) else 0.0
        table[n] = t
    layer_time = LatencyTable(table, 0.0, key)
    record = entries[net_key]
    points = [(record["full"], layer_time.estimate({}), _elements(table, {}))]
    if "narrow" in record:
        narrow = {n: tuple(c) for n, c in record["narrow_channels"].items()}
        points.append((record["narrow"], layer_time.estimate(narrow), _elements(table, narrow)))
    overhead, per_element = _fit_non_layer_time(points)
    return LatencyTable(table, overhead, key, per_element)


def _elements(table: Mapping[str, LayerLatency], channels: Mapping[str, tuple[int, int]]) -> float:
    """Output elements of the layers at ``channels`` (missing: full width)."""
    return sum(t.out_elements * channels.get(n, (0, t.out_channels[-1]))[1] for n, t in table.items())


def _time_whole_network(
    model: nn.Module, example_inputs: torch.Tensor, device: torch.device, repeats: int, names: list[str]
) -> dict:
    """Median seconds of ``model`` and of its ``_narrowed`` copy (with the copy's channels of ``names``)."""
    net = copy.deepcopy(model).eval().to(device)
    x = example_inputs.to(device)
    record: dict = {"full": _time_call(net, x, device, repeats)}
    try:
        narrow = _narrowed(net, x, CALIBRATION_RATIO)
    except Exception as e:  # noqa: BLE001 - any failure of torch-pruning on an unusual network: keep the constant
        warnings.warn(
            f"{type(model).__name__} could not be narrowed to fit its non-layer latency ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); the time outside its conv / linear layers is taken as "
            "constant, which overestimates what pruning must remove for a speed-up",
            stacklevel=3,
        )
        return record
    record["narrow"] = _time_call(narrow, x, device, repeats)
    modules = dict(narrow.named_modules())
    record["narrow_channels"] = {n: list(_channels(modules[n])) for n in names if n in modules}
    return record
