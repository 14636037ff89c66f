"""Integrated Gradients to hidden channels (conductance, Dhamdhere et al. 2018) for every layer at once.

The conductance of unit ``j`` of layer ``L`` on the straight path from a baseline ``x'`` to the input
``x`` is ``sum_k dF/dy_j(x_k) * (y_j(x_{k+1}) - y_j(x_k))``, where ``y`` is the layer output and the
points ``x_k = x' + alpha_k (x - x')`` follow captum's ``LayerConductance`` discretisation exactly
(``n_steps + 1`` points; the gradient is taken at the lower end of each step). Captum attributes to one
layer per call; here the forward/backward passes along the path are shared by all layers, because the
gradient of ``F`` reaching a layer's output through chained layers is still ``dF/dy`` of that layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from monai_iaprune.relevance.hooks import LayerHooks, no_param_grad
from monai_iaprune.relevance.layers import per_sample_channel_sum
from monai_iaprune.relevance.registry import SelectionFn, register_method
from monai_iaprune.utils.batch import first_output

INTEGRATION_METHODS = (
    "riemann_trapezoid",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "gausslegendre",
)
BASELINE_NAMES = ("zeros", "mean", "blur")

BaselineSpec = float | int | str | torch.Tensor


def path_alphas(n_points: int, method: str = "riemann_trapezoid") -> list[float]:
    """Interpolation coefficients in ``[0, 1]`` of the path points, as captum's ``approximation_parameters``.

    Args:
        n_points: number of points on the path (``n_steps + 1`` for conductance).
        method: ``"riemann_trapezoid"`` (0 and 1 included), ``"riemann_left"``, ``"riemann_right"``,
            ``"riemann_middle"`` or ``"gausslegendre"``.

    Returns:
        ascending list of ``n_points`` floats.
    """
    if method not in INTEGRATION_METHODS:
        raise ValueError(f"unknown integration method {method!r}; use one of {list(INTEGRATION_METHODS)}")
    n = n_points
    if method == "gausslegendre":
        import numpy as np

        return (0.5 * (1 + np.polynomial.legendre.leggauss(n)[0])).tolist()
    if method == "riemann_trapezoid":
        return torch.linspace(0, 1, n).tolist()
    if method == "riemann_left":
        return torch.linspace(0, 1 - 1 / n, n).tolist()
    if method == "riemann_middle":
        return torch.linspace(1 / (2 * n), 1 - 1 / (2 * n), n).tolist()
    return torch.linspace(1 / n, 1, n).tolist()  # riemann_right


def resolve_baseline(inputs: torch.Tensor, baseline: BaselineSpec, blur_sigma: float = 5.0) -> torch.Tensor:
    """Return the path's start point as a tensor broadcastable to ``inputs`` (``[B, C, *spatial]``).

    Args:
        inputs: the input batch.
        baseline: a number (constant image), a tensor broadcastable to ``inputs`` (e.g. ``[1, C, *spatial]``
            or ``[B, C, *spatial]``), ``"zeros"``, ``"mean"`` (per-sample, per-channel mean intensity) or
            ``"blur"`` (Gaussian-blurred input, ``blur_sigma`` voxels).
        blur_sigma: standard deviation of the ``"blur"`` baseline, in voxels.

    Raises:
        ValueError: unknown baseline name, or a tensor that does not broadcast to the input shape.
        TypeError: a baseline of another type.
    """
    if isinstance(baseline, bool):
        raise TypeError(f"baseline must be a number, a tensor or one of {list(BASELINE_NAMES)}, got a bool")
    if isinstance(baseline, (int, float)):
        return torch.full((1,) * inputs.ndim, float(baseline), dtype=inputs.dtype, device=inputs.device)
    if isinstance(baseline, str):
        if baseline == "zeros":
            return torch.zeros((1,) * inputs.ndim, dtype=inputs.dtype, device=inputs.device)
        if baseline == "mean":
            if inputs.ndim < 3:
                return inputs.mean(0, keepdim=True).detach()
            return inputs.flatten(2).mean(-1).reshape(*inputs.shape[:2], *(1,) * (inputs.ndim - 2)).detach()
        if baseline == "blur":
            if inputs.ndim < 3:
                raise ValueError(
                    f"baseline 'blur' needs [B, C, *spatial] input, got shape {tuple(inputs.shape)}"
                )
            from monai.networks.layers import GaussianFilter

            blur = GaussianFilter(inputs.ndim - 2, sigma=blur_sigma).to(inputs.device)
            with torch.no_grad():
                return blur(inputs.detach().float()).to(inputs.dtype)
        raise ValueError(
            f"unknown baseline {baseline!r}: use a number, a tensor or one of {list(BASELINE_NAMES)}"
        )
    if isinstance(baseline, torch.Tensor):
        b = baseline.detach().to(device=inputs.device, dtype=inputs.dtype)
        try:
            shape = torch.broadcast_shapes(b.shape, inputs.shape)
        except RuntimeError:
            shape = None
        if shape != inputs.shape:
            raise ValueError(
                f"baseline of shape {tuple(b.shape)} does not broadcast to the input shape {tuple(inputs.shape)}; "
                "give [1, C, *spatial], [B, C, *spatial] or a number"
            )
        return b
    raise TypeError(
        f"baseline must be a number, a tensor or one of {list(BASELINE_NAMES)}, got {type(baseline).__name__}"
    )


class _PathRecorder(LayerHooks):
    """Forward hooks keeping every call's output of each layer (a list per layer, for shared modules).

    A layer whose output is later modified in place (e.g. ``ReLU(inplace=True)`` right after a conv) is
    listed in ``clone``: its hook then hands a copy downstream so the recorded output stays the layer's own.
    """

    def __init__(self, layers: dict[str, nn.Module]):
        super().__init__(layers)
        self.outputs: dict[str, list[tuple[torch.Tensor, int]]] = {}
        self.clone: set[str] = set()

    def _hook(self, name: str) -> Callable:
        def fn(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"layer {name!r} returned {type(output).__name__}; conductance needs a tensor output"
                )
            self.outputs.setdefault(name, []).append((output, output._version))
            if name in self.clone:
                return output.clone()
            return None

        return fn

    def modified_in_place(self) -> set[str]:
        """Names of layers whose recorded output was changed in place after the layer returned it."""
        return {n for n, outs in self.outputs.items() for y, v in outs if y._version != v}


def _check_args(n_steps: int, internal_batch_size: int | None, method: str) -> None:
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer (number of path steps), got {n_steps!r}")
    if internal_batch_size is not None and (
        isinstance(internal_batch_size, bool)
        or not isinstance(internal_batch_size, int)
        or internal_batch_size < 1
    ):
        raise ValueError(
            f"internal_batch_size must be a positive integer or None, got {internal_batch_size!r}"
        )
    if method not in INTEGRATION_METHODS:
        raise ValueError(f"unknown integration method {method!r}; use one of {list(INTEGRATION_METHODS)}")


def _selection_at_input(
    model: nn.Module, inputs: torch.Tensor, select: SelectionFn, group: int
) -> torch.Tensor:
    """``select`` applied to the model output at the real input (forward only, in groups of ``group``)."""
    with torch.no_grad():
        output = torch.cat([model(inputs[i : i + group]) for i in range(0, inputs.shape[0], group)])
    return select(output).detach()


def _path_conductance(
    model: nn.Module,
    x: torch.Tensor,
    base: torch.Tensor,
    sel: torch.Tensor | None,
    select: SelectionFn,
    layers: dict[str, nn.Module],
    alphas: Sequence[float],
    steps_per_chunk: int,
    clone: set[str],
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Conductance ``{name: [b, C]}`` for one group of samples; chunks are walked from the top of the path down.

    Walking down lets the top point (the real input when ``alphas[-1] == 1``) give the selection when
    ``sel`` is None, and needs only the lowest recorded output of the previous chunk (``carry``).
    """
    b = x.shape[0]
    n_points = len(alphas)
    diff = x - base
    result: dict[str, torch.Tensor] = {}
    carry: dict[str, list[torch.Tensor]] = {}
    top = n_points
    while top > 0:
        low = max(0, top - steps_per_chunk)
        steps = list(range(low, top))
        is_top = top == n_points
        # the gradient at the path's last point is never used: a chunk holding only it needs a forward only
        need_grad = not (is_top and len(steps) == 1)
        while True:
            with _PathRecorder(layers) as rec:
                rec.clone = clone
                points = torch.cat([base + alphas[k] * diff for k in steps]).detach()
                with torch.set_grad_enabled(need_grad):
                    output = model(points.requires_grad_(need_grad))
            redo = rec.modified_in_place() - clone
            if not redo:
                break
            clone |= redo  # an in-place op after these layers changed their recorded outputs: record a copy
        if sel is None:
            sel = select(output[-b:].detach()).detach()  # the top point is the input itself
            if sel.shape != output[-b:].shape:
                raise ValueError(
                    f"select() returned shape {tuple(sel.shape)}, expected {tuple(output[-b:].shape)}"
                )
        names = [n for n in layers if n in rec.outputs]
        ys = [y for n in names for y, _ in rec.outputs[n]]
        grads: list[torch.Tensor | None] = [None] * len(ys)
        if need_grad:
            sel_chunk = sel.unsqueeze(0).expand(len(steps), *sel.shape).reshape(output.shape)
            objective = (output * sel_chunk).sum()
            wanted = [i for i, y in enumerate(ys) if y.requires_grad]
            if wanted and objective.requires_grad:
                got = torch.autograd.grad(objective, [ys[i] for i in wanted], allow_unused=True)
                for i, g in zip(wanted, got):
                    grads[i] = g
        i = 0
        for name in names:
            module = layers[name]
            new_carry = []
            for c, (y, _) in enumerate(rec.outputs[name]):
                g = grads[i]
                i += 1
                y = y.detach().reshape(len(steps), b, *y.shape[1:])
                if g is None:
                    g = torch.zeros_like(y)
                else:
                    g = g.detach().reshape(len(steps), b, *y.shape[2:])
                d = (g[:-1] * (y[1:] - y[:-1])).sum(0)
                prev = carry.get(name)
                if prev is not None:
                    d = d + g[-1] * (prev[c] - y[-1])
                new_carry.append(y[0].clone())
                value = per_sample_channel_sum(module, d)
                result[name] = value if name not in result else result[name] + value
            carry[name] = new_carry
        del rec, output, ys, grads
        top = low
    assert sel is not None
    return result, sel


def ig_input_maps(
    model: nn.Module,
    inputs: torch.Tensor,
    selection: torch.Tensor,
    n_steps: int = 16,
    baseline: float | torch.Tensor = 0.0,
    internal_batch_size: int | None = None,
    **_: Any,
) -> torch.Tensor:
    """Integrated Gradients (captum) at the input of ``(selection * output).sum()`` per sample; maps like ``inputs``.

    Args:
        model: the network, in eval mode.
        inputs: ``[B, C, *spatial]``.
        selection: 0/1 selection of the output that is explained, of the output's shape.
        n_steps: IG integration steps.
        baseline: IG baseline: a value or a tensor broadcastable to ``inputs``.
        internal_batch_size: captum's internal batch size (limits memory for 3D inputs).
    """
    from captum.attr import IntegratedGradients

    def selected_score(x: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        out = first_output(model(x))
        if out.shape != sel.shape:
            raise ValueError(
                f"selection of shape {tuple(sel.shape)} does not match the model output {tuple(out.shape)}"
            )
        return (out * sel).flatten(1).sum(1)

    # the selection travels as an additional forward arg so captum repeats it for every IG step
    base = baseline if isinstance(baseline, torch.Tensor) else torch.full_like(inputs, float(baseline))
    return IntegratedGradients(selected_score).attribute(
        inputs,
        baselines=base.to(inputs.device, inputs.dtype).expand_as(inputs),
        additional_forward_args=(selection,),
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
    )


@register_method("ig", shared_scale=True, input_maps=ig_input_maps)
def conductance(
    model: nn.Module,
    inputs: torch.Tensor,
    select: SelectionFn,
    layers: dict[str, nn.Module],
    n_steps: int = 8,
    baseline: BaselineSpec = 0.0,
    internal_batch_size: int | None = None,
    method: str = "riemann_trapezoid",
    blur_sigma: float = 5.0,
    **_,
) -> dict[str, torch.Tensor]:
    """Per-sample, per-channel conductance of every layer in ``layers``, from one set of path passes.

    Equals captum's ``LayerConductance(model, layer).attribute(inputs, baselines, target, n_steps, method)``
    summed over the layer's positions, for each layer, but runs the ``n_steps + 1`` forward/backward
    passes once for all layers. The explained quantity is ``F = (select(output) * output).sum()`` per
    sample, with the selection fixed at the real input (so a ``"pred"`` target does not change along the path).

    Args:
        model: the network, in eval mode (``channel_relevance`` sets it; BatchNorm in train mode would mix
            the path points of a batch).
        inputs: input batch ``[B, C, *spatial]``.
        select: ``output -> 0/1 selection`` of what is explained (see ``targets``).
        layers: ``{name: module}`` of conv / linear layers to score.
        n_steps: number of path steps (``n_steps + 1`` points, each a forward and backward pass).
        baseline: path start: a number, a tensor broadcastable to ``inputs``, ``"zeros"``, ``"mean"`` or
            ``"blur"`` (see ``resolve_baseline``).
        internal_batch_size: at most this many rows (samples x path points) per forward/backward pass;
            None runs all ``B * (n_steps + 1)`` rows at once. Smaller than ``B`` splits the batch.
        method: captum's integration rule: ``"riemann_trapezoid"`` (path from the baseline to the input,
            default), ``"riemann_left"``, ``"riemann_right"``, ``"riemann_middle"`` or ``"gausslegendre"``.
        blur_sigma: Gaussian sigma in voxels of the ``"blur"`` baseline.

    Returns:
        ``{name: [B, C]}`` signed conductance (sum over spatial / token positions) for each layer reached.
    """
    _check_args(n_steps, internal_batch_size, method)
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a tensor, got {type(inputs).__name__}")
    x = inputs.detach()
    batch = x.shape[0]
    base = torch.broadcast_to(resolve_baseline(x, baseline, blur_sigma), x.shape)
    alphas = path_alphas(n_steps + 1, method)
    n_points = len(alphas)
    if internal_batch_size is None:
        group, steps_per_chunk = batch, n_points
    else:
        group = min(batch, internal_batch_size)
        steps_per_chunk = max(1, internal_batch_size // group)
    sel = None
    if alphas[-1] != 1.0 or group < batch:
        # the top point is not the input, or a group would see part of the label: select on the real input
        sel = _selection_at_input(model, x, select, group)
        if sel.shape[0] != batch:
            raise ValueError(f"select() returned shape {tuple(sel.shape)} for a batch of {batch}")
    clone: set[str] = set()
    out: dict[str, list[torch.Tensor]] = {}
    with no_param_grad(model):
        for start in range(0, batch, group):
            part = slice(start, start + group)
            values, _ = _path_conductance(
                model,
                x[part],
                base[part],
                None if sel is None else sel[part],
                select,
                layers,
                alphas,
                steps_per_chunk,
                clone,
            )
            for name, v in values.items():
                out.setdefault(name, []).append(v)
    return {name: torch.cat(v) for name, v in out.items()}


__all__ = [
    "BASELINE_NAMES",
    "INTEGRATION_METHODS",
    "conductance",
    "ig_input_maps",
    "path_alphas",
    "resolve_baseline",
]
