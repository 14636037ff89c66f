"""DL-Backtrace (DLB) relevance (Sankarshan et al., arXiv 2411.12643), in torch, batched, 1D/2D/3D.

DLB walks relevance from the explained output back to the input, one unit at a time, with rules of
its own (those of the ``dl-backtrace`` package's torch backend, version 0.0.25, which the tests use
as an oracle):

- **Linear / Conv1d/2d/3d / ConvTranspose**: an output unit ``i`` with relevance ``R_i`` splits it over
  its inputs in proportion to the *magnitude* of their contributions ``z_ij = w_ij x_j``, with the
  bias taking its own share: ``R_j = sum_i R_i |z_ij| / (sum_j |z_ij| + |b_i|)``. Positive and
  negative contributions are kept apart so that activation saturation can silence one side
  (below); with no saturation both sides get their magnitude share, so relevance keeps the sign of
  the explained output.
- **Activation saturation** (the package's ``activation_master`` ranges): when the unit feeding a
  sigmoid (range [-4, 4]), tanh ([-2, 2]) or softmax ([-1, 2]) has pre-activation ``t`` below the
  range, its positive contributions get no relevance; above it, its negative ones get none; the
  other side is renormalised without the silenced part (the package's dense-layer rule). ReLU's
  lower limit 0 is skipped, as the package does: a dead ReLU unit passes zero to the next layer,
  so it never receives relevance anyway. The mask reaches the conv / linear layer directly or
  through a norm layer (sign-flipped where the norm's scale is negative); other ops in between
  (an add, a pool) drop it. The package computes the conv layer's ``t`` as ``p + n`` (the sum of
  magnitudes, not the net input) and does not renormalise there; this module uses the dense-layer
  rule for every layer. Activations themselves pass relevance through unchanged.
- **Max pooling**: the window's relevance goes to its maximum, split evenly among ties
  (adaptive max pooling: to the index PyTorch picks, no tie split).
- **Average / adaptive average pooling, linear interpolation**: ``R_p = |x_p| R_w / sum_window |x|``.
- **Residual sums** (``a + b``, ``a += b``, ``a - b`` on the relevance path): each addend takes
  ``|x_k| / sum_k |x_k|`` of the sum's relevance (the package's ``Add`` rule).
- **Concatenation, flatten / view / reshape, slicing, nearest upsampling, padding, dropout (eval),
  identity**: relevance follows the tensor's elements (their gradient is exactly this rule).

Choices where MONAI nets have constructs the package has no rule for (it passes them through):

- **BatchNorm / InstanceNorm / GroupNorm / LayerNorm** are the affine unit ``y = a x + c`` they
  compute (``a = gamma / sigma`` from the statistics in use, ``c = y - a x``); the DLB dense rule on
  that unit gives ``R_x = |a x| / (|a x| + |c|) R_y`` (the shift takes the bias share).
- **Gates** (``x * sigmoid(s)``: MONAI ``ChannelSELayer``, EfficientNet's squeeze-excitation): the
  sigmoid output is a constant; all relevance takes the gated path ``x``, the gate branch gets none
  (as LRP here does). ``x * sigmoid(x)`` (MONAI ``Swish``) is thereby an activation that passes
  relevance through.
- **Element-wise activations** as modules or functions (SiLU / Swish / MemoryEfficientSwish, GELU,
  Mish, ...): relevance passes through, as for ReLU. Scaling by a constant (``x * c``, ``x / c``)
  likewise.
- **Attention** (MONAI ``SABlock``, SwinUNETR ``WindowAttention``, fused
  ``scaled_dot_product_attention``): the attention weights are constants (CP-LRP, as the LRP
  canonizer does); ``weights @ values`` is then a linear map of the values with constant weights,
  and any such product with a constant (``einsum`` / ``matmul``) gets the dense rule without bias,
  ``R_j = sum_i R_i |w_ij x_j| / sum_j |w_ij x_j|``. Query / key channels get no relevance.
- **einops ``Rearrange``** (ViT patch / head layouts) and other reshapes / permutations: relevance
  follows the elements.
- Anything else on the relevance path (a product of two relevance-carrying tensors that is no gate,
  ``exp``, a leaf module without a rule, ...) has no faithful DLB rule here: the forward pass raises
  ``NotImplementedError`` naming the module or op rather than silently back-propagating plain
  gradients.
- In-place activations (``nn.ReLU(inplace=True)``) are switched off while relevance is computed and
  restored after, so that a rule never sees its input overwritten.

Implementation: every module with a rule gets a forward hook that replaces its output by an
identical tensor whose backward is the DLB rule (the way zennit's rule hooks replace gradients), and
a ``TorchFunctionMode`` turns residual additions into a DLB sum; ``output.backward(select * output)``
then leaves each layer's output relevance in the gradient that ``OutputRecorder`` captures. All
samples of a batch are explained at once; samples never mix (except through a BatchNorm that is in
training mode or has no running statistics, which normalises with batch statistics).

Contrastive mode (the package's ``mode="contrast"``) is not implemented: ``mode="contrastive"``
raises ``NotImplementedError``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks.activation import MemoryEfficientSwish, Swish
from monai.networks.blocks.activation import Mish as MonaiMish
from monai.utils import optional_import
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from monai_iaprune.relevance.canonizers import attention_types, attention_weights
from monai_iaprune.relevance.hooks import OutputRecorder, no_param_grad
from monai_iaprune.relevance.layers import per_sample_channel_sum
from monai_iaprune.relevance.registry import SelectionFn, register_method

__all__ = ["ACTIVATION_RANGES", "backtrace", "backtrace_relevance_maps"]

Rearrange, _HAS_EINOPS = optional_import("einops.layers.torch", name="Rearrange")

# (lower, upper) pre-activation range outside which DLB silences one side (dl-backtrace's activation_master)
ACTIVATION_RANGES: dict[type[nn.Module], tuple[float | None, float | None]] = {
    nn.Sigmoid: (-4.0, 4.0),
    nn.Tanh: (-2.0, 2.0),
    nn.Softmax: (-1.0, 2.0),
}

_AFFINE = (nn.Linear, nn.modules.conv._ConvNd)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm, nn.LayerNorm)
_MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_ADAPTIVE_MAXPOOL = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_AVGPOOL = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
_ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Softplus,
    nn.Sigmoid,
    nn.Hardsigmoid,
    nn.Tanh,
    nn.Softmax,
    Swish,
    MemoryEfficientSwish,
    MonaiMish,
)
# relevance follows the elements: the plain gradient is the DLB rule
_ELEMENT_MOVERS = (
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
) + ((Rearrange,) if _HAS_EINOPS else ())

_T = torch.Tensor
_ADD_OPS = {torch.add, _T.add, _T.__add__, _T.__radd__, _T.__iadd__, _T.add_}
_SUB_OPS = {torch.sub, _T.sub, _T.__sub__, _T.__isub__, _T.sub_}
_INPLACE_OPS = {_T.__iadd__, _T.add_, _T.__isub__, _T.sub_}
# functional ops whose gradient moves relevance with the elements (copy, select, reshape, concatenate)
_ELEMENT_OPS = {
    torch.cat,
    torch.concat,
    torch.stack,
    torch.flatten,
    torch.reshape,
    torch.squeeze,
    torch.unsqueeze,
    torch.permute,
    torch.transpose,
    torch.movedim,
    torch.narrow,
    torch.split,
    torch.chunk,
    torch.unbind,
    torch.clone,
    F.pad,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    _T.__getitem__,
    _T.view,
    _T.view_as,
    _T.reshape,
    _T.reshape_as,
    _T.flatten,
    _T.unflatten,
    _T.squeeze,
    _T.unsqueeze,
    _T.permute,
    _T.transpose,
    _T.t,
    _T.movedim,
    _T.contiguous,
    _T.clone,
    _T.narrow,
    _T.select,
    _T.split,
    _T.chunk,
    _T.unbind,
    _T.expand,
    _T.expand_as,
    _T.repeat,
    _T.to,
    _T.float,
    _T.double,
    _T.half,
    _T.type_as,
    _T.register_hook,
}


# element-wise activations called as functions: relevance passes through, as for activation modules
_GATE_OPS = {torch.sigmoid, _T.sigmoid, F.sigmoid, F.hardsigmoid}  # their outputs are gates
_ACTIVATION_OPS = _GATE_OPS | {
    torch.relu,
    torch.relu_,
    _T.relu,
    _T.relu_,
    F.relu,
    F.relu_,
    F.relu6,
    F.leaky_relu,
    F.leaky_relu_,
    F.elu,
    F.elu_,
    F.selu,
    F.celu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardtanh,
    F.hardtanh_,
    F.softplus,
    torch.tanh,
    _T.tanh,
    F.tanh,
    torch.softmax,
    _T.softmax,
    F.softmax,
}
_MUL_OPS = {torch.mul, _T.mul, _T.__mul__, _T.__rmul__, _T.__imul__, _T.mul_}
_DIV_OPS = {torch.div, torch.true_divide, _T.div, _T.__truediv__, _T.__itruediv__, _T.div_}
_INPLACE_PRODUCT_OPS = {_T.__imul__, _T.mul_, _T.__itruediv__, _T.div_}
_PRODUCT_OPS = {torch.matmul, torch.bmm, torch.einsum, _T.matmul, _T.__matmul__, _T.bmm}


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den``, 0 where ``den == 0`` (a unit with no contribution and no bias passes nothing)."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


class _RuleFunction(torch.autograd.Function):
    """Identity in forward on the layer's output; backward is the layer's DLB rule."""

    @staticmethod
    def forward(ctx, x, out, rule):
        ctx.rule = rule
        return out.clone()

    @staticmethod
    def backward(ctx, relevance):
        return ctx.rule.backward(relevance), None, None


class _PassFunction(torch.autograd.Function):
    """``out`` (an element-wise function of ``x``, or ``x`` scaled by a constant); backward passes relevance to ``x``
    unchanged (summed where ``x`` was broadcast)."""

    @staticmethod
    def forward(ctx, x, out):
        ctx.x_shape = x.shape
        ctx.mark_dirty(out)  # ``out`` is a fresh detached result: re-used in place, no copy
        return out

    @staticmethod
    def backward(ctx, relevance):
        return relevance.sum_to_size(ctx.x_shape), None


class _GateFunction(torch.autograd.Function):
    """``x * gate`` with the gate a constant: all relevance to ``x`` (the gated path), none to the gate."""

    @staticmethod
    def forward(ctx, x, gate):
        ctx.shapes = (x.shape, gate.shape)
        return x * gate

    @staticmethod
    def backward(ctx, relevance):
        return relevance.sum_to_size(ctx.shapes[0]), relevance.new_zeros(ctx.shapes[1])


class _ConstantProductFunction(torch.autograd.Function):
    """``fn(const, x)`` (or ``fn(x, const)``): a linear map of ``x`` with constant weights (attention weights, a
    frozen matrix). Backward is the DLB dense rule without bias: ``R_j = sum_i R_i |w_ij x_j| / sum_j |w_ij x_j|``."""

    @staticmethod
    def forward(ctx, fn, const_first, const, x):
        ctx.fn, ctx.const_first = fn, const_first
        ctx.save_for_backward(const, x)
        return fn(const, x) if const_first else fn(x, const)

    @staticmethod
    def backward(ctx, relevance):
        const, x = ctx.saved_tensors
        ca = const.detach().abs()
        with torch.enable_grad():
            xa = x.detach().abs().requires_grad_(True)
            z = ctx.fn(ca, xa) if ctx.const_first else ctx.fn(xa, ca)
            (g,) = torch.autograd.grad(z, xa, _safe_div(relevance, z.detach()))
        return None, None, None, xa.detach() * g


def _explicit_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """``scaled_dot_product_attention`` with the attention weights as constants (eval: no dropout)."""
    att = attention_weights(query.detach(), key.detach(), attn_mask, is_causal, scale)
    if not value.requires_grad:
        return att @ value
    return _ConstantProductFunction.apply(torch.matmul, True, att, value)


class _SumFunction(torch.autograd.Function):
    """``a + sign * b`` whose backward splits relevance by ``|addend| / sum |addends|``."""

    @staticmethod
    def forward(ctx, a, b, sign):
        out = a + b if sign > 0 else a - b
        ea, eb = torch.broadcast_tensors(a.detach(), b.detach())
        ctx.mags = (ea.abs(), eb.abs())
        ctx.shapes = (a.shape, b.shape)
        return out

    @staticmethod
    def backward(ctx, relevance):
        ra, rb = magnitude_split(*ctx.mags, relevance)
        return ra.sum_to_size(ctx.shapes[0]), rb.sum_to_size(ctx.shapes[1]), None


def magnitude_split(
    mag_a: torch.Tensor, mag_b: torch.Tensor, relevance: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DLB's rule at a sum ``a + b``: each addend takes ``|x_k| / (|a| + |b|)`` of the sum's relevance (0 where
    both are 0), given the magnitudes ``|a|``, ``|b|`` (broadcast to the sum's shape)."""
    s = _safe_div(relevance, mag_a + mag_b)
    return mag_a * s, mag_b * s


class _Rule:
    """One call of a module: its input, output and (for affine units) saturation masks."""

    keeps_input = True
    keeps_output = True

    def __init__(self, name: str, module: nn.Module, x: torch.Tensor, out: torch.Tensor):
        self.name, self.module = name, module
        self.out_shape = out.shape
        # clones: a later in-place op must not change what the rule reads; kept only where the rule reads them
        self.x = x.detach().clone() if self.keeps_input else None
        self.out = out.detach().clone() if self.keeps_output else None
        self.pos_ok: torch.Tensor | None = None  # False where positive contributions are silenced
        self.neg_ok: torch.Tensor | None = None

    def set_saturation(self, pos_ok: torch.Tensor, neg_ok: torch.Tensor) -> None:
        """Record the activation-range masks of the units of this call's output."""
        self.pos_ok, self.neg_ok = pos_ok, neg_ok

    def backward(self, relevance: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _AffineRule(_Rule):
    """Linear / conv / transposed conv: split by contribution magnitude, bias keeps its share."""

    keeps_output = False

    def _apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's map with ``weight`` and no bias (called directly: no module hooks fire)."""
        m = self.module
        if isinstance(m, nn.Linear):
            return F.linear(x, weight)
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            nd = x.ndim - 2
            out_size = list(self.out_shape[2:])
            pad = m._output_padding(x, out_size, m.stride, m.padding, m.kernel_size, nd, m.dilation)
            fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
            return fn(x, weight, None, m.stride, m.padding, pad, m.groups, m.dilation)
        return m._conv_forward(x, weight, None)

    def _bias(self) -> torch.Tensor | float:
        b = getattr(self.module, "bias", None)
        if b is None:
            return 0.0
        b = b.detach().abs()
        return (
            b if isinstance(self.module, nn.Linear) else b.reshape(1, -1, *([1] * (len(self.out_shape) - 2)))
        )

    def backward(self, relevance: torch.Tensor) -> torch.Tensor:
        w = self.module.weight.detach()
        x, bias = self.x, self._bias()
        if self.pos_ok is None:  # R_j = |x_j| sum_i |w_ij| R_i / (sum_j |w_ij x_j| + |b_i|)
            xa = x.abs()
            with torch.enable_grad():
                xr = xa.requires_grad_(True)
                z = self._apply(xr, w.abs())
                (g,) = torch.autograd.grad(z, xr, _safe_div(relevance, z.detach() + bias))
            return xa * g
        # saturation: positive (P) and negative (N) contribution totals per unit, each side maskable
        wp, wn = w.clamp(min=0), (-w).clamp(min=0)
        xp, xn = x.clamp(min=0), (-x).clamp(min=0)
        with torch.enable_grad():
            xpr, xnr = xp.requires_grad_(True), xn.requires_grad_(True)
            pos = self._apply(xpr, wp) + self._apply(xnr, wn)  # w+ x+ and |w-| |x-|
            neg = self._apply(xnr, wp) + self._apply(xpr, wn)  # w+ |x-| and |w-| x+
            pos_ok, neg_ok = self.pos_ok.to(relevance.dtype), self.neg_ok.to(relevance.dtype)
            den = pos_ok * pos.detach() + neg_ok * neg.detach() + bias
            sp, sn = _safe_div(relevance * pos_ok, den), _safe_div(relevance * neg_ok, den)
            gp = torch.autograd.grad(pos, (xpr, xnr), sp)
            gn = torch.autograd.grad(neg, (xpr, xnr), sn)
        return xp * (gp[0] + gn[0]) + xn * (gp[1] + gn[1])


def _ntuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class _NormRule(_Rule):
    """Norm layer as the affine unit ``y = a x + c``: ``R_x = |a x| / (|a x| + |c|) R_y``."""

    def __init__(self, name, module, x, out):
        super().__init__(name, module, x, out)
        self.scale = self._scale()
        self.producer: _Rule | None = None

    def _scale(self) -> torch.Tensor:
        m, x = self.module, self.x
        shape = (1, -1) + (1,) * (x.ndim - 2)
        spatial = list(range(2, x.ndim))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training or m.running_var is None:
                var = x.var(dim=[0, *spatial], unbiased=False, keepdim=True)
            else:
                var = m.running_var.detach().reshape(shape)
            w = m.weight.detach().reshape(shape) if m.weight is not None else 1.0
        elif isinstance(m, nn.modules.instancenorm._InstanceNorm):
            if m.track_running_stats and not m.training and m.running_var is not None:
                var = m.running_var.detach().reshape(shape)
            else:
                var = x.var(dim=spatial, unbiased=False, keepdim=True)
            w = m.weight.detach().reshape(shape) if m.weight is not None else 1.0
        elif isinstance(m, nn.GroupNorm):
            b, c = x.shape[:2]
            var = x.reshape(b, m.num_groups, -1).var(-1, unbiased=False)
            var = var.repeat_interleave(c // m.num_groups, dim=1).reshape(b, c, *([1] * len(spatial)))
            w = m.weight.detach().reshape(shape) if m.weight is not None else 1.0
        else:  # LayerNorm
            dims = list(range(x.ndim - len(m.normalized_shape), x.ndim))
            var = x.var(dim=dims, unbiased=False, keepdim=True)
            w = m.weight.detach() if m.weight is not None else 1.0
        return w / torch.sqrt(var + m.eps)

    def set_saturation(self, pos_ok: torch.Tensor, neg_ok: torch.Tensor) -> None:
        # a negative scale turns the producer's positive contributions into negative ones
        if self.producer is not None:
            flip = (self.scale < 0).expand(self.out_shape)
            self.producer.set_saturation(torch.where(flip, neg_ok, pos_ok), torch.where(flip, pos_ok, neg_ok))

    def backward(self, relevance: torch.Tensor) -> torch.Tensor:
        ax = (self.scale * self.x).abs()
        c = (self.out - self.scale * self.x).abs()
        return _safe_div(ax * relevance, ax + c)


class _MaxPoolRule(_Rule):
    """Max pooling: the window's relevance goes to its maximum, split evenly among ties."""

    def backward(self, relevance: torch.Tensor) -> torch.Tensor:
        m, x, out = self.module, self.x, self.out
        nd = x.ndim - 2
        k, p, d = _ntuple(m.kernel_size, nd), _ntuple(m.padding, nd), _ntuple(m.dilation, nd)
        s = _ntuple(m.stride if m.stride else m.kernel_size, nd)
        span = [di * (ki - 1) + 1 for ki, di in zip(k, d)]
        extra = [
            max(0, (o - 1) * si + sp - (n + 2 * pi))
            for o, si, sp, n, pi in zip(out.shape[2:], s, span, x.shape[2:], p)
        ]
        pads: list[int] = []
        for pi, ei in reversed(list(zip(p, extra))):
            pads += [pi, pi + ei]
        xpad = F.pad(x, pads, value=-math.inf)

        def windows(t: torch.Tensor) -> torch.Tensor:
            for i in range(nd):
                t = t.unfold(2 + i, span[i], s[i])
            return t[(...,) + tuple(slice(None, None, di) for di in d)]

        win_dims = tuple(range(-nd, 0))
        mx = out.reshape(*out.shape, *([1] * nd))
        mask = (windows(xpad) == mx).to(relevance.dtype)
        share = _safe_div(relevance, mask.sum(win_dims)).reshape(mx.shape)
        with torch.enable_grad():
            xr = xpad.requires_grad_(True)
            (g,) = torch.autograd.grad(windows(xr), xr, mask * share)
        crop = (slice(None), slice(None)) + tuple(slice(pi, pi + n) for pi, n in zip(p, x.shape[2:]))
        return g[crop]


class _ArgmaxRule(_Rule):
    """Adaptive max pooling: relevance goes to the index PyTorch selects (no tie split)."""

    keeps_output = False

    def backward(self, relevance: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            xr = self.x.requires_grad_(True)
            (g,) = torch.autograd.grad(self.module.forward(xr), xr, relevance)
        return g


class _MagnitudeShareRule(_Rule):
    """Average pooling / linear interpolation (non-negative linear maps): ``R_p = |x_p| R_w / sum_w |x|``."""

    keeps_output = False

    def backward(self, relevance: torch.Tensor) -> torch.Tensor:
        xa = self.x.abs()
        with torch.enable_grad():
            xr = xa.requires_grad_(True)
            z = self.module.forward(xr)
            (g,) = torch.autograd.grad(z, xr, _safe_div(relevance, z.detach()))
        return xa * g


class _PassRule(_Rule):
    """Activations: relevance passes through unchanged (saturation acts on the layer that feeds them)."""

    keeps_input = False
    keeps_output = False

    def backward(self, relevance: torch.Tensor) -> torch.Tensor:
        return relevance


def _rule_class(module: nn.Module) -> type[_Rule] | None | bool:
    """The rule class for a module, ``None`` for element movers (plain gradient), ``False`` if unknown."""
    if isinstance(module, _AFFINE):
        return _AffineRule
    if isinstance(module, _NORMS):
        return _NormRule
    if isinstance(module, _MAXPOOL):
        return _MaxPoolRule
    if isinstance(module, _ADAPTIVE_MAXPOOL):
        return _ArgmaxRule
    if isinstance(module, _AVGPOOL):
        return _MagnitudeShareRule
    if isinstance(module, nn.Upsample):
        if module.mode == "nearest":
            return None
        return _MagnitudeShareRule if module.mode in ("linear", "bilinear", "trilinear") else False
    if isinstance(module, _ACTIVATIONS):
        return _PassRule
    if isinstance(module, _ELEMENT_MOVERS):
        return None
    return False


def _op_name(func: Any) -> str:
    mod = getattr(func, "__module__", None) or ""
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    return f"{mod}.{qual}" if mod else qual


def _needs_relevance(obj: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_flatten(obj)[0])


class _State:
    def __init__(self) -> None:
        self.depth = 0
        self.stack: list[str] = []
        self.producers: dict[int, tuple[torch.Tensor, _Rule]] = {}
        self.gates: dict[int, torch.Tensor] = {}  # sigmoid outputs (kept alive so ids stay unique)
        self.attention = 0  # > 0 inside an attention module: products of two relevance paths are constants

    def mark_gate(self, t: Any) -> None:
        if isinstance(t, torch.Tensor):
            self.gates[id(t)] = t

    def is_gate(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and self.gates.get(id(t)) is t

    def where(self) -> str:
        return repr(self.stack[-1]) if self.stack else "the model's top-level forward"


class _BacktraceMode(TorchFunctionMode):
    """Outside ruled modules: residual sums become DLB sums; ops with no DLB rule raise."""

    def __init__(self, state: _State):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.state.depth > 0:
            return func(*args, **kwargs)
        if (func in _ADD_OPS or func in _SUB_OPS) and len(args) >= 2:
            a, b = args[0], args[1]
            if _grad(a) and _grad(b):
                if kwargs.get("alpha", 1) != 1:
                    raise NotImplementedError(
                        f"DL-Backtrace has no rule for a scaled sum (alpha) in {self.state.where()}"
                    )
                out = _SumFunction.apply(a, b, -1 if func in _SUB_OPS else 1)
                # ``a += b`` / ``a.add_(b)``: a must hold the sum, its gradient the DLB split
                if func in _INPLACE_OPS:
                    return a.copy_(out)
                return out
            return func(*args, **kwargs)
        if func in _ACTIVATION_OPS and args and _grad(args[0]):
            out = self._activation(func, args, kwargs)
            if func in _GATE_OPS:
                self.state.mark_gate(out)
            return out
        if (func in _MUL_OPS or func in _DIV_OPS) and len(args) >= 2 and (_grad(args[0]) or _grad(args[1])):
            return self._product(func, args, kwargs)
        if func in _PRODUCT_OPS and not kwargs:
            out = self._matmul(func, args)
            if out is not None:
                return out
        if func is F.scaled_dot_product_attention:
            return _explicit_attention(*args, **kwargs)
        out = func(*args, **kwargs)
        if func in _ELEMENT_OPS:
            if any(self.state.is_gate(t) for t in tree_flatten((args, kwargs))[0]):
                for t in tree_flatten(out)[0]:
                    self.state.mark_gate(t)  # a reshaped / sliced gate is still a gate
            return out
        if not _needs_relevance(out) or not _needs_relevance((args, kwargs)):
            return out
        self._unsupported(func)

    def _unsupported(self, func: Any, what: str = "") -> None:
        raise NotImplementedError(
            f"DL-Backtrace has no rule for the op {_op_name(func)}{what} on the relevance path in module "
            f"{self.state.where()}; supported: modules (conv, linear, norm, pool, activation), sums, "
            "concatenations and reshapes, element-wise activations, gates (x * sigmoid(.)), scaling and "
            "products with a constant, and attention (weights held constant)"
        )

    @staticmethod
    def _activation(func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        """Element-wise activation: relevance passes to its input unchanged."""
        x = args[0]
        inplace = (
            kwargs.get("inplace") is True or any(a is True for a in args[1:]) or _op_name(func).endswith("_")
        )
        if inplace:  # compute on a copy, then write back, so the gradient of x's old value is the pass rule
            val = func(x.detach().clone(), *args[1:], **kwargs)
            return x.copy_(_PassFunction.apply(x, val))
        out = func(*args, **kwargs).detach()
        return _PassFunction.apply(x, out.clone() if out.data_ptr() == x.data_ptr() else out)

    def _product(self, func: Any, args: tuple, kwargs: dict) -> torch.Tensor:
        """``a * b`` / ``a / b`` with relevance on one or both sides."""
        a, b = args[0], args[1]
        inplace = func in _INPLACE_PRODUCT_OPS
        if _grad(a) and _grad(b):
            if func in _DIV_OPS:
                self._unsupported(func, " (division by a tensor on the relevance path)")
            if self.state.is_gate(a) != self.state.is_gate(b):
                x, gate = (b, a) if self.state.is_gate(a) else (a, b)
                out = _GateFunction.apply(x, gate)  # the gate is a constant: relevance takes the gated path
            elif self.state.attention > 0:
                return func(a.detach(), b.detach(), *args[2:], **kwargs)  # attention scores: constants
            else:
                self._unsupported(
                    func, " (product of two tensors on the relevance path, neither a sigmoid gate)"
                )
        elif _grad(b):
            if func in _DIV_OPS:
                self._unsupported(func, " (division by a tensor on the relevance path)")
            out = _PassFunction.apply(b, func(a, b.detach(), *args[2:], **kwargs))
        else:  # scaled by a constant: each output element comes from one input element
            val = func(a.detach().clone() if inplace else a.detach(), b, *args[2:], **kwargs)
            out = _PassFunction.apply(a, val)
        return a.copy_(out) if inplace else out

    def _matmul(self, func: Any, args: tuple) -> torch.Tensor | None:
        """A matrix product / 2-operand einsum with relevance on one side (or None: not handled here)."""
        if func is torch.einsum:
            ops = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            fn = partial(torch.einsum, args[0])
        else:
            ops, fn = args, func
        if len(ops) != 2 or not (_grad(ops[0]) or _grad(ops[1])):
            return None
        a, b = ops
        if _grad(a) and _grad(b):
            if self.state.attention > 0:
                return fn(a.detach(), b.detach())  # query-key scores: the attention weights are constants
            self._unsupported(func, " (product of two tensors on the relevance path)")
        const_first = _grad(b)
        const, x = (a, b) if const_first else (b, a)
        return _ConstantProductFunction.apply(fn, const_first, torch.as_tensor(const).detach(), x)


def _grad(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.requires_grad


@contextmanager
def _backtrace_hooks(model: nn.Module) -> Iterator[_State]:
    """Install the DLB rule hooks on ``model`` (in-place activations switched off) for one forward."""
    state = _State()
    handles = []
    attention = attention_types()
    inplace = [(m, m.inplace) for m in model.modules() if getattr(m, "inplace", False) is True]
    for m, _ in inplace:
        m.inplace = False

    def pre_hook(name: str, module: nn.Module, rule: type[_Rule] | None | bool):
        def fn(mod, args):
            state.stack.append(name or type(model).__name__)
            if isinstance(mod, attention):
                state.attention += 1
            if rule is not False:
                state.depth += 1
            elif not any(True for _ in mod.children()) and _needs_relevance(args) and state.depth == 0:
                raise NotImplementedError(
                    f"DL-Backtrace has no rule for layer {name!r} ({type(mod).__name__}); supported: Linear, "
                    "Conv/ConvTranspose 1d-3d, Batch/Instance/Group/LayerNorm, max/avg/adaptive pooling, Upsample, "
                    "activations, Flatten, Dropout, Identity"
                )

        return fn

    def wrap(name: str, mod: nn.Module, rule: type[_Rule] | None, args: tuple, output: Any):
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].requires_grad:
            return None
        x = args[0]
        lo_hi = next((r for t, r in ACTIVATION_RANGES.items() if isinstance(mod, t)), None)
        if lo_hi is not None and id(x) in state.producers:
            lo, hi = lo_hi
            t = x.detach()
            pos_ok = t >= lo if lo is not None else torch.ones_like(t, dtype=torch.bool)
            neg_ok = t <= hi if hi is not None else torch.ones_like(t, dtype=torch.bool)
            state.producers[id(x)][1].set_saturation(pos_ok, neg_ok)
        if rule is None:
            return None
        if not isinstance(output, torch.Tensor):
            raise NotImplementedError(f"DL-Backtrace needs a single tensor output from layer {name!r}")
        r = rule(name, mod, x, output)
        if isinstance(r, _NormRule) and id(x) in state.producers:
            r.producer = state.producers[id(x)][1]
        new = _RuleFunction.apply(x, output.detach(), r)
        state.producers[id(new)] = (new, r)
        if isinstance(mod, (nn.Sigmoid, nn.Hardsigmoid)):
            state.mark_gate(new)
        return new

    def post_hook(name: str, rule: type[_Rule] | None | bool):
        def fn(mod, args, output):
            state.stack.pop()
            if isinstance(mod, attention):
                state.attention -= 1
            if rule is False:
                return None
            try:  # still "inside" the module while the rule is built: the mode lets its ops through
                return None if state.depth > 1 else wrap(name, mod, rule, args, output)
            finally:
                state.depth -= 1

        return fn

    try:
        for name, m in model.named_modules():
            rule = _rule_class(m)
            handles.append(m.register_forward_pre_hook(pre_hook(name, m, rule)))
            handles.append(m.register_forward_hook(post_hook(name, rule)))
        yield state
    finally:
        for h in handles:
            h.remove()
        for m, flag in inplace:
            m.inplace = flag


@contextmanager
def backtrace_forward(model: nn.Module) -> Iterator[None]:
    """DL-Backtrace rules on ``model`` for the forward passes run inside; a backward from ``select * output`` after
    leaving the block propagates DLB relevance (in its gradients). Parameters should not require grad."""
    with _backtrace_hooks(model) as state, _BacktraceMode(state):
        yield


def _check_mode(mode: str) -> None:
    if mode == "contrastive":
        raise NotImplementedError("DL-Backtrace contrastive mode is not implemented; use mode='default'")
    if mode != "default":
        raise ValueError(f"unknown DL-Backtrace mode {mode!r}; use 'default'")


def backtrace_relevance_maps(
    model: nn.Module,
    inputs: torch.Tensor,
    select: SelectionFn,
    modules: dict[str, nn.Module],
    mode: str = "default",
) -> dict[str, torch.Tensor]:
    """DL-Backtrace relevance at the output of each given module, full shape (``[B, C, *spatial]``).

    Args:
        model: the network (put it in eval mode first).
        inputs: a batch ``[B, C, *spatial]``.
        select: ``output -> 0/1 selection``; relevance starts as ``select(output) * output``.
        modules: ``{name: module}`` whose output relevance is returned (any module types; a module
            called more than once gets the sum over its calls).
        mode: ``"default"`` (the paper's and package's default mode).

    Returns:
        ``{name: relevance tensor shaped like the module's output}`` for every module reached.
    """
    _check_mode(mode)
    if hasattr(inputs, "as_tensor"):  # MONAI MetaTensor: plain tensor so its own __torch_function__ stays out
        inputs = inputs.as_tensor()
    with no_param_grad(model):
        with _backtrace_hooks(model) as state, OutputRecorder(modules) as rec:
            x = inputs.detach().requires_grad_(True)
            with _BacktraceMode(state):
                output = model(x)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"DL-Backtrace needs a single tensor model output, got {type(output).__name__}")
        # module hooks are gone: the rules' own layer calls in backward record nothing
        output.backward((select(output) * output).detach())
        return {name: g.detach() for name, g in rec.grads.items()}


@register_method("dlb")
def backtrace(
    model: nn.Module,
    inputs: torch.Tensor,
    select: SelectionFn,
    layers: dict[str, nn.Module],
    mode: str = "default",
    **_: Any,
) -> dict[str, torch.Tensor]:
    """DL-Backtrace per-sample, per-output-channel relevance ``{name: [B, C]}`` at the output of each conv / linear
    module in ``layers``: ``backtrace_relevance_maps`` (same arguments) summed over positions (signed; the
    collector takes ``|.|`` per sample). ``mode="contrastive"`` is not implemented (raises ``NotImplementedError``).
    """
    maps = backtrace_relevance_maps(model, inputs, select, layers, mode)
    return {name: per_sample_channel_sum(layers[name], r) for name, r in maps.items()}
