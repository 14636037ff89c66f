"""Kept-channel feature distillation: fit a pruned network's layer outputs to the unpruned network's, channel by channel.

Structured pruning keeps a subset of every layer's channels, so each channel of the pruned network (the
*student*) still names one channel of the unpruned network (the *teacher*): ``kept_channels`` recovers that
map from ``PruneResult.history``. During the recovery fine-tune, the loss below pulls every kept channel's
output back to the teacher's output of the same channel on the same batch (relative squared error per layer,
averaged over layers). The teacher's internal representation, not only its logits, is what the student is
fitted to: the removed channels' contribution must be made up by the kept ones, layer by layer (the
reconstruction idea of channel-pruning work such as He et al. 2017, ThiNet; here as a fine-tune term).

Why here: input attribution maps are computed through those internal activations, so keeping them is what
keeps explanations (``benchmarks/explanations.py``, 3 seeds: LRP agreement with the unpruned network above what
logit distillation or an explanation term alone reach on 5 of 6 MedMNIST settings; BreastMNIST at 50 % of MACs
removed: Spearman 0.88 -> 0.925, top-10 % IoU 0.51 -> 0.71), and it recovers accuracy at large MACs budgets on the
3D set, not on the 2D ones (``benchmarks/budget.py --ft-feature``, ``benchmarks/recovery.py``).

The student's outputs are captured by forward hooks during the trainer's own forward (no extra student pass);
the teacher runs once per batch in eval mode without gradients, so the gradient reaches only the student.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from monai_iaprune.relevance.layers import PRUNABLE_TYPES, channel_dim, out_channels

__all__ = ["FeatureDistillationLoss", "kept_channels"]

History = Sequence[tuple[str, str, Sequence[int]]]


def _width(module: nn.Module) -> int | None:
    """Output channels of a conv / linear / normalisation layer; None for anything else."""
    if isinstance(module, PRUNABLE_TYPES):
        return out_channels(module)
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    return None


def kept_channels(teacher: nn.Module, *histories: History) -> dict[str, torch.Tensor]:
    """The teacher's index of every channel a pruned copy kept, per layer that lost channels.

    Args:
        teacher: the network as it was before the first pruning step (names as in the histories).
        histories: ``PruneResult.history`` of each pruning step applied to (a copy of) ``teacher``, in order;
            each ``(layer name, "out", removed indices)`` record removes positions of that layer's current
            output channels (``"in"`` records are ignored: a consumer's input channels are its producer's
            output channels).

    Returns:
        ``{layer name: LongTensor}``: entry ``j`` is the teacher's channel that the student's channel ``j`` of
        that layer is; layers that lost no output channel are absent (they keep the identity).

    Raises:
        KeyError: a record names a layer ``teacher`` does not have.
        ValueError: a record removes an index the layer no longer has.
    """
    modules = dict(teacher.named_modules())
    kept: dict[str, list[int]] = {}
    for history in histories:
        for name, kind, removed in history:
            if kind != "out":
                continue
            if name not in kept:
                if name not in modules:
                    raise KeyError(
                        f"the pruning history names layer {name!r}, which the teacher does not have"
                    )
                width = _width(modules[name])
                if width is None:
                    continue
                kept[name] = list(range(width))
            current, gone = kept[name], {int(i) for i in removed}
            if gone and (min(gone) < 0 or max(gone) >= len(current)):
                raise ValueError(
                    f"the pruning history removes channel {max(gone)} of {name!r}, which has {len(current)} left "
                    "(are the histories in the order the steps were applied, all from this teacher?)"
                )
            kept[name] = [c for i, c in enumerate(current) if i not in gone]
    return {n: torch.tensor(c, dtype=torch.long) for n, c in kept.items()}


class FeatureDistillationLoss:
    """Relative squared error between a student's layer outputs and the teacher's outputs of the same channels.

    ``loss = mean_over_layers( ||s_l - t_l[:, kept_l]||^2 / ||t_l[:, kept_l]||^2 )``, means over the batch and
    positions; 0 when the student computes what the teacher computes on every kept channel.

    Usage: ``attach(student)`` once (it registers forward hooks that keep the latest outputs of the matched
    layers), then after each training forward ``loss(inputs)`` (the same batch): the teacher is run on
    ``inputs`` and compared with the outputs the student's forward left behind. ``detach()`` removes the hooks.

    Args:
        teacher: the unpruned network; frozen here (eval mode, no parameter gradients), not modified.
        kept: ``kept_channels(teacher, *histories)``; None when the student has the teacher's widths.
        layers: student layer names to match (conv / linear layers present in both networks); default every
            conv / linear layer of the student that the teacher has.
    """

    def __init__(
        self,
        teacher: nn.Module,
        kept: dict[str, torch.Tensor] | None = None,
        layers: Iterable[str] | None = None,
    ) -> None:
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be an nn.Module, got {type(teacher).__name__}")
        if kept is not None and not isinstance(kept, dict):
            raise TypeError(f"kept must be a dict from kept_channels() or None, got {type(kept).__name__}")
        self.teacher = teacher.eval()
        self.teacher.requires_grad_(False)
        self.kept = {} if kept is None else dict(kept)
        self.layers = None if layers is None else list(layers)
        self.names: list[str] = []
        self._index: dict[str, torch.Tensor] = {}
        self._student: dict[str, torch.Tensor] = {}
        self._teacher_out: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        self._teacher_modules = dict(teacher.named_modules())
        self.last = float("nan")

    def attach(self, student: nn.Module) -> None:
        """Hook the matched layers of ``student`` (replacing earlier hooks), checking every layer's width.

        Raises:
            KeyError: a requested layer is missing from the student or the teacher.
            ValueError: a layer's width differs from what ``kept`` says (or from the teacher's without ``kept``).
        """
        self.detach()
        smods = dict(student.named_modules())
        names = self.layers
        if names is None:
            names = [
                n for n, m in smods.items() if isinstance(m, PRUNABLE_TYPES) and n in self._teacher_modules
            ]
        if not names:
            raise ValueError("no conv / linear layer is shared by student and teacher: nothing to distil")
        self.names, self._index = [], {}
        for name in names:
            if name not in smods or name not in self._teacher_modules:
                raise KeyError(f"layer {name!r} is not in both the student and the teacher")
            s, t = smods[name], self._teacher_modules[name]
            if not isinstance(s, PRUNABLE_TYPES) or not isinstance(t, PRUNABLE_TYPES):
                raise KeyError(f"layer {name!r} is not a conv / linear layer in both networks")
            index = self.kept.get(name, torch.arange(out_channels(t)))
            if out_channels(s) != len(index):
                raise ValueError(
                    f"layer {name!r} has {out_channels(s)} output channels in the student but the map gives "
                    f"{len(index)} (teacher {out_channels(t)}); pass kept=kept_channels(teacher, *histories) "
                    "with every pruning step's history"
                )
            self.names.append(name)
            self._index[name] = index
            self._handles.append(s.register_forward_hook(self._store(self._student, name)))
            self._handles.append(t.register_forward_hook(self._store(self._teacher_out, name)))

    def detach(self) -> None:
        """Remove the hooks ``attach`` registered."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._student.clear()
        self._teacher_out.clear()

    @staticmethod
    def _store(store: dict[str, torch.Tensor], name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            store[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        """The term for the batch the student just ran on: a scalar differentiable w.r.t. the student only.

        Raises:
            RuntimeError: ``attach`` was not called, or the student has not run since the last call.
        """
        if not self._handles:
            raise RuntimeError("FeatureDistillationLoss: call attach(student) before computing the loss")
        missing = [n for n in self.names if n not in self._student]
        if missing:
            raise RuntimeError(
                f"no student output of {missing[:3]} since the last call: run the student's forward on the batch "
                "first (the hooks capture it)"
            )
        x = torch.as_tensor(inputs).as_subclass(torch.Tensor)
        with torch.no_grad():
            self.teacher(x)
        total = None
        for name in self.names:
            s = self._student[name]
            dim = channel_dim(self._teacher_modules[name])
            t = self._teacher_out[name].index_select(dim, self._index[name].to(s.device)).detach()
            if s.shape != t.shape:
                raise RuntimeError(
                    f"layer {name!r}: student output {tuple(s.shape)} vs teacher's kept channels {tuple(t.shape)}; "
                    "the student must run on the same batch (and input size) as the teacher"
                )
            s, t = s.float(), t.float()
            term = (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
            total = term if total is None else total + term
        self._student.clear()
        self._teacher_out.clear()
        loss = total / len(self.names)
        self.last = float(loss.detach()) if math.isfinite(float(loss.detach())) else float("nan")
        return loss
