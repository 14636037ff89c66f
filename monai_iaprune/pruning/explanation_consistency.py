"""Explanation-consistency loss: fine-tune a pruned network so its input attribution maps stay the unpruned one's.

After pruning and BatchNorm re-calibration the pruned network still classifies, but its input attribution
maps drift from the unpruned network's (median Spearman of IG maps 0.60-0.72 on MedMNIST). This term,
added to the fine-tuning loss, pulls them back: the unpruned network is a frozen *teacher*; on every
training batch both networks' differentiable maps (``relevance.differentiable_maps``) of the same explained
output are compared, and the distance is back-propagated (double backprop) into the *student* only.

Train on one explainer, evaluate on another: the cheap ``grad_x_input`` (or few-step ``ig``) used here is
what the student is fitted to, so agreement measured with the same explainer would be optimistic. The
report (``report.explanations``) should measure agreement with captum IG (many steps) and / or LRP, which
the student never saw.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from monai_iaprune.relevance.differentiable_maps import DIFFERENTIABLE_EXPLAINERS
from monai_iaprune.relevance.hooks import no_param_grad
from monai_iaprune.relevance.targets import TargetSpec, target_selection

DISTANCES = ("pearson", "cosine")


def map_distance(a: torch.Tensor, b: torch.Tensor, distance: str = "pearson") -> torch.Tensor:
    """Per-sample distance ``1 - similarity`` of two batches of maps ``[B, ...]``, in [0, 2].

    Args:
        a, b: maps of the same shape; sample ``i`` of ``a`` is compared with sample ``i`` of ``b``.
        distance: ``"pearson"`` (each map centred, then cosine) or ``"cosine"`` (uncentred).

    Returns:
        ``[B]`` distances; 0 for maps equal up to a positive scale (and, for Pearson, an offset).
    """
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; use one of {DISTANCES}")
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    dtype = torch.promote_types(a.dtype, torch.float32)  # at least float32 (AMP maps may be half)
    a, b = a.flatten(1).to(dtype), b.flatten(1).to(dtype)
    if distance == "pearson":
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
    # a detached positive rescale leaves the similarity and its gradient unchanged and keeps the norms
    # far from the clamp below, so identical maps give exactly 0 (up to rounding) at any logit scale
    a = a / a.detach().abs().amax(1, keepdim=True).clamp_min(1e-30)
    b = b / b.detach().abs().amax(1, keepdim=True).clamp_min(1e-30)
    sim = (a * b).sum(1) / ((a * a).sum(1) * (b * b).sum(1)).clamp_min(1e-12).sqrt()
    return 1.0 - sim


def _checked_explainer_kwargs(explainer: str, kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``kwargs`` after checking them against ``explainer``'s keyword parameters, so that a misspelt key or a
    bad step count stops the run when it is configured, not at the first training step (or never: the
    explainers swallow unknown keywords)."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"explainer_kwargs must be a dict or None, got {type(kwargs).__name__}")
    params = inspect.signature(DIFFERENTIABLE_EXPLAINERS[explainer]).parameters
    accepted = sorted(n for n, p in params.items() if p.kind == p.KEYWORD_ONLY and n != "create_graph")
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise ValueError(
            f"explainer_kwargs {unknown} not accepted by explainer {explainer!r}; "
            f"it takes {accepted or 'no settings'}"
        )
    if "n_steps" in kwargs:
        n = kwargs["n_steps"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"bad explainer_kwargs n_steps {n!r}: need an integer >= 1")
    return dict(kwargs)


class _EvalMode:
    """Put modules in eval mode and restore their training flags afterwards."""

    def __init__(self, *models: nn.Module):
        self.models, self.flags = models, []

    def __enter__(self) -> None:
        self.flags = [m.training for m in self.models]
        for m in self.models:
            m.eval()

    def __exit__(self, *exc: Any) -> None:
        for m, f in zip(self.models, self.flags):
            m.train(f)


class ExplanationConsistencyLoss:
    """Distance between a student's and a frozen teacher's input attribution maps on a batch (+ optional distillation).

    ``loss = mean_b distance(map_student_b, map_teacher_b) + distill_weight * T^2 * KL(teacher_T || student_T)``

    Design:

    - Explainer: ``"grad_x_input"`` by default: one extra forward / double backward per batch, the cheapest map
      that depends on the parameters through the whole network. ``"ig"`` (``n_steps`` steps) costs
      ``n_steps`` times more and follows IG, the report's main explainer, more closely; evaluate with the
      explainer(s) the student was *not* trained on (see the module docstring).
    - Distance: ``1 - Pearson`` correlation of per-sample maps summed over input channels (default). The
      agreement the report measures is Spearman rank correlation: invariant to the maps' scale and offset.
      Pearson is its differentiable analogue with the same invariances, so the term spends no effort on the
      scale of the pruned network's logits (which fine-tuning and the cross-entropy change anyway), only on
      where the evidence lies; centring removes the offset gradient x input puts on a non-zero background.
      Per-sample normalisation weighs every image equally. ``"cosine"`` keeps the offset (signed maps with a
      meaningful zero). An MSE of maps standardised per sample equals ``2 * (1 - Pearson)``, so it is not
      offered separately.
    - What is explained: ``target`` (``relevance.targets``) on the *teacher's* output and the batch label, and
      the student explains the same selection (the label's logit; for segmentation the class logit summed
      over the label / the teacher's predicted mask), as ``report.explanations.explanation_agreement`` does.
    - Both networks explain in eval mode (BatchNorm running statistics, no dropout): those are the maps the
      report measures, and a second train-mode forward would update the student's BatchNorm statistics twice
      per step. Their training flags are restored afterwards.
    - The teacher's maps are computed with its parameters' ``requires_grad`` off and detached, so the
      gradient reaches only the student.

    Args:
        teacher: the unpruned network, frozen (take a ``copy.deepcopy`` before pruning); not modified.
        explainer: a key of ``relevance.differentiable_maps.DIFFERENTIABLE_EXPLAINERS``: ``"grad_x_input"``
            or ``"ig"``.
        target: what is explained: ``"label"`` (default), ``"pred"``, a class index, ``"contrast"``, ``"loss"``
            or a callable ``(output, label) -> selection``.
        distance: ``"pearson"`` (default) or ``"cosine"``.
        distill_weight: weight of the logit distillation term (0: off).
        temperature: distillation temperature ``T`` (> 0).
        explainer_kwargs: passed to the explainer (``n_steps``, ``baseline`` for ``"ig"``).

    Attributes:
        last: the latest call's parts as floats: ``{"consistency", "distill"}``.
    """

    def __init__(
        self,
        teacher: nn.Module,
        explainer: str = "grad_x_input",
        target: TargetSpec = "label",
        distance: str = "pearson",
        distill_weight: float = 0.0,
        temperature: float = 1.0,
        explainer_kwargs: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if explainer not in DIFFERENTIABLE_EXPLAINERS:
            raise ValueError(
                f"unknown explainer {explainer!r}; use one of {sorted(DIFFERENTIABLE_EXPLAINERS)}"
            )
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; use one of {DISTANCES}")
        if not math.isfinite(distill_weight) or distill_weight < 0:
            raise ValueError(f"distill_weight must be a finite number >= 0, got {distill_weight!r}")
        if not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.teacher = teacher
        self.explainer = explainer
        self.target = target
        self.distance = distance
        self.distill_weight = float(distill_weight)
        self.temperature = float(temperature)
        self.explainer_kwargs = _checked_explainer_kwargs(explainer, explainer_kwargs)
        self.last: dict[str, float] = {}

    def _distill(self, student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
        """``T^2 * KL(teacher_T || student_T)`` over the class channel, averaged over samples and voxels."""
        t = self.temperature
        s, q = student_out.float() / t, teacher_out.detach().float() / t
        if s.shape[1] == 1:  # one sigmoid channel: binary KL
            ps = torch.cat([nn.functional.logsigmoid(-s), nn.functional.logsigmoid(s)], 1)
            pt = torch.cat([nn.functional.logsigmoid(-q), nn.functional.logsigmoid(q)], 1)
        else:
            ps, pt = torch.log_softmax(s, 1), torch.log_softmax(q, 1)
        kl = (pt.exp() * (pt - ps)).sum(1)
        return t * t * kl.mean()

    def __call__(
        self,
        student: nn.Module,
        inputs: torch.Tensor,
        label: torch.Tensor | None = None,
        student_output: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss on one batch: a scalar tensor differentiable w.r.t. the student's parameters.

        Args:
            student: the (pruned) network being trained.
            inputs: ``[B, C, *spatial]`` batch on the networks' device.
            label: the batch label (class indices, one-hot or segmentation mask); None explains predictions.
            student_output: the student's output from the training forward (used by the distillation term;
                default: its eval-mode output from the explanation pass).
        """
        fn = DIFFERENTIABLE_EXPLAINERS[self.explainer]
        x = torch.as_tensor(inputs).as_subclass(torch.Tensor).detach()  # MetaTensor -> plain tensor
        x = x if x.is_floating_point() else x.float()
        lab = None if label is None else torch.as_tensor(label).as_subclass(torch.Tensor)
        picked: list[torch.Tensor] = []

        def teacher_selection(out: torch.Tensor) -> torch.Tensor:
            picked.append(target_selection(out.detach(), lab, self.target).detach())
            return picked[0]

        with _EvalMode(self.teacher, student):
            with no_param_grad(self.teacher):
                teacher_maps, teacher_out = fn(
                    self.teacher, x, teacher_selection, create_graph=False, **self.explainer_kwargs
                )
            selection = picked[0]
            student_maps, student_eval_out = fn(
                student, x, lambda out: selection, create_graph=True, **self.explainer_kwargs
            )
        consistency = map_distance(student_maps.sum(1), teacher_maps.detach().sum(1), self.distance).mean()
        loss = consistency
        distill = None
        if self.distill_weight > 0:
            s_out = student_eval_out if student_output is None else student_output
            if isinstance(s_out, (list, tuple)):
                s_out = s_out[0]
            distill = self._distill(torch.as_tensor(s_out).as_subclass(torch.Tensor), teacher_out)
            loss = loss + self.distill_weight * distill
        self.last = {
            "consistency": float(consistency.detach()),
            "distill": float(distill.detach()) if distill is not None else 0.0,
        }
        return loss


__all__ = ["DISTANCES", "ExplanationConsistencyLoss", "map_distance"]
