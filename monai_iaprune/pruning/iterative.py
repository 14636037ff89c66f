"""Prune in steps, re-scoring relevance on the pruned network and re-estimating BatchNorm in between."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from monai_iaprune.pruning.batchnorm import recalibrate_batchnorm
from monai_iaprune.pruning.prune import PruneResult, prune
from monai_iaprune.relevance.collect import channel_relevance


def prune_step(
    model: nn.Module,
    data: Iterable[Any],
    method: str,
    ratio: float,
    *,
    target: str = "params",
    relevance_kwargs: dict[str, Any] | None = None,
    recalibrate_bn: bool = True,
    bn_batches: int | None = None,
    **prune_kwargs: Any,
) -> PruneResult:
    """One stage: ``channel_relevance`` on ``data`` -> ``prune`` -> ``recalibrate_batchnorm`` on ``data``.

    Args:
        model: the network, pruned in place.
        data: batches for relevance and BatchNorm statistics.
        method: relevance method (``channel_relevance``).
        ratio: fraction of the *current* ``target`` to remove (for ``"latency"`` pass ``speedup``).
        target: ``prune``'s target.
        relevance_kwargs: extra ``channel_relevance`` arguments (``progress`` defaults to False).
        recalibrate_bn: re-estimate BatchNorm statistics after pruning.
        bn_batches: at most this many batches for the re-estimate.
        prune_kwargs: extra ``prune`` arguments.
    """
    kwargs = {"progress": False, **(relevance_kwargs or {})}
    relevance = channel_relevance(model, data, method, **kwargs)
    result = prune(model, relevance, ratio, target=target, **prune_kwargs)
    if recalibrate_bn:
        recalibrate_batchnorm(model, data, max_batches=bn_batches)
    return result


def prune_iteratively(
    model: nn.Module,
    data: Iterable[Any],
    method: str,
    ratio: float = 0.5,
    *,
    target: str = "params",
    steps: int = 3,
    speedup: float | None = None,
    relevance_kwargs: dict[str, Any] | None = None,
    recalibrate_bn: bool = True,
    bn_batches: int | None = None,
    progress: bool = True,
    recover: Callable[[nn.Module, int], Any] | None = None,
    **prune_kwargs: Any,
) -> list[PruneResult]:
    """Remove ``ratio`` of ``target`` (or reach ``speedup``) in ``steps`` stages of ``prune_step``.

    Each stage asks for the remaining budget spread evenly (geometrically) over the remaining stages, so the
    stages compound to the total even when one overshoots a little: stage ``k`` removes
    ``1 - (left / now) ** (1 / (steps - k))`` of the current network, ``left`` being the total allowed.

    Args:
        model, data, method, target, relevance_kwargs, recalibrate_bn, bn_batches: as ``prune_step``.
        ratio: total fraction of ``target`` removed (``"params"``, ``"macs"``).
        steps: number of stages, >= 1.
        speedup: total estimated speed-up for ``target="latency"``.
        progress: tqdm bar over the stages.
        recover: optional ``(model, stage) -> Any`` called after every stage but the last (``stage`` counts from
            0), e.g. a short recovery fine-tune, so that the next stage scores a network that has re-learned what
            the previous one removed (gradual pruning). It trains ``model`` in place; its return value is ignored.
            The fine-tune after the last stage is the caller's.
        prune_kwargs: extra ``prune`` arguments for every stage.

    Returns:
        One ``PruneResult`` per stage.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if recover is not None and not callable(recover):
        raise TypeError(f"recover must be a callable (model, stage) -> Any, got {type(recover).__name__}")
    if target not in ("params", "macs", "latency"):
        raise ValueError(f"prune_iteratively needs a params, macs or latency budget, got target={target!r}")
    if target == "latency":
        if speedup is None or not speedup > 1:
            raise ValueError(f"target='latency' needs a speedup > 1, got {speedup!r}")
        keep_total = 1.0 / speedup
    else:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"bad ratio {ratio!r}: the fraction to remove must lie strictly between 0 and 1")
        keep_total = 1.0 - ratio
    results: list[PruneResult] = []
    kept = 1.0  # fraction of the original target left so far
    for k in tqdm(range(steps), desc="pruning steps", disable=not progress):
        step_keep = min((keep_total / kept) ** (1.0 / (steps - k)), 1.0 - 1e-6)
        if target == "latency":
            result = prune_step(
                model,
                data,
                method,
                0.5,
                target=target,
                speedup=1.0 / step_keep,
                relevance_kwargs=relevance_kwargs,
                recalibrate_bn=recalibrate_bn,
                bn_batches=bn_batches,
                **prune_kwargs,
            )
            kept /= result.latency_estimated_speedup
        else:
            result = prune_step(
                model,
                data,
                method,
                1.0 - step_keep,
                target=target,
                relevance_kwargs=relevance_kwargs,
                recalibrate_bn=recalibrate_bn,
                bn_batches=bn_batches,
                **prune_kwargs,
            )
            kept *= 1.0 - (result.params_removed if target == "params" else result.macs_removed)
        results.append(result)
        if kept <= keep_total:
            break
        if recover is not None and k < steps - 1:
            recover(model, k)
    return results
