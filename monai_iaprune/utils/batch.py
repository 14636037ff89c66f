"""Reading inputs and labels from batches, and calling a network on them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn


def split_batch(batch: Any, image_key: str = "image", label_key: str = "label") -> tuple[torch.Tensor, Any]:
    """Return ``(inputs, label or None)`` from a tensor, an ``(x, y)`` pair or a MONAI dict batch."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        if image_key not in batch:
            raise KeyError(f"batch has no key {image_key!r} (keys: {sorted(map(str, batch))}); set image_key")
        return batch[image_key], batch.get(label_key)
    if isinstance(batch, (list, tuple)) and len(batch) >= 1:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"cannot read inputs from a batch of type {type(batch).__name__}")


def plain_tensor(value: Any) -> torch.Tensor:
    """A plain ``torch.Tensor`` from a MONAI ``MetaTensor``, another tensor subclass, an array or a number.

    MetaTensor's ``__torch_function__`` wraps every op, which breaks hooks that track in-place
    residual additions (e.g. SegResNet's ``x += identity``); relevance and attribution need only the values.
    """
    if hasattr(value, "as_tensor"):
        value = value.as_tensor()
    value = torch.as_tensor(value)
    return value if type(value) is torch.Tensor else value.as_subclass(torch.Tensor)


def input_batches(
    data: Iterable[Any],
    device: torch.device | str,
    image_key: str = "image",
    label_key: str = "label",
    max_samples: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield ``(inputs, label or None)`` of each batch as plain tensors on ``device``, inputs as float32.

    Args:
        data: an iterable (loader) of batches in any form ``split_batch`` reads.
        device: where the tensors go.
        image_key, label_key: keys of dict batches.
        max_samples: cut the batches so at most this many samples are yielded in total (None: all).
    """
    seen = 0
    for batch in data:
        if max_samples is not None and seen >= max_samples:
            break
        x, y = split_batch(batch, image_key, label_key)
        x = plain_tensor(x).to(device).float()
        n = x.shape[0] if max_samples is None else min(x.shape[0], max_samples - seen)
        y = None if y is None else plain_tensor(y).to(device)[:n]
        seen += n
        yield x[:n], y


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def first_output(output: Any) -> Any:
    """The prediction of a network output: the first element of a tuple / list (MONAI ViT's logits and
    hidden states, deep-supervision heads), the output itself otherwise."""
    return output[0] if isinstance(output, (tuple, list)) else output


class FirstOutput(nn.Module):
    """Present a network whose forward returns a tuple (e.g. MONAI ViT: logits, hidden states) by its first output.

    Args:
        model: the wrapped network.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_output(self.model(x))


def spatial_dims(model: nn.Module) -> int | None:
    """Spatial dimensionality of the first conv layer (2 for Conv2d, 3 for Conv3d), or None."""
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return len(m.kernel_size)
    return None


def check_input_dims(model: nn.Module, inputs: torch.Tensor) -> None:
    """Raise a clear error when ``inputs`` does not have the ``[B, C, *spatial]`` rank the model's convs need."""
    sd = spatial_dims(model)
    if sd is not None and inputs.ndim != sd + 2:
        axes = "[B, C, H, W]" if sd == 2 else "[B, C, D, H, W]" if sd == 3 else f"[B, C, +{sd} spatial]"
        raise ValueError(
            f"wrong input dims: {type(model).__name__} has {sd}D convolutions and expects {sd + 2}-D input {axes}, "
            f"got shape {tuple(inputs.shape)}"
        )


__all__ = [
    "FirstOutput",
    "check_input_dims",
    "first_output",
    "input_batches",
    "model_device",
    "plain_tensor",
    "spatial_dims",
    "split_batch",
]
