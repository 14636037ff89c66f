"""A torch-pruning ``Importance`` fed by precomputed per-channel relevance."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch_pruning as tp
from torch import nn

_OUT_FNS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)


class RelevanceImportance(tp.importance.Importance):
    """Group importance from per-layer, per-output-channel relevance.

    For each member of a dependency group whose *output channels* are pruned and whose relevance is
    known, the layer's scores (normalised per layer) are read at the group's indices; members are
    reduced by ``group_reduction``. Groups with no scored member return ``None`` (torch-pruning then
    leaves them alone); a layer whose relevance is all zero counts as unscored.

    Args:
        relevance: ``{module: 1-D tensor}`` of per-output-channel relevance, in the module's current
            channel order.
        normalizer: per-layer normalisation before groups are compared globally: ``"mean"`` (divide by
            the layer mean, default), ``"max"``, ``"sum"``, ``"rank"`` (rank / channels) or ``None``.
        group_reduction: ``"mean"`` (default), ``"sum"``, ``"max"`` or ``"first"``.
    """

    NORMALIZERS = ("mean", "max", "sum", "rank", None)
    REDUCTIONS = ("mean", "sum", "max", "first")

    def __init__(
        self,
        relevance: Mapping[nn.Module, torch.Tensor],
        normalizer: str | None = "mean",
        group_reduction: str = "mean",
    ):
        if normalizer not in self.NORMALIZERS:
            raise ValueError(f"unknown normalizer {normalizer!r}; use one of {self.NORMALIZERS}")
        if group_reduction not in self.REDUCTIONS:
            raise ValueError(f"unknown group_reduction {group_reduction!r}; use one of {self.REDUCTIONS}")
        self.normalizer = normalizer
        self.group_reduction = group_reduction
        # a layer whose relevance is identically zero carries no ranking information (e.g. LRP gives SE
        # excitation layers and attention query/key channels exactly 0): treat it as unscored rather than
        # as the least important layer of the network
        for r in relevance.values():
            if not torch.isfinite(torch.as_tensor(r)).all():
                raise FloatingPointError("NaN/Inf in relevance passed to RelevanceImportance")
        self.relevance = {
            m: self._normalize(r.detach().float().cpu())
            for m, r in relevance.items()
            if bool(torch.as_tensor(r).abs().sum() > 0)
        }

    def _normalize(self, r: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(r).all():
            raise FloatingPointError("NaN/Inf in relevance passed to RelevanceImportance")
        eps = 1e-12
        if self.normalizer == "mean":
            return r / (r.abs().mean() + eps)
        if self.normalizer == "max":
            return r / (r.abs().max() + eps)
        if self.normalizer == "sum":
            return r / (r.abs().sum() + eps)
        if self.normalizer == "rank":
            return (r.argsort().argsort().float() + 1) / r.numel()
        return r

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        scores: list[torch.Tensor] = []
        roots: list[list[int]] = []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.layer
            if dep.pruning_fn not in _OUT_FNS or layer not in self.relevance:
                continue
            root_idxs = group[i].root_idxs
            if any(r is None for r in root_idxs):
                continue
            scores.append(self.relevance[layer][list(idxs)])
            roots.append(list(root_idxs))
        if not scores:
            return None
        n = max(max(r) for r in roots) + 1
        n = max(n, len(group[0].idxs))
        if self.group_reduction == "max":
            out = torch.full((n,), -float("inf"))
        else:
            out = torch.zeros(n)
        count = torch.zeros(n)
        for k, (s, r) in enumerate(zip(scores, roots)):
            idx = torch.tensor(r, dtype=torch.long)
            if self.group_reduction == "first":
                if k == 0:
                    out[idx] = s
                    count[idx] = 1
                continue
            if self.group_reduction == "max":
                out[idx] = torch.maximum(out[idx], s)
            else:
                out.index_add_(0, idx, s)
            count.index_add_(0, idx, torch.ones_like(s))
        if self.group_reduction == "mean":
            out = out / count.clamp_min(1)
        # channels of the group no scored member covers: neutral score (layer mean after normalisation)
        out[count == 0] = (
            0.0 if self.normalizer is None else float(torch.stack([s.mean() for s in scores]).mean())
        )
        return out


class CostAwareImportance(tp.importance.Importance):
    """Importance per unit cost: ``base(group)`` divided by what removing one channel of the group saves.

    Ranked globally, channels with the least relevance per unit of cost (MACs, parameters or seconds) go
    first: the greedy order of a knapsack that keeps the most relevance under a cost budget.

    Args:
        base: the importance giving per-channel value (e.g. ``RelevanceImportance`` with raw scores).
        cost: ``{module: per-channel cost}`` for every conv / linear layer whose output channels a group
            removes (``ChannelCost.out_layers``); groups with no costed member are left alone.
    """

    def __init__(self, base: tp.importance.Importance, cost: Mapping[nn.Module, float]):
        self.base = base
        self.cost = dict(cost)

    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        scores = self.base(group)
        if scores is None:
            return None
        for dep, _ in group:
            c = self.cost.get(dep.target.module)
            if c is not None and dep.pruning_fn in _OUT_FNS:
                return scores / max(float(c), 1e-12)
        return None
