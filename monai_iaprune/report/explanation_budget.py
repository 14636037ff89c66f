"""Explanation budget: prune as much as possible while the explanations still agree with the unpruned network's.

``prune_to_min_agreement`` tries pruning ratios from the largest down; each candidate prunes a copy of the
model, re-calibrates BatchNorm, and measures the median Spearman correlation between the unpruned and the
pruned model's attribution maps on validation data (``report.explanations``). The first candidate at or above
``min_agreement`` is returned, so the result is the largest ratio of the list that keeps the explanations.
A descending list rather than a bisection: agreement is not monotone in the ratio (a larger ratio can
happen to agree better), and a list evaluates exactly the budgets a user can name.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from monai_iaprune.pruning.batchnorm import recalibrate_batchnorm
from monai_iaprune.pruning.prune import PruneResult, prune
from monai_iaprune.relevance.registry import input_map_methods
from monai_iaprune.report.explanations import (
    agreement_from_maps,
    attribution_maps,
    explained_selection,
)
from monai_iaprune.utils.batch import split_batch

DEFAULT_RATIOS = (0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


class AgreementNotReached(ValueError):
    """No candidate ratio keeps the explanation agreement at the threshold.

    Attributes:
        tried: ``[(ratio, median Spearman)]`` of every candidate evaluated, largest ratio first.
        tried_cost_aware: the ``cost_aware`` ranking of each ``tried`` entry (None: ``prune``'s default).
    """

    def __init__(
        self,
        message: str,
        tried: list[tuple[float, float]] | None = None,
        tried_cost_aware: list[bool | None] | None = None,
    ):
        super().__init__(message)
        self.tried = list(tried or [])
        self.tried_cost_aware = list(tried_cost_aware or [None] * len(self.tried))


@dataclass
class AgreementBudget:
    """What ``prune_to_min_agreement`` chose.

    Attributes:
        model: the pruned copy (the input model is left unpruned).
        ratio: the chosen pruning ratio (fraction of ``target`` removed).
        agreement: its median Spearman correlation with the unpruned model's maps on the validation data.
        result: ``prune``'s ``PruneResult`` for the chosen ratio.
        metrics: ``agreement_from_maps`` of the chosen ratio (Spearman, top-10 % IoU, SSIM medians and IQRs).
        tried: ``[(ratio, median Spearman)]`` of every candidate evaluated, in order.
        cost_aware: the channel ranking of the chosen candidate (``prune``'s ``cost_aware``; None: its default).
        tried_cost_aware: the ranking of each ``tried`` entry.
    """

    model: nn.Module
    ratio: float
    agreement: float
    result: PruneResult
    metrics: dict[str, Any]
    tried: list[tuple[float, float]] = field(default_factory=list)
    cost_aware: bool | None = None
    tried_cost_aware: list[bool | None] = field(default_factory=list)


def _samples(
    data: Any, max_samples: int | None, image_key: str, label_key: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``max_samples`` ``(inputs, labels)`` of a batch, an ``(x, y)`` pair, a dict or a loader."""
    if isinstance(data, (torch.Tensor, Mapping)) or (
        isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor)
    ):
        data = [data]
    xs, ys, seen = [], [], 0
    for batch in data:
        if max_samples is not None and seen >= max_samples:
            break
        x, y = split_batch(batch, image_key, label_key)
        x = torch.as_tensor(x).as_subclass(torch.Tensor)
        keep = x.shape[0] if max_samples is None else min(x.shape[0], max_samples - seen)
        xs.append(x[:keep])
        ys.append(None if y is None else torch.as_tensor(y).as_subclass(torch.Tensor)[:keep])
        seen += keep
    if not xs:
        raise ValueError("empty validation data: no samples to measure explanation agreement on")
    labels = None if any(y is None for y in ys) else torch.cat(ys)
    return torch.cat(xs), labels


def prune_to_min_agreement(
    model: nn.Module,
    relevance: Mapping[str, torch.Tensor],
    data_val: Any,
    min_agreement: float = 0.9,
    explainer: str = "ig",
    ratios: Sequence[float] = DEFAULT_RATIOS,
    target: str = "macs",
    *,
    calibration_data: Iterable[Any] | None = None,
    example_inputs: torch.Tensor | None = None,
    explained: Any = "label",
    max_samples: int | None = 32,
    max_calibration_batches: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
    map_kwargs: dict[str, Any] | None = None,
    cost_aware: bool | str | None = None,
    **prune_kwargs: Any,
) -> AgreementBudget:
    """The most-pruned copy of ``model`` (over ``ratios``) whose explanations agree with ``model``'s at ``min_agreement``.

    For each ratio, largest first: deep-copy ``model``, ``prune`` it by ``relevance``, re-calibrate BatchNorm
    on ``calibration_data``, compute ``explainer`` maps of both models on the first ``max_samples`` samples of
    ``data_val`` (both explain the unpruned model's selection), and stop at the first median Spearman
    ``>= min_agreement``. The unpruned model's maps are computed once.

    Args:
        model: the unpruned network; not modified.
        relevance: per-channel relevance of ``model`` (``channel_relevance``).
        data_val: validation batch, ``(x, y)`` pair, dict batch or loader: where agreement is measured.
        min_agreement: threshold on the median Spearman correlation, in (0, 1].
        explainer: attribution used to measure agreement: ``"ig"`` (default) or ``"lrp"``. Use one the network
            was not fine-tuned to match (``ExplanationConsistencyLoss`` trains on ``"grad_x_input"``).
        ratios: candidate ratios, each strictly between 0 and 1 (tried in descending order).
        target: ``prune``'s budget: ``"macs"`` (default), ``"params"`` or ``"channels"``.
        calibration_data: batches for BatchNorm re-calibration (default ``data_val``; pass training batches
            when the validation set is small).
        example_inputs: one batch to trace the network (default ``relevance.example_input``, else the first
            validation sample).
        explained: what the maps explain (``relevance.targets``): ``"label"`` (default), ``"pred"``, ...
        max_samples: validation samples used for the agreement (None: all).
        max_calibration_batches: at most this many calibration batches.
        image_key, label_key: keys of dict batches.
        map_kwargs: passed to ``attribution_maps`` (``n_steps``, ``composite``, ...).
        cost_aware: ``prune``'s channel ranking (None: its default, cost-aware for a MACs budget), or ``"either"``:
            at each ratio try the cost-aware ranking and relevance alone, and keep the one whose agreement passes
            (the higher if both do). Which keeps explanations longer depends on the network: on this repository's
            MedMNIST benchmark relevance alone allowed more MACs on the 3D ResNet, the cost-aware ranking on the
            2D ones (BENCHMARKS.md, "Explanation budget"). Costs up to twice the evaluations.
        prune_kwargs: more ``prune`` arguments (``global_pruning``, ``round_to``, ``ignored_layers``, ...).

    Returns:
        ``AgreementBudget`` (pruned model, ratio, agreement, prune result, metrics, all tried candidates).

    Raises:
        ValueError: unknown ``explainer``, ``min_agreement`` outside (0, 1], bad or empty ``ratios``, a
            ``cost_aware`` other than True, False, None or ``"either"``.
        AgreementNotReached: even the smallest ratio stays below ``min_agreement``; the message names the best
            agreement reached and its ratio.
    """
    if explainer not in input_map_methods():
        raise ValueError(f"unknown explainer {explainer!r}; use one of {input_map_methods()}")
    if (
        isinstance(min_agreement, bool)
        or not isinstance(min_agreement, (int, float))
        or not 0.0 < float(min_agreement) <= 1.0
    ):
        raise ValueError(f"min_agreement must lie in (0, 1], got {min_agreement!r}")
    cands = sorted({float(r) for r in ratios}, reverse=True)
    if not cands or any(not (0.0 < r < 1.0) or math.isnan(r) for r in cands):
        raise ValueError(
            f"ratios must be a non-empty list of numbers strictly between 0 and 1, got {ratios!r}"
        )
    if isinstance(cost_aware, str):
        if cost_aware != "either":
            raise ValueError(f"cost_aware must be True, False, None or 'either', got {cost_aware!r}")
        if target == "channels":
            raise ValueError(
                "cost_aware='either' needs a params, macs or latency budget, not target='channels'"
            )
        rankings: list[bool | None] = [True, False]
    elif cost_aware is None or isinstance(cost_aware, bool):
        rankings = [cost_aware]
    else:
        raise ValueError(f"cost_aware must be True, False, None or 'either', got {cost_aware!r}")
    map_kwargs = dict(map_kwargs or {})
    device = next(model.parameters()).device
    x, y = _samples(data_val, max_samples, image_key, label_key)
    x = x.to(device).float()
    y = None if y is None else y.to(device)
    if example_inputs is None:
        example_inputs = getattr(relevance, "example_input", None)
    if example_inputs is None:
        example_inputs = x[:1]
    calibration = data_val if calibration_data is None else calibration_data
    if isinstance(calibration, (torch.Tensor, Mapping)) or (
        isinstance(calibration, tuple) and len(calibration) == 2 and isinstance(calibration[0], torch.Tensor)
    ):
        calibration = [calibration]

    was_training = model.training
    model.eval()
    try:
        selection = explained_selection(model, x, y, explained)
        maps_ref = attribution_maps(model, x, explainer, selection=selection, **map_kwargs)
    finally:
        model.train(was_training)

    tried: list[tuple[float, float]] = []
    tried_rank: list[bool | None] = []
    for ratio in cands:
        passed = []
        for rank in rankings:
            candidate = copy.deepcopy(model)
            kw = prune_kwargs if rank is None else {**prune_kwargs, "cost_aware": rank}
            result = prune(candidate, relevance, ratio, target=target, example_inputs=example_inputs, **kw)
            recalibrate_batchnorm(
                candidate,
                calibration,
                max_batches=max_calibration_batches,
                image_key=image_key,
                label_key=label_key,
            )
            candidate.eval()
            maps = attribution_maps(candidate, x, explainer, selection=selection, **map_kwargs)
            metrics = agreement_from_maps(maps_ref, maps)
            agreement = metrics["spearman_median"]
            tried.append((ratio, agreement))
            tried_rank.append(rank)
            if agreement >= min_agreement:  # False for NaN (no finite per-image correlation)
                passed.append((float(agreement), rank, candidate, result, metrics))
            else:
                del candidate
        if passed:
            agreement, rank, candidate, result, metrics = max(passed, key=lambda p: p[0])
            candidate.train(was_training)
            return AgreementBudget(candidate, ratio, agreement, result, metrics, tried, rank, tried_rank)
    finite = [(a, r) for r, a in tried if math.isfinite(a)]
    best = max(finite) if finite else (float("nan"), cands[-1])
    raise AgreementNotReached(
        f"no pruning ratio in {cands} keeps the median Spearman agreement of {explainer} maps >= "
        f"{min_agreement}: the best reached was {best[0]:.4f} at ratio {best[1]} "
        f"(target={target!r}, {x.shape[0]} validation samples); lower min_agreement or try smaller ratios",
        tried,
        tried_rank,
    )


__all__ = ["DEFAULT_RATIOS", "AgreementBudget", "AgreementNotReached", "prune_to_min_agreement"]
