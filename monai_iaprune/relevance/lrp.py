"""Layer-wise relevance propagation (zennit) to every conv / linear layer's output channels, 2D and 3D.

Under a zennit composite the gradient that arrives at a layer's output *is* its relevance (zennit's rule hooks
return relevance in place of gradients), so one modified backward pass from ``select(output) * output`` gives
the relevance of every channel of every layer at once; ``OutputRecorder`` reads it off the layer outputs.

Rules beyond zennit's built-in composites (prepended to every named composite):

- BatchNorm that could not be merged into a preceding conv (DenseNet's pre-activation norms after a
  concatenation) gets the epsilon rule as an element-wise affine layer, so its shift acts as a bias.
- LayerNorm / GroupNorm / InstanceNorm (and RMSNorm) get the epsilon rule on the normalisation with its
  standard deviation held constant (the "LN rule" of Ali et al. 2022): centring and scaling are then linear,
  and relevance is conserved up to the affine shift. This lets LRP run on ViT, SwinUNETR and UNets with
  instance norm.
- Residual sums, SE gates and attention are rewritten by the canonizers in ``relevance.canonizers``.

Cost: the named composites run zennit's rules for linear / conv layers, BatchNorm and activations as
``OutputRule`` hooks (``EpsilonRule``, ``ZPlusRule``, ``PassRule``): the same values as zennit's ``Epsilon``,
``ZPlus`` and ``Pass`` (tested layer by layer), but the layer's own backward, which zennit computes and then
discards, never runs, no layer input is copied, and z+ skips the ``x-`` half where the input has no negative
entry (after a ReLU). BatchNorms merged into the preceding layer become exact identities (no rule). The
BatchNorm merge plan is traced once per model and input shape, and ``lrp_session`` (used by
``channel_relevance``) applies canonizers and hooks once for all batches.

A leaf module that has parameters but no rule (e.g. a custom layer, ``nn.MultiheadAttention``) raises
``NotImplementedError`` naming it, rather than silently passing plain gradients through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from zennit.canonizers import Canonizer
from zennit.composites import (
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    LayerMapComposite,
    SpecialFirstLayerMapComposite,
    layer_map_base,
)
from zennit.core import Composite, Hook, RemovableHandle, RemovableHandleList, Stabilizer
from zennit.rules import Epsilon, Flat, ZPlus
from zennit.types import Activation, Convolution, ConvolutionStandard
from zennit.types import Linear as ZennitLinear

from monai_iaprune.relevance.canonizers import auto_canonizers, is_merged_identity
from monai_iaprune.relevance.collect import SelectionFn, register_method
from monai_iaprune.relevance.hooks import OutputRecorder, no_param_grad
from monai_iaprune.relevance.layers import per_sample_channel_sum
from monai_iaprune.relevance.targets import target_selection

__all__ = [
    "COMPOSITES",
    "NORM_TYPES",
    "EpsilonRule",
    "NormalizationEpsilon",
    "OutputRule",
    "PassRule",
    "ZPlusRule",
    "input_relevance",
    "lrp",
    "lrp_session",
    "make_composite",
    "resolve_canonizers",
]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

CanonizerSpec = str | Sequence[Canonizer] | None


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


class EpsilonRule(OutputRule):
    """LRP epsilon rule, equal to zennit's ``Epsilon``: ``R_x = x * W^T (R_y / stabilize(y))``, ``y`` the output.

    Linear / convolution layers (not transposed) and BatchNorm in eval mode (an element-wise affine map, so the
    rule is ``R_x = (a x / stabilize(y)) R_y``); a BatchNorm on batch statistics re-runs its forward as zennit does.

    Args:
        epsilon: stabiliser of the division by the output.
    """

    def __init__(self, epsilon: float = 1e-6):
        super().__init__()
        self.epsilon = epsilon
        self.stabilizer = Stabilizer.ensure(epsilon)

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

    def copy(self) -> EpsilonRule:
        """Return a fresh copy."""
        return EpsilonRule(self.epsilon)


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

    def copy(self) -> PassRule:
        """Return a fresh copy."""
        return PassRule()


def _identity(relevance: torch.Tensor) -> torch.Tensor:
    return relevance


class NormalizationEpsilon(OutputRule):
    """Epsilon rule for normalisation layers with the standard deviation held constant.

    ``R_in = x * d/dx [ y'(x) . (R_out / stabilize(y)) ]`` where ``y'`` is the layer with detached std; for zero
    shift this conserves relevance exactly (``y'`` is homogeneous in ``x``).

    Args:
        epsilon: stabiliser of the division by the output.
    """

    def __init__(self, epsilon: float = 1e-6):
        super().__init__()
        self.epsilon = epsilon
        self.stabilizer = Stabilizer.ensure(epsilon)

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

    def copy(self) -> NormalizationEpsilon:
        """Return a fresh copy (one hook instance per module)."""
        return NormalizationEpsilon(self.epsilon)


def _extra_layer_map(epsilon: float) -> list[tuple[Any, Hook]]:
    return [
        (nn.modules.batchnorm._BatchNorm, EpsilonRule(epsilon)),
        (NORM_TYPES, NormalizationEpsilon(epsilon)),
        (Activation, PassRule()),
    ]


# layers the output-rule versions of zennit's rules cover; transposed convolutions keep zennit's own rules
_OUTPUT_RULE_TYPES = (nn.Linear, ConvolutionStandard)


def _epsilon(epsilon: float, stabilizer: float, canonizers: list[Canonizer]) -> Composite:
    layer_map = (
        _extra_layer_map(epsilon)
        + layer_map_base(stabilizer)
        + [(_OUTPUT_RULE_TYPES, EpsilonRule(epsilon)), (ZennitLinear, Epsilon(epsilon=epsilon))]
    )
    return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)


def _zplus(epsilon: float, stabilizer: float, canonizers: list[Canonizer]) -> Composite:
    layer_map = (
        _extra_layer_map(epsilon)
        + layer_map_base(stabilizer)
        + [(_OUTPUT_RULE_TYPES, ZPlusRule(stabilizer)), (ZennitLinear, ZPlus(stabilizer=stabilizer))]
    )
    return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)


def _epsilon_plus_flat(epsilon: float, stabilizer: float, canonizers: list[Canonizer]) -> Composite:
    # zennit's EpsilonPlusFlat with its ZPlus / Epsilon as output rules (same values, see tests/test_lrp.py)
    layer_map = (
        _extra_layer_map(epsilon)
        + layer_map_base(stabilizer)
        + [
            (ConvolutionStandard, ZPlusRule(stabilizer)),
            (Convolution, ZPlus(stabilizer=stabilizer)),
            (nn.Linear, EpsilonRule(epsilon)),
        ]
    )
    first_map = [(ZennitLinear, Flat(stabilizer=stabilizer))]
    return SpecialFirstLayerMapComposite(layer_map=layer_map, first_map=first_map, canonizers=canonizers)


def _zennit(cls: type) -> Callable[[float, float, list[Canonizer]], Composite]:
    def build(epsilon: float, stabilizer: float, canonizers: list[Canonizer]) -> Composite:
        return cls(
            epsilon=epsilon, stabilizer=stabilizer, layer_map=_extra_layer_map(epsilon), canonizers=canonizers
        )

    return build


COMPOSITES: dict[str, Callable[[float, float, list[Canonizer]], Composite]] = {
    "epsilon": _epsilon,
    "zplus": _zplus,
    "alpha_beta": _zennit(EpsilonAlpha2Beta1),
    "epsilon_plus_flat": _epsilon_plus_flat,
    "epsilon_alpha2beta1_flat": _zennit(EpsilonAlpha2Beta1Flat),
}
"""Composite names: ``"epsilon"`` (Epsilon on every conv / linear), ``"zplus"`` (ZPlus on every conv / linear),
``"alpha_beta"`` (AlphaBeta(2, 1) on convs, Epsilon on dense layers), ``"epsilon_plus_flat"`` (Flat on the first
layer, ZPlus on convs, Epsilon on dense layers) and ``"epsilon_alpha2beta1_flat"``."""


def resolve_canonizers(
    model: nn.Module, inputs: torch.Tensor, canonizers: CanonizerSpec, epsilon: float = 1e-6
) -> list[Canonizer]:
    """Turn a canonizer spec into a list: ``"auto"`` picks what ``model`` needs, ``None`` gives none.

    Args:
        model: the network.
        inputs: an input batch (its first sample traces BatchNorm merging).
        canonizers: ``"auto"``, ``None`` or a sequence of zennit canonizers (used as given).
        epsilon: stabiliser of the epsilon rule inside attention canonizers.
    """
    if canonizers is None:
        return []
    if isinstance(canonizers, str):
        if canonizers != "auto":
            raise ValueError(
                f"canonizers must be 'auto', None or a list of zennit canonizers, got {canonizers!r}"
            )
        return auto_canonizers(model, inputs[:1], epsilon)
    canonizers = list(canonizers)
    bad = [type(c).__name__ for c in canonizers if not isinstance(c, Canonizer)]
    if bad:
        raise TypeError(f"canonizers must be zennit Canonizer instances, got {bad}")
    return canonizers


def make_composite(
    composite: str | Composite,
    epsilon: float = 1e-6,
    stabilizer: float = 1e-6,
    canonizers: Sequence[Canonizer] = (),
) -> Composite:
    """Build a named composite with the given canonizers (or return a given zennit ``Composite`` unchanged).

    Args:
        composite: a name in ``COMPOSITES`` or a zennit ``Composite`` instance.
        epsilon: epsilon of the Epsilon rule (and of the normalisation rules).
        stabilizer: stabiliser of the other rules (ZPlus, AlphaBeta, Flat, Norm on sums and average pools).
        canonizers: canonizers the composite applies before registering its rules.
    """
    if isinstance(composite, Composite):
        return composite
    if not isinstance(composite, str) or composite not in COMPOSITES:
        raise ValueError(
            f"unknown LRP composite {composite!r}; available: {sorted(COMPOSITES)} or a zennit Composite"
        )
    return COMPOSITES[composite](epsilon, stabilizer, list(canonizers))


def _unruled_layers(model: nn.Module, composite: Composite) -> list[tuple[str, str]]:
    """Leaf modules with parameters that ``composite`` maps to no rule (plus MultiheadAttention, mapped to Pass)."""
    ctx: dict = {}
    bad = []
    for name, module in model.named_modules():
        hook = composite.module_map(ctx, name, module)
        if isinstance(module, nn.MultiheadAttention):
            bad.append((name, type(module).__name__))
            continue
        has_params = next(module.parameters(recurse=False), None) is not None
        if hook is None and has_params and next(module.children(), None) is None:
            bad.append((name, type(module).__name__))
    return bad


@contextmanager
def lrp_context(
    model: nn.Module,
    inputs: torch.Tensor,
    composite: str | Composite = "epsilon_plus_flat",
    epsilon: float = 1e-6,
    stabilizer: float = 1e-6,
    canonizers: CanonizerSpec = "auto",
) -> Iterator[Composite]:
    """Context in which ``model``'s gradients are LRP relevance: canonizers applied, rule hooks registered.

    Args:
        model: the network, in eval mode.
        inputs: an input batch (used to trace BatchNorm merging when ``canonizers="auto"``).
        composite: a name in ``COMPOSITES`` or a zennit ``Composite``.
        epsilon, stabilizer: see ``make_composite``.
        canonizers: ``"auto"``, ``None`` or a list of zennit canonizers. With a given ``Composite`` instance,
            these are applied before the composite's own canonizers.

    Raises:
        NotImplementedError: a layer with parameters has no LRP rule.
    """
    extra = resolve_canonizers(model, inputs, canonizers, epsilon)
    comp = make_composite(composite, epsilon, stabilizer, extra)
    own = None
    if not isinstance(composite, str) and extra:
        own = comp.canonizers
        comp.canonizers = extra + list(own)
    try:
        with comp.context(model):
            bad = _unruled_layers(model, comp)
            if bad:
                listing = ", ".join(f"{n!r} ({t})" for n, t in bad[:5])
                raise NotImplementedError(
                    f"LRP has no rule for {len(bad)} layer(s) with parameters in {type(model).__name__}: {listing}. "
                    "Add a rule for them to the zennit composite (layer_map) or a canonizer, or score this model "
                    "with another relevance method, e.g. method='taylor' or method='ig'"
                )
            yield comp
    finally:
        if own is not None:
            comp.canonizers = own


def _explain(
    model: nn.Module, x: torch.Tensor, select: SelectionFn, rec: OutputRecorder
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward ``x`` (requires grad) through a model with rule hooks and propagate ``select(output) * output``."""
    rec.clear()
    output = model(x)
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        output = output[0]  # e.g. MONAI ViT returns (logits, hidden states): explain the logits
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"LRP needs a model that returns a tensor, got {type(output).__name__}")
    start = (select(output) * output).detach()
    (relevance,) = torch.autograd.grad(output, x, grad_outputs=start, allow_unused=True)
    if relevance is None:
        relevance = torch.zeros_like(x)
    grads = {name: g.detach() for name, g in rec.grads.items()}
    rec.clear()
    return relevance.detach(), grads


def _propagate(
    model: nn.Module,
    inputs: torch.Tensor,
    select: SelectionFn,
    layers: dict[str, nn.Module],
    composite: str | Composite,
    epsilon: float,
    stabilizer: float,
    canonizers: CanonizerSpec,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One LRP pass: ``(input relevance, {layer name: relevance at the layer output})``."""
    with no_param_grad(model), torch.enable_grad():
        x = inputs.detach().clone().requires_grad_(True)
        with lrp_context(model, x, composite, epsilon, stabilizer, canonizers):
            # registered after zennit's hooks, so the recorded gradient is the relevance arriving at each layer
            with OutputRecorder(layers) as rec:
                return _explain(model, x, select, rec)


# Default composite for *channel scoring*. Measured in BENCHMARKS.md (BreastMNIST / PneumoniaMNIST, 70 % and 90 %
# parameters removed, BN re-calibrated, no fine-tune, 3 seeds): the epsilon rule ranks channels far better than
# epsilon-plus-flat (PneumoniaMNIST AUC 0.87 vs 0.50 at 70 %), whose z+ rule scores only positive evidence.
# Input heatmaps (``input_relevance``) keep epsilon-plus-flat, the usual choice for readable maps.
PRUNING_COMPOSITE = "epsilon"


@register_method("lrp")
def lrp(
    model: nn.Module,
    inputs: torch.Tensor,
    select: SelectionFn,
    layers: dict[str, nn.Module],
    composite: str | Composite = PRUNING_COMPOSITE,
    epsilon: float = 1e-6,
    canonizers: CanonizerSpec = "auto",
    stabilizer: float = 1e-6,
    **_: Any,
) -> dict[str, torch.Tensor]:
    """LRP relevance of each output channel of ``layers``, per sample: ``{name: [B, C]}``.

    Relevance at a layer's output, summed over spatial / token positions; the start relevance is
    ``select(output) * output``. Each call applies and removes the canonizers and rule hooks; over many
    batches, ``lrp_session`` (which ``channel_relevance`` uses) keeps them in place instead.

    Args:
        model: the network, in eval mode (``channel_relevance`` does this).
        inputs: an input batch ``[B, C, *spatial]``.
        select: ``output -> 0/1 selection`` of what is explained (see ``relevance.targets``).
        layers: ``{qualified name: conv / linear module}`` to score.
        composite: a name in ``COMPOSITES`` or a zennit ``Composite`` instance.
        epsilon: epsilon of the Epsilon rule.
        canonizers: ``"auto"`` (the MONAI canonizers the model needs), ``None``, or a list of zennit canonizers.
        stabilizer: stabiliser of the other rules.
    """
    _, grads = _propagate(model, inputs, select, layers, composite, epsilon, stabilizer, canonizers)
    return {name: per_sample_channel_sum(layers[name], g) for name, g in grads.items() if name in layers}


@contextmanager
def lrp_session(
    model: nn.Module,
    layers: dict[str, nn.Module],
    composite: str | Composite = PRUNING_COMPOSITE,
    epsilon: float = 1e-6,
    canonizers: CanonizerSpec = "auto",
    stabilizer: float = 1e-6,
    **_: Any,
) -> Iterator[Callable[..., dict[str, torch.Tensor]]]:
    """Keep ``model`` canonized and hooked for LRP over many batches; yields a per-batch function like ``lrp``.

    The canonizers and rule hooks are applied at the first batch (``"auto"`` traces BatchNorm merging on its first
    sample) and removed when the session ends, instead of once per batch; the values equal ``lrp``'s. The yielded
    function takes ``lrp``'s arguments; a call for another model or layer set falls back to ``lrp``.

    Args:
        model: the network, in eval mode.
        layers: ``{qualified name: conv / linear module}`` to score.
        composite, epsilon, canonizers, stabilizer: see ``lrp``.
    """
    with ExitStack() as stack:
        recorder: list[OutputRecorder] = []

        def per_batch(
            model_: nn.Module,
            inputs: torch.Tensor,
            select: SelectionFn,
            layers_: dict[str, nn.Module],
            **__: Any,
        ) -> dict[str, torch.Tensor]:
            if model_ is not model or layers_ is not layers:
                return lrp(model_, inputs, select, layers_, composite, epsilon, canonizers, stabilizer)
            with torch.enable_grad():
                x = inputs.detach().clone().requires_grad_(True)
                if not recorder:
                    stack.enter_context(no_param_grad(model))
                    stack.enter_context(lrp_context(model, x, composite, epsilon, stabilizer, canonizers))
                    recorder.append(stack.enter_context(OutputRecorder(layers)))
                _, grads = _explain(model, x, select, recorder[0])
            return {
                name: per_sample_channel_sum(layers[name], g) for name, g in grads.items() if name in layers
            }

        yield per_batch


lrp.session = lrp_session


def input_relevance(
    model: nn.Module,
    inputs: torch.Tensor,
    select: SelectionFn | None = None,
    composite: str | Composite = "epsilon_plus_flat",
    canonizers: CanonizerSpec = "auto",
    epsilon: float = 1e-6,
    stabilizer: float = 1e-6,
) -> torch.Tensor:
    """LRP heatmap at the input (same shape as ``inputs``), e.g. for explanation maps in reports.

    The model is put in eval mode for the pass and restored afterwards.

    Args:
        model: the network.
        inputs: an input batch ``[B, C, *spatial]``.
        select: ``output -> 0/1 selection`` of what is explained; default the predicted class (or, for
            segmentation, every predicted foreground class over its predicted mask).
        composite: a name in ``COMPOSITES`` or a zennit ``Composite`` instance.
        canonizers: ``"auto"``, ``None`` or a list of zennit canonizers.
        epsilon, stabilizer: see ``make_composite``.
    """
    if select is None:

        def select(output: torch.Tensor) -> torch.Tensor:
            return target_selection(output, None, "pred")

    was_training = model.training
    model.eval()
    try:
        relevance, _ = _propagate(model, inputs, select, {}, composite, epsilon, stabilizer, canonizers)
    finally:
        model.train(was_training)
    return relevance
