"""Input attribution maps that stay differentiable with respect to the model's parameters.

The report's maps (``report.explanations.attribution_maps``: captum IG, zennit LRP) are detached: they
measure explanations. A training objective on explanations needs maps it can back-propagate through,
i.e. gradients taken with ``create_graph=True`` (double backprop). Two cheap ones are registered here:

- ``"grad_x_input"``: ``x * d score / d x`` (Shrikumar et al. 2016; Ancona et al. 2018), one backward.
- ``"ig"``: Integrated Gradients (Sundararajan et al. 2017) with a few right-Riemann steps
  ``alpha = 1, (n-1)/n, ..., 1/n`` on a constant baseline; ``n_steps=1`` with baseline 0 is ``grad_x_input``.

``score`` is ``(selection * output).sum`` per sample (``relevance.targets``: a class logit, or a class logit
summed over a segmentation mask). Every explainer has the signature
``fn(model, inputs, select, *, create_graph=False, **kwargs) -> (maps [B, C, *spatial], output)`` where
``select(output) -> selection`` is called once on the output at the unmodified input, so the caller can
derive the selection from it (e.g. the prediction) or impose another model's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from monai_iaprune.utils.batch import first_output

DifferentiableExplainer = Callable[..., tuple[torch.Tensor, torch.Tensor]]
DIFFERENTIABLE_EXPLAINERS: dict[str, DifferentiableExplainer] = {}


def register_differentiable_explainer(name: str):
    """Register ``fn(model, inputs, select, *, create_graph=False, **kwargs) -> (maps, output)`` under ``name``."""

    def deco(fn: DifferentiableExplainer) -> DifferentiableExplainer:
        DIFFERENTIABLE_EXPLAINERS[name] = fn
        return fn

    return deco


def _score(out: torch.Tensor, selection: torch.Tensor) -> torch.Tensor:
    if selection.shape != out.shape:
        raise ValueError(
            f"selection of shape {tuple(selection.shape)} does not match the model output {tuple(out.shape)}"
        )
    return (out * selection.detach().to(out.dtype)).sum()


@register_differentiable_explainer("grad_x_input")
def gradient_x_input(
    model: nn.Module,
    inputs: torch.Tensor,
    select: Callable[[torch.Tensor], torch.Tensor],
    *,
    create_graph: bool = False,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient x input of the selected output.

    Args:
        model: the network (its mode is the caller's choice).
        inputs: ``[B, C, *spatial]``; not modified.
        select: ``output -> selection`` of the output's shape (see ``relevance.targets.target_selection``).
        create_graph: keep the graph of the gradient, so the maps can be differentiated w.r.t. the parameters.

    Returns:
        ``(maps [B, C, *spatial], output)``.
    """
    x = inputs.detach().requires_grad_(True)
    out = first_output(model(x))
    (grad,) = torch.autograd.grad(_score(out, select(out)), x, create_graph=create_graph)
    return grad * x.detach(), out


@register_differentiable_explainer("ig")
def integrated_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    select: Callable[[torch.Tensor], torch.Tensor],
    *,
    create_graph: bool = False,
    n_steps: int = 4,
    baseline: float | torch.Tensor = 0.0,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Few-step Integrated Gradients of the selected output (right Riemann sum, steps run one by one).

    Steps are separate forward passes rather than one stacked batch, so a network in train mode
    (BatchNorm batch statistics) sees the same batch composition as at the input.

    Args:
        model: the network.
        inputs: ``[B, C, *spatial]``.
        select: ``output -> selection``; called on the output at ``alpha = 1`` (the unmodified input).
        create_graph: keep the graph for double backprop.
        n_steps: integration steps (>= 1).
        baseline: a value or a tensor broadcastable to ``inputs``.

    Returns:
        ``(maps [B, C, *spatial], output at the input)``.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    x = inputs.detach()
    base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)
    total, out, selection = None, None, None
    for k in range(n_steps, 0, -1):
        xk = (base + (k / n_steps) * (x - base)).requires_grad_(True)
        o = first_output(model(xk))
        if selection is None:
            out, selection = o, select(o)
        (g,) = torch.autograd.grad(_score(o, selection), xk, create_graph=create_graph)
        total = g if total is None else total + g
    return total / n_steps * (x - base), out


__all__ = [
    "DIFFERENTIABLE_EXPLAINERS",
    "gradient_x_input",
    "integrated_gradients",
    "register_differentiable_explainer",
]
