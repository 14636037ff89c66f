"""What is explained: the relevance that starts at the network output.

A target turns (network output, batch label) into a 0/1 *selection* of the output with the same
shape. Methods start from it: LRP and DL-Backtrace redistribute ``selection * output``; gradient
methods differentiate ``(selection * output).sum()``.

- classification (output ``[B, K]``): the label's logit (``"label"``), the predicted class
  (``"pred"``), or a fixed class index (``int``).
- segmentation (output ``[B, K, *spatial]``): a class logit summed over the class's mask, where the
  mask comes from the label (``"label"``) or the prediction (``"pred"``); ``int`` explains one class,
  otherwise every foreground class (all but channel 0, or the single channel of a sigmoid output).

Two signed targets explain the *decision* rather than one logit (classification and segmentation):

- ``"contrast"``: the label's logit minus the mean of the other logits (selection ``+1`` on the label,
  ``-1/(K-1)`` elsewhere): evidence shared by all classes cancels (contrastive LRP, Gu et al. 2018).
- ``"loss"``: the selection is ``onehot(label) - softmax(output)`` (``label - sigmoid`` for one
  channel), the negative gradient of the cross-entropy with respect to the logits, taken as a constant
  (softmax-gradient LRP, Iwana et al. 2019): samples the network already classifies with confidence
  contribute little, errors and uncertain samples a lot — what a pruned network most needs to keep.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

TargetSpec = str | int | Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def _class_index_from_label(label: torch.Tensor, batch: int, num_classes: int) -> torch.Tensor:
    label = torch.as_tensor(label)
    if label.ndim == 2 and label.shape[1] == num_classes > 1 and label.dtype.is_floating_point:
        return label.argmax(1)  # one-hot / soft labels
    label = label.reshape(batch, -1)
    if label.shape[1] != 1:
        raise ValueError(
            f"classification label must hold one class per sample, got shape {tuple(label.shape)}"
        )
    return label[:, 0].long()


def _segmentation_class_map(label: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Integer class map ``[B, *spatial]`` from a ``[B, 1, *sp]`` index map or ``[B, K, *sp]`` one-hot label."""
    k = output.shape[1]
    if label.ndim == output.ndim and label.shape[1] == k and k > 1:
        return label.argmax(1)
    if label.ndim == output.ndim and label.shape[1] == 1:
        return label[:, 0].round().long()
    if label.ndim == output.ndim - 1:
        return label.round().long()
    raise ValueError(
        f"segmentation label of shape {tuple(label.shape)} does not match output of shape {tuple(output.shape)}"
    )


def target_selection(
    output: torch.Tensor, label: torch.Tensor | None, target: TargetSpec = "label"
) -> torch.Tensor:
    """Return the 0/1 selection of ``output`` (same shape) whose summed logits are explained."""
    if callable(target):
        sel = target(output, label)
        if sel.shape != output.shape:
            raise ValueError(
                f"target callable returned shape {tuple(sel.shape)}, expected {tuple(output.shape)}"
            )
        return sel.to(output.dtype)
    if isinstance(target, str) and target not in ("label", "pred", "contrast", "loss"):
        raise ValueError(
            f"unknown target {target!r}: use 'label', 'pred', 'contrast', 'loss', a class index or a callable"
        )
    if target in ("contrast", "loss"):
        return _signed_selection(output, label, target)
    if target == "label" and label is None:
        target = "pred"
    out = output.detach()
    b, k = out.shape[0], out.shape[1]
    if out.ndim == 2:  # classification
        if isinstance(target, int):
            if not 0 <= target < k:
                raise ValueError(f"target class {target} out of range for {k} outputs")
            idx = torch.full((b,), target, dtype=torch.long, device=out.device)
        elif target == "label":
            idx = _class_index_from_label(label, b, k).to(out.device)
            if idx.min() < 0 or idx.max() >= k:
                if k == 1:  # single-logit binary classifier: explain the logit itself
                    idx = torch.zeros_like(idx)
                else:
                    raise ValueError(f"label values {idx.unique().tolist()} out of range for {k} outputs")
        else:
            idx = out.argmax(1)
        sel = torch.zeros_like(out)
        sel[torch.arange(b, device=out.device), idx] = 1.0
        return sel
    # segmentation
    if k == 1:
        if target == "label":
            mask = torch.as_tensor(label, device=out.device).reshape(out.shape) > 0.5
        else:
            mask = out > 0
        return mask.to(out.dtype)
    if target == "label":
        cmap = _segmentation_class_map(torch.as_tensor(label, device=out.device), out)
    else:
        cmap = out.argmax(1)
    classes = [target] if isinstance(target, int) else list(range(1, k))
    sel = torch.zeros_like(out)
    for c in classes:
        sel[:, c] = (cmap == c).to(out.dtype)
    if sel.sum() == 0:  # no foreground in this batch: explain the background so relevance is still defined
        sel[:, 0] = (cmap == 0).to(out.dtype)
    return sel


def _label_onehot(output: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
    """One-hot ``[B, K, ...]`` of the label (or the prediction when there is no label) for ``K > 1``."""
    out = output.detach()
    k = out.shape[1]
    if label is None:
        idx = out.argmax(1)
    elif out.ndim == 2:
        idx = _class_index_from_label(torch.as_tensor(label), out.shape[0], k).to(out.device)
        if idx.min() < 0 or idx.max() >= k:
            raise ValueError(f"label values {idx.unique().tolist()} out of range for {k} outputs")
    else:
        idx = _segmentation_class_map(torch.as_tensor(label, device=out.device), out).clamp(0, k - 1)
    return torch.nn.functional.one_hot(idx, k).movedim(-1, 1).to(out.dtype)


def _signed_selection(output: torch.Tensor, label: torch.Tensor | None, target: str) -> torch.Tensor:
    out = output.detach()
    k = out.shape[1]
    if k == 1:  # single sigmoid channel: the logit's sign is the decision
        y = (out > 0).to(out.dtype) if label is None else torch.as_tensor(label, device=out.device)
        y = y.reshape(out.shape).to(out.dtype)
        if target == "contrast":
            return 2.0 * y - 1.0
        return y - torch.sigmoid(out)
    onehot = _label_onehot(out, label)
    if target == "contrast":
        return onehot - (1.0 - onehot) / (k - 1)
    return onehot - torch.softmax(out, dim=1)
