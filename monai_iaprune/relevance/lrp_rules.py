"""LRP rules for the layers of MONAI networks, as zennit hooks (the ``zennit.rules`` counterpart).

``EpsilonRule``, ``ZPlusRule`` and ``PassRule`` give the values of zennit's ``Epsilon``, ``ZPlus`` and ``Pass``
(tested layer by layer) as ``OutputRule`` hooks: the rule is the backward of an identity on the layer's output,
so the layer's own backward, which zennit computes and then discards, never runs, no layer input is copied, and
z+ skips the ``x-`` half where the input has no negative entry (after a ReLU). BatchNorms merged into the
preceding layer become exact identities (no rule).

Rules zennit does not have:

- BatchNorm that could not be merged into a preceding conv (DenseNet's pre-activation norms after a
  concatenation) gets the epsilon rule as an element-wise affine layer, so its shift acts as a bias.
- ``NormalizationEpsilon``: LayerNorm / GroupNorm / InstanceNorm (and RMSNorm) get the epsilon rule on the
  normalisation with its standard deviation held constant (the "LN rule" of Ali et al. 2022): centring and
  scaling are then linear, and relevance is conserved up to the affine shift.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from zennit.core import Hook, RemovableHandle, RemovableHandleList, Stabilizer

from monai_iaprune.relevance.canonizers import is_merged_identity

__all__ = [
    "NORM_TYPES",
    "EpsilonRule",
    "NormalizationEpsilon",
    "OutputRule",
    "PassRule",
    "ZPlusRule",
    "normalize_std_constant",
]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def _affine(module: nn.Module, y: torch.Tensor, channel_dim: int) -> torch.Tensor:
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    shape = [1] * y.ndim
    if channel_dim == -1:  # LayerNorm / RMSNorm: weight covers the trailing normalised dims
        if weight is not None:
            y = y * weight
        return y + bias if bias is not None else y
    shape[channel_dim] = -1
    if weight is not None:
        y = y * weight.view(shape)
    return y + bias.view(shape) if bias is not None else y


def normalize_std_constant(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Re-compute a normalisation layer's output with its standard deviation detached (linear in ``x``).

    Args:
        module: a LayerNorm, GroupNorm, InstanceNorm or RMSNorm.
        x: its input.
    """
    if isinstance(module, nn.LayerNorm) or (hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm)):
        dims = tuple(range(x.ndim - len(module.normalized_shape), x.ndim))
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        if isinstance(module, nn.LayerNorm):
            centred = x - x.mean(dims, keepdim=True)
            y = centred / (centred.pow(2).mean(dims, keepdim=True) + eps).sqrt().detach()
        else:
            y = x / (x.pow(2).mean(dims, keepdim=True) + eps).sqrt().detach()
        return _affine(module, y, -1)
    if isinstance(module, nn.GroupNorm):
        b = x.shape[0]
        xg = x.reshape(b, module.num_groups, -1)
        centred = xg - xg.mean(-1, keepdim=True)
        y = centred / (centred.pow(2).mean(-1, keepdim=True) + module.eps).sqrt().detach()
        return _affine(module, y.reshape(x.shape), 1)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        if module.track_running_stats and not module.training:
            return module.forward(x)  # running statistics: already affine in x
        dims = tuple(range(2, x.ndim))
        centred = x - x.mean(dims, keepdim=True)
        y = centred / (centred.pow(2).mean(dims, keepdim=True) + module.eps).sqrt().detach()
        return _affine(module, y, 1) if module.affine else y
    return module.forward(x)


class _RuleOutput(torch.autograd.Function):
    """Identity on a layer's output whose backward is the layer's LRP rule, straight onto the layer's input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out: torch.Tensor, rule: Callable[[torch.Tensor], torch.Tensor]):
        ctx.rule = rule
        # ``out`` is the layer's detached output: re-using it in place (no copy) keeps it an ordinary tensor that
        # later in-place ops (ReLU(inplace=True)) may modify, which a returned view would forbid
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx, relevance: torch.Tensor):
        return ctx.rule(relevance), None, None


class OutputRule(Hook):
    """A zennit ``Hook`` whose rule is the backward of an identity on the layer's output, wired to the layer input.

    zennit's ``BasicHook`` lets autograd run the layer's own backward and then overwrites its result, and clones
    every layer input to survive in-place ops; here the layer's own backward never runs (its graph is cut) and a
    rule keeps only what it needs (e.g. ``x.clamp(min=0)``). Subclasses implement ``prepare``: called in the forward
    pass with the layer's (detached) input and output, it returns ``relevance_out -> relevance_in``. Instances
    are used like any zennit hook in a composite (``copy``, ``register``, ``remove``).
    """

    def __init__(self):
        super().__init__()
        self._inputs: list[torch.Tensor | None] = []

    def register(self, module: nn.Module) -> RemovableHandleList:
        """Attach to ``module``; the returned handles detach it."""
        return RemovableHandleList(
            [
                RemovableHandle(self),
                module.register_forward_pre_hook(self._pre_forward),
                module.register_forward_hook(self._post_forward),
            ]
        )

    def _pre_forward(self, module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        self._inputs.append(x)
        if x is not None and x.requires_grad and getattr(module, "inplace", False) is True:
            return (x.clone(),) + tuple(args[1:])  # the rule reads the input as it was, not as overwritten
        return None

    def _post_forward(self, module: nn.Module, args: tuple, output: Any) -> torch.Tensor | None:
        x = self._inputs.pop() if self._inputs else None
        if not self.active or x is None or not x.requires_grad or not isinstance(output, torch.Tensor):
            return None
        out = output.detach()
        rule = self.prepare(module, x.detach(), out)
        if rule is None:  # nothing to change: the layer's own gradient is its relevance
            return None
        if out.data_ptr() == x.data_ptr():  # the layer returned (a view of) its input: keep the input intact
            out = out.clone()
        return _RuleOutput.apply(x, out, rule)

    def prepare(
        self, module: nn.Module, x: torch.Tensor, out: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Return the map ``relevance at the output -> relevance at the input`` for this call of ``module``
        (``None``: keep the layer's own gradient, e.g. for an exact identity)."""
        raise NotImplementedError

    def remove(self) -> None:
        """Drop stored tensors and handles."""
        super().remove()
        self._inputs.clear()

    def copy(self) -> OutputRule:
        """Return a fresh copy (one hook instance per module)."""
        return type(self)()


def _stabilize(z: torch.Tensor, stabilizer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``stabilizer(z)``; zennit's default ``Stabilizer`` (``z + eps * sign(z)``, sign(0) = +1) in three ops."""
    if type(stabilizer) is Stabilizer and not stabilizer.clip and not stabilizer.norm_scale:
        eps = stabilizer.epsilon
        return z + torch.where(z >= 0, eps, -eps)
    return stabilizer(z)


def _layer_map(
    module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """A linear / (non-transposed) conv layer's map with the given parameters (no module hooks fire)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    return module._conv_forward(x, weight, bias)


def _input_vjp(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``(d layer(x; weight) / dx)^T grad`` for a linear / conv layer, without re-running the layer's forward."""
    if isinstance(module, nn.Linear):
        return grad @ weight
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        nd = len(module.kernel_size)
        return torch.ops.aten.convolution_backward(
            grad,
            x,
            weight,
            None,
            list(module.stride),
            list(module.padding),
            list(module.dilation),
            False,
            [0] * nd,
            module.groups,
            (True, False, False),
        )[0]
    with torch.enable_grad():  # padding modes / "same": differentiate the layer's own map
        xr = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_layer_map(module, xr, weight, None), xr, grad)
    return g


def _bn_scale(module: nn.Module, ndim: int) -> torch.Tensor | None:
    """``gamma / sqrt(running_var + eps)`` shaped for broadcasting, or None if the BatchNorm uses batch statistics."""
    if module.training or not module.track_running_stats or module.running_var is None:
        return None
    scale = (module.running_var + module.eps).rsqrt()
    if module.weight is not None:
        scale = scale * module.weight.detach()
    return scale.reshape(1, -1, *([1] * (ndim - 2)))


class _EpsilonOutputRule(OutputRule):
    """An output rule that divides by the layer's output stabilised with ``epsilon``."""

    def __init__(self, epsilon: float = 1e-6):
        super().__init__()
        self.epsilon = epsilon
        self.stabilizer = Stabilizer.ensure(epsilon)

    def copy(self) -> _EpsilonOutputRule:
        """Return a fresh copy (one hook instance per module)."""
        return type(self)(self.epsilon)


class EpsilonRule(_EpsilonOutputRule):
    """LRP epsilon rule, equal to zennit's ``Epsilon``: ``R_x = x * W^T (R_y / stabilize(y))``, ``y`` the output.

    Linear / convolution layers (not transposed) and BatchNorm in eval mode (an element-wise affine map, so the
    rule is ``R_x = (a x / stabilize(y)) R_y``); a BatchNorm on batch statistics re-runs its forward as zennit does.

    Args:
        epsilon: stabiliser of the division by the output.
    """

    def prepare(self, module, x, out):
        """Keep ``x`` and the stabilised output (BatchNorm: only their ratio)."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if is_merged_identity(module):
                return None  # merged into the layer before it: now an exact identity, relevance passes as is
            scale = _bn_scale(module, x.ndim)
            if scale is not None:
                ratio = x * scale / _stabilize(out, self.stabilizer)
                return lambda relevance: ratio * relevance
            x = x.clone()

            def generic(relevance: torch.Tensor) -> torch.Tensor:
                with torch.enable_grad():
                    xr = x.detach().requires_grad_(True)
                    y = module.forward(xr)
                    (g,) = torch.autograd.grad(y, xr, relevance / _stabilize(y.detach(), self.stabilizer))
                return x * g

            return generic
        x, den = x.clone(), _stabilize(out, self.stabilizer)
        weight = module.weight.detach()
        return lambda relevance: x * _input_vjp(module, x, weight, relevance / den)


class ZPlusRule(OutputRule):
    """LRP z+ rule (alpha 1, beta 0), equal to zennit's ``ZPlus`` on linear / (non-transposed) conv layers.

    ``z = W+ x+ + b+ + W- x-``; ``R_x = x+ * W+^T (R / stabilize(z)) + x- * W-^T (R / stabilize(z))``. When the
    input has no negative entry (any layer after a ReLU) the ``x-`` half is zero and is skipped.

    Args:
        stabilizer: stabiliser of the division by ``z``.
    """

    def __init__(self, stabilizer: float = 1e-6):
        super().__init__()
        self.stabilizer_value = stabilizer
        self.stabilizer = Stabilizer.ensure(stabilizer)

    def prepare(self, module, x, out):
        """Keep the positive (and, if any, negative) part of the input."""
        xp = x.clamp(min=0)
        xn = x.clamp(max=0) if bool(x.min() < 0) else None

        def rule(relevance: torch.Tensor) -> torch.Tensor:
            w = module.weight.detach()
            wp = w.clamp(min=0)
            bias = module.bias.detach().clamp(min=0) if module.bias is not None else None
            z = _layer_map(module, xp, wp, bias)
            if xn is None:  # z >= 0 here, where the stabiliser adds +eps: one op, in place
                if (
                    type(self.stabilizer) is Stabilizer
                    and not self.stabilizer.clip
                    and not self.stabilizer.norm_scale
                ):
                    z = z.add_(self.stabilizer.epsilon)
                else:
                    z = self.stabilizer(z)
            else:
                wn = w.clamp(max=0)
                z = _stabilize(z + _layer_map(module, xn, wn, None), self.stabilizer)
            s = relevance / z
            rel = xp * _input_vjp(module, xp, wp, s)
            if xn is not None:
                rel = rel + xn * _input_vjp(module, xn, wn, s)
            return rel

        return rule

    def copy(self) -> ZPlusRule:
        """Return a fresh copy."""
        return ZPlusRule(self.stabilizer_value)


class PassRule(OutputRule):
    """zennit's ``Pass`` for element-wise activations: relevance goes to the input unchanged."""

    def prepare(self, module, x, out):
        """Nothing to keep."""
        return _identity


def _identity(relevance: torch.Tensor) -> torch.Tensor:
    return relevance


class NormalizationEpsilon(_EpsilonOutputRule):
    """Epsilon rule for normalisation layers with the standard deviation held constant.

    ``R_in = x * d/dx [ y'(x) . (R_out / stabilize(y)) ]`` where ``y'`` is the layer with detached std; for zero
    shift this conserves relevance exactly (``y'`` is homogeneous in ``x``).

    Args:
        epsilon: stabiliser of the division by the output.
    """

    def prepare(self, module, x, out):
        """Keep the layer input for the backward pass."""
        x = x.clone()

        def rule(relevance: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                xr = x.detach().requires_grad_(True)
                y = normalize_std_constant(module, xr)
                (grad,) = torch.autograd.grad(
                    y, xr, grad_outputs=relevance / _stabilize(y.detach(), self.stabilizer)
                )
            return x * grad

        return rule
