"""Make a (pruned) network faster on CPU for inference: fold BatchNorm into convolutions, choose the faster
conv / pooling kernel per layer, memory format, TorchScript freezing.

Why a pruned network is slower than its MACs say (benchmarks/latency.py, BENCHMARKS.md "Inference latency"):
at batch 1 PyTorch's CPU dispatch (``use_mkldnn`` in ATen's Convolution.cpp) sends a conv to its native
im2col + GEMM kernel when ``N * C * D * H <= 20480``, which for 3D convs is 3-8x slower than oneDNN and
loses efficiency as channels shrink; below ~16 channels every CPU kernel is bound by memory traffic and
per-call cost rather than MACs; and a small network's Python / dispatch overhead does not shrink with pruning.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

_BN = nn.modules.batchnorm._BatchNorm
KERNELS = ("default", "onednn", "auto")
BACKENDS = ("eager", "jit")
_AUTO_REPEATS = 5  # timed calls per kernel and layer in kernels="auto" (median)
_AUTO_MARGIN = 0.9  # oneDNN must be at least 10 % faster than the default kernel to be chosen


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, BatchNorm name)`` pairs where the BatchNorm reads the conv output and nothing else does.

    Found on the ``torch.fx`` graph of ``model``; an empty list (with a warning) when ``model`` cannot be
    traced. Pre-activation BatchNorms (DenseNet's, which read a concatenation) are not paired.
    """
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:  # data-dependent control flow: leave the model as it is
        warnings.warn(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: {e}); no BatchNorm folded",
            stacklevel=2,
        )
        return []
    modules = dict(model.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN) or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv = modules.get(src.target)
        if isinstance(conv, nn.modules.conv._ConvNd) and not isinstance(
            conv, nn.modules.conv._ConvTransposeNd
        ):
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a conv into that conv (``fuse_conv_bn_eval``).

    The conv gets the folded weight and bias, the BatchNorm becomes ``nn.Identity``; module names of
    the convs stay the same. Only for inference: the folded model must not be trained further.

    Args:
        model: the network, modified in place; put in eval mode.

    Returns:
        The number of BatchNorm layers folded.
    """
    model.eval()
    pairs = conv_bn_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if conv.weight.shape[0] != bn.num_features:
            raise ValueError(
                f"conv {conv_name!r} has {conv.weight.shape[0]} outputs but {bn_name!r} normalises {bn.num_features}"
            )
        _set_module(model, conv_name, fuse_conv_bn_eval(conv, bn))
        _set_module(model, bn_name, nn.Identity())
    return len(pairs)


class OneDNNConv(nn.Module):
    """A convolution (or transposed convolution) that always runs on oneDNN, whatever the input size.

    PyTorch's CPU dispatch picks its native kernel for small batch-1 inputs; this layer calls oneDNN
    directly (``aten.mkldnn_convolution``; transposed convs through an mkldnn-layout input). It shares the
    wrapped conv's ``weight`` and ``bias`` under the same names, so ``state_dict`` keys do not change.
    Built by :func:`select_kernels`; for float32 CPU inference.

    Args:
        conv: the ``nn.Conv1d/2d/3d`` or ``nn.ConvTranspose2d/3d`` to run, with numeric padding and
            ``padding_mode="zeros"``.
    """

    def __init__(self, conv: nn.modules.conv._ConvNd):
        super().__init__()
        if not _onednn_capable(conv):
            raise ValueError(
                f"{type(conv).__name__}(padding={conv.padding!r}, padding_mode={conv.padding_mode!r}, "
                f"dtype={conv.weight.dtype}) cannot run on oneDNN"
            )
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.groups = conv.groups
        self.transposed = isinstance(conv, nn.modules.conv._ConvTransposeNd)
        self.output_padding = list(conv.output_padding)
        self.spatial_dims = len(conv.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.transposed:
            f = nn.functional.conv_transpose3d if self.spatial_dims == 3 else nn.functional.conv_transpose2d
            args = (self.stride, self.padding, self.output_padding, self.groups, self.dilation)
            return f(x.to_mkldnn(), self.weight, self.bias, *args).to_dense()
        return torch.ops.aten.mkldnn_convolution(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups
        )

    def extra_repr(self) -> str:
        kind = "transposed, " if self.transposed else ""
        return f"{kind}{tuple(self.weight.shape)}, stride={self.stride}, padding={self.padding}, groups={self.groups}"


class OneDNNPool(nn.Module):
    """A 2D/3D max or average pooling layer that runs on oneDNN (through an mkldnn-layout input).

    PyTorch's own CPU max-pooling kernel is slow on contiguous (NCHW / NCDHW) tensors: up to 6x slower than
    oneDNN (MONAI ResNet stem, 64 x 32^3: 14.6 vs 2.5 ms). Same outputs as the wrapped layer. Built by
    :func:`select_kernels`; for float32 CPU inputs.

    Args:
        pool: ``nn.MaxPool2d/3d`` (no ``return_indices``, dilation 1) or ``nn.AvgPool2d/3d`` (no padding,
            no ``ceil_mode``, no ``divisor_override``: oneDNN's padded average counts differently).
    """

    def __init__(self, pool: nn.Module):
        super().__init__()
        if not _onednn_capable(pool):
            raise ValueError(f"{pool!r} cannot run on oneDNN")
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x.to_mkldnn()).to_dense()


_POOLS = (nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d, nn.AvgPool3d)


def _onednn_capable(layer: nn.Module) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if isinstance(layer, (nn.MaxPool2d, nn.MaxPool3d)):
        return not layer.return_indices and layer.dilation in (1, (1,) * 2, (1,) * 3)
    if isinstance(layer, (nn.AvgPool2d, nn.AvgPool3d)):
        padded = layer.padding not in (0, (0,) * 2, (0,) * 3) or layer.ceil_mode
        return not padded and layer.divisor_override is None  # oneDNN counts padded windows differently
    if not isinstance(layer, nn.modules.conv._ConvNd):
        return False
    dims = (2, 3) if isinstance(layer, nn.modules.conv._ConvTransposeNd) else (1, 2, 3)
    return (
        layer.weight.dtype == torch.float32
        and layer.weight.device.type == "cpu"
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)  # "same" / "valid": left to PyTorch
        and len(layer.kernel_size) in dims
    )


def _as_args(example_inputs: torch.Tensor | Sequence[torch.Tensor]) -> tuple:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


def _median_s(fn: nn.Module, x: torch.Tensor) -> float:
    fn(x)  # warm-up: oneDNN builds its primitive on the first call
    times = []
    for _ in range(_AUTO_REPEATS):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _check_onednn_model(model: nn.Module, kernels: str) -> None:
    cpu_float32 = all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    if kernels != "default" and not cpu_float32:
        raise ValueError(
            f"kernels={kernels!r} needs a float32 CPU model (oneDNN kernels); use kernels='default'"
        )


@torch.no_grad()
def select_kernels(
    model: nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    kernels: str = "auto",
) -> dict[str, str]:
    """Run convolutions and pooling on oneDNN where it beats PyTorch's default CPU kernel, in place.

    ``"auto"`` records every conv's and pooling layer's input on one forward of ``example_inputs``, times
    both kernels on it (median of a few calls, under the current thread setting) and swaps in
    :class:`OneDNNConv` / :class:`OneDNNPool` where oneDNN is at least 10 % faster. The choice is per layer
    because it depends on channels and resolution: at batch 1 PyTorch sends small convs to its native
    im2col kernel (3-8x slower than oneDNN for 3D convs) while oneDNN's ~30-70 us per-call cost loses on
    small 2D ones. Being a measurement, it can differ between runs on a loaded machine; both choices
    compute the same function. ``"onednn"`` swaps every eligible layer.

    Args:
        model: the network (float32, CPU), modified in place; put in eval mode.
        example_inputs: a batch (or tuple of forward arguments) with the shape, batch size and memory
            format used at inference; needed for ``"auto"``.
        kernels: ``"auto"``, ``"onednn"`` or ``"default"`` (change nothing).

    Returns:
        ``{layer name: "onednn" or "default"}`` for every conv / pooling layer not yet swapped (for
        ``"auto"``: those that ran on the example); layers oneDNN cannot run stay ``"default"``.
    """
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; use one of {KERNELS}")
    if kernels == "auto" and example_inputs is None:
        raise ValueError("kernels='auto' times each layer on its real input: pass example_inputs")
    _check_onednn_model(model, kernels)
    model.eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, *_POOLS))}
    layers = {
        n: m
        for n, m in layers.items()
        if not isinstance(model.get_submodule(n.rpartition(".")[0]), OneDNNPool)
    }
    if kernels == "default":
        return dict.fromkeys(layers, "default")
    inputs: dict[str, torch.Tensor] = {}
    if kernels == "auto":
        hooks = [
            m.register_forward_pre_hook(lambda _m, args, n=n: inputs.setdefault(n, args[0]))
            for n, m in layers.items()
        ]
        try:
            model(*_as_args(example_inputs))
        finally:
            for h in hooks:
                h.remove()
    choice = {}
    for name, layer in layers.items():
        if kernels == "auto" and name not in inputs:
            continue
        use = _onednn_capable(layer)
        wrapper = OneDNNConv if isinstance(layer, nn.modules.conv._ConvNd) else OneDNNPool
        if use and kernels == "auto":
            use = _median_s(wrapper(layer), inputs[name]) < _AUTO_MARGIN * _median_s(layer, inputs[name])
        if use:
            _set_module(model, name, wrapper(layer))
        choice[name] = "onednn" if use else "default"
    return choice


def optimize_for_inference(
    model: nn.Module,
    fold_bn: bool = True,
    memory_format: str | None = None,
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    kernels: str = "default",
    backend: str = "eager",
) -> nn.Module:
    """Prepare a (pruned) network for fast CPU inference.

    The fastest setting measured on MONAI nets (BENCHMARKS.md "Inference latency", batch 1, one thread) is
    ``kernels="auto", backend="jit"``: 1.9-2.7x lower latency than the plain network, pruned or not (less at
    batch 8, where PyTorch already picks oneDNN). The defaults keep the network an ordinary module with the
    same kernels (BatchNorm folding only).

    Args:
        model: the network; put in eval mode and modified in place (folding, memory format, kernels).
        fold_bn: fold BatchNorm layers into the preceding convs (removes one memory pass per BatchNorm,
            which dominates at the small channel counts left after pruning).
        memory_format: ``None`` (keep), ``"channels_last"`` (``channels_last`` for 2D convs,
            ``channels_last_3d`` for 3D). Inputs should be converted the same way by the caller
            (:func:`to_memory_format`); tensor ``example_inputs`` are converted here.
        example_inputs: a batch (or tuple of forward arguments) as used at inference; needed for
            ``kernels="auto"`` and ``backend="jit"``.
        kernels: ``"default"`` (PyTorch's dispatch), ``"onednn"`` (every conv and pooling layer on oneDNN)
            or ``"auto"`` (per layer, the faster of the two measured on ``example_inputs``); see
            :func:`select_kernels`.
        backend: ``"eager"`` (return ``model``) or ``"jit"`` (return a frozen TorchScript trace of it,
            which removes the Python overhead that dominates small networks; ``torch.jit`` is deprecated
            upstream but measured faster here than ``torch.compile``, and a trace follows the path
            ``example_inputs`` took, so run it on inputs of that shape).

    Returns:
        ``model`` for ``backend="eager"``, else the traced module. Run it under ``torch.inference_mode()``;
        for inference only (folded weights must not be trained further).
    """
    if memory_format not in (None, "channels_last"):
        raise ValueError(f"unknown memory_format {memory_format!r}; use None or 'channels_last'")
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; use one of {KERNELS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
    if example_inputs is None and (kernels == "auto" or backend == "jit"):
        raise ValueError(f"kernels={kernels!r}, backend={backend!r} need example_inputs")
    _check_onednn_model(model, kernels)  # refuse before anything is changed in place
    model.eval()
    if fold_bn:
        fold_batchnorm(model)
    if memory_format == "channels_last":
        dims = {len(m.kernel_size) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}
        if len(dims) > 1:
            raise ValueError(f"mixed 2D/3D convs {sorted(dims)}: cannot choose one channels_last format")
        model.to(memory_format=torch.channels_last_3d if dims == {3} else torch.channels_last)
    if example_inputs is not None:
        example_inputs = tuple(
            to_memory_format(x, memory_format) if isinstance(x, torch.Tensor) and x.ndim in (4, 5) else x
            for x in _as_args(example_inputs)
        )
    select_kernels(model, example_inputs, kernels)
    if backend == "jit":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.*deprecated")  # chosen knowingly
            return torch.jit.freeze(torch.jit.trace(model, example_inputs, check_trace=False))
    return model


def to_memory_format(x: torch.Tensor, memory_format: str | None) -> torch.Tensor:
    """Convert an input batch the way ``optimize_for_inference(memory_format=...)`` converted the model."""
    if memory_format is None:
        return x
    return x.contiguous(memory_format=torch.channels_last_3d if x.ndim == 5 else torch.channels_last)
