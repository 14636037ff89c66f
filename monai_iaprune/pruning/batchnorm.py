"""Re-estimate BatchNorm running statistics after pruning."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from monai_iaprune.utils.batch import model_device, split_batch


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module,
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    image_key: str = "image",
    label_key: str = "label",
    device: torch.device | str | None = None,
) -> int:
    """Reset every BatchNorm's running mean / variance and re-estimate them on ``data``.

    After channels are removed, the statistics the remaining channels feed to later BatchNorm layers no
    longer match the stored ones; a forward pass in train mode over calibration batches (cumulative
    average, ``momentum=None``) fixes that without touching any weight.

    Args:
        model: the (pruned) network; its train/eval mode and BatchNorm momenta are restored afterwards.
        data: iterable of batches (tensors, ``(image, label)`` pairs or dicts with ``image_key``).
        max_batches: use at most this many batches.
        image_key, label_key: keys of dict batches.
        device: where to run; default the model's device.

    Returns:
        The number of samples seen.

    Raises:
        ValueError: ``data`` yielded no batch, or a batch holds NaN / Inf (one such value would turn every
            running mean, and so every later output, into NaN). On any error the BatchNorm statistics are
            restored to what they were before the call.
    """
    bns = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not bns:
        return 0
    device = model_device(model) if device is None else device
    was_training = model.training
    momenta = [m.momentum for m in bns]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all calibration batches
    model.train()
    seen = 0
    try:
        for i, batch in enumerate(data):
            if max_batches is not None and i >= max_batches:
                break
            inputs, _ = split_batch(batch, image_key, label_key)
            inputs = torch.as_tensor(inputs).to(device).float()
            if not torch.isfinite(inputs).all():
                n_bad = int((~torch.isfinite(inputs)).sum())
                raise ValueError(
                    f"calibration batch {i} holds {n_bad} non-finite value(s) (NaN / Inf); clean or drop it "
                    "before re-estimating BatchNorm statistics (statistics left as they were)"
                )
            model(inputs)
            seen += inputs.shape[0]
        if seen == 0:
            raise ValueError("empty data: no calibration batch to re-estimate BatchNorm statistics")
    except BaseException:
        for m, state in zip(bns, saved):
            for k, v in state.items():
                getattr(m, k).copy_(v)
        raise
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        model.train(was_training)
    return seen
