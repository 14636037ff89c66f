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

A leaf module that has parameters but no rule (e.g. a custom layer, ``nn.MultiheadAttention``) raises
``NotImplementedError`` naming it, rather than silently passing plain gradients through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from zennit.canonizers import Canonizer
from zennit.composites import (
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    EpsilonPlusFlat,
    LayerMapComposite,
    layer_map_base,
)
from zennit.core import Composite, Hook, Stabilizer
from zennit.rules import Epsilon, ZPlus
from zennit.types import Linear as ZennitLinear

from monai_iaprune.relevance.canonizers import auto_canonizers
from monai_iaprune.relevance.collect import SelectionFn, register_method
from monai_iaprune.relevance.hooks import OutputRecorder, no_param_grad
from monai_iaprune.relevance.layers import per_sample_channel_sum
from monai_iaprune.relevance.targets import target_selection

__all__ = [
    "COMPOSITES",
    "NORM_TYPES",
    "NormalizationEpsilon",
    "input_relevance",
    "lrp",
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


class NormalizationEpsilon(Hook):
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

    def forward(self, module: nn.Module, input: tuple, output: Any) -> None:
        """Keep the layer input for the backward pass."""
        self.stored_tensors["input"] = input

    def backward(self, module: nn.Module, grad_input: tuple, grad_output: tuple) -> tuple:
        """Redistribute the output relevance ``grad_output[0]`` onto the input."""
        x = self.stored_tensors["input"][0].detach().requires_grad_(True)
        with torch.enable_grad():
            y = normalize_std_constant(module, x)
        (grad,) = torch.autograd.grad(y, x, grad_outputs=grad_output[0] / self.stabilizer(y.detach()))
        relevance = x.detach() * grad
        return tuple(relevance if g is not None and g.shape == relevance.shape else None for g in grad_input)

    def copy(self) -> NormalizationEpsilon:
        """Return a fresh copy (one hook instance per module)."""
        return NormalizationEpsilon(self.epsilon)


def _extra_layer_map(epsilon: float) -> list[tuple[Any, Hook]]:
    return [
        (nn.modules.batchnorm._BatchNorm, Epsilon(epsilon=epsilon)),
        (NORM_TYPES, NormalizationEpsilon(epsilon)),
    ]


def _epsilon(epsilon: float, stabilizer: float, canonizers: list[Canonizer]) -> Composite:
    layer_map = (
        _extra_layer_map(epsilon) + layer_map_base(stabilizer) + [(ZennitLinear, Epsilon(epsilon=epsilon))]
    )
    return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)


def _zplus(epsilon: float, stabilizer: float, canonizers: list[Canonizer]) -> Composite:
    layer_map = (
        _extra_layer_map(epsilon)
        + layer_map_base(stabilizer)
        + [(ZennitLinear, ZPlus(stabilizer=stabilizer))]
    )
    return LayerMapComposite(layer_map=layer_map, canonizers=canonizers)


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
    "epsilon_plus_flat": _zennit(EpsilonPlusFlat),
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
                output = model(x)
                if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
                    output = output[0]  # e.g. MONAI ViT returns (logits, hidden states): explain the logits
                if not isinstance(output, torch.Tensor):
                    raise TypeError(f"LRP needs a model that returns a tensor, got {type(output).__name__}")
                start = (select(output) * output).detach()
                (relevance,) = torch.autograd.grad(output, x, grad_outputs=start, allow_unused=True)
    if relevance is None:
        relevance = torch.zeros_like(x)
    return relevance.detach(), {name: g.detach() for name, g in rec.grads.items()}


@register_method("lrp")
def lrp(
    model: nn.Module,
    inputs: torch.Tensor,
    select: SelectionFn,
    layers: dict[str, nn.Module],
    composite: str | Composite = "epsilon_plus_flat",
    epsilon: float = 1e-6,
    canonizers: CanonizerSpec = "auto",
    stabilizer: float = 1e-6,
    **_: Any,
) -> dict[str, torch.Tensor]:
    """LRP relevance of each output channel of ``layers``, per sample: ``{name: [B, C]}``.

    Relevance at a layer's output, summed over spatial / token positions; the start relevance is
    ``select(output) * output``.

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
