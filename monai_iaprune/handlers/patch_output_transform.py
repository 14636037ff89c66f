"""Output transform for evaluator-side relevance under sliding-window inference: cut images to network-sized patches."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.utils import convert_to_tensor, fall_back_tuple

from monai_iaprune.handlers.relevance_collector import _image_label

__all__ = ["PATCH_MODES", "PatchOutputTransform", "PatchedBatches"]

PATCH_MODES = ("center", "foreground", "sliding")


class PatchOutputTransform:
    """``engine.state.output -> (image, label)`` cut to patches the network accepts (sliding-window inference).

    A segmentation evaluator with a ``SlidingWindowInferer`` feeds full-size volumes; the network itself only ever
    saw ``roi_size`` patches, so relevance is computed on patches of that size.

    Args:
        roi_size: patch size; non-positive entries mean the full image size along that axis.
        mode: ``"center"`` (one central patch per image), ``"foreground"`` (one patch centred on the label's
            foreground bounding box, the centre when the label has none or is absent), or ``"sliding"`` (every
            patch of a non-overlapping grid that covers the image).
        max_patches: with ``"sliding"``, at most this many patches per image (evenly spread over the grid).
        output_transform: reads ``(image, label)`` from the engine output; default the evaluator's
            ``"image"`` / ``"label"`` entries.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        mode: str = "foreground",
        max_patches: int | None = None,
        output_transform: Callable[[Any], tuple[Any, Any]] = _image_label,
    ) -> None:
        if mode not in PATCH_MODES:
            raise ValueError(f"unknown patch_mode {mode!r}; use one of {PATCH_MODES}")
        if max_patches is not None and max_patches < 1:
            raise ValueError(f"max_patches must be a positive integer or None, got {max_patches!r}")
        self.roi_size = roi_size
        self.mode = mode
        self.max_patches = max_patches
        self.output_transform = output_transform

    @staticmethod
    def _foreground(label: torch.Tensor) -> torch.Tensor:
        """Boolean foreground ``[*spatial]`` of one sample's label (index map ``[1, *sp]`` or one-hot ``[K, *sp]``)."""
        return label.argmax(0) > 0 if label.shape[0] > 1 else label[0] > 0

    def _starts(
        self, spatial: Sequence[int], roi: Sequence[int], label: torch.Tensor | None
    ) -> list[tuple[int, ...]]:
        if self.mode == "sliding":
            from monai.data.utils import dense_patch_slices

            slices = dense_patch_slices(tuple(spatial), tuple(roi), tuple(roi))
            starts = [tuple(s.start for s in sl) for sl in slices]
            if self.max_patches is not None and len(starts) > self.max_patches:
                step = len(starts) / self.max_patches
                starts = [starts[int(i * step)] for i in range(self.max_patches)]
            return starts
        centre = [s // 2 for s in spatial]
        if self.mode == "foreground" and label is not None:
            fg = self._foreground(label)
            if fg.any():
                idx = fg.nonzero()
                centre = [int((lo + hi) // 2) for lo, hi in zip(idx.min(0).values, idx.max(0).values)]
        return [tuple(min(max(c - r // 2, 0), s - r) for c, r, s in zip(centre, roi, spatial))]

    def __call__(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cut the evaluator's ``engine.state.output`` to patches."""
        image, label = self.output_transform(output)
        image = convert_to_tensor(image, track_meta=False)
        label = None if label is None else convert_to_tensor(label, track_meta=False)
        spatial = tuple(image.shape[2:])
        roi = tuple(fall_back_tuple(self.roi_size, spatial))
        if len(roi) != len(spatial):
            raise ValueError(f"patch size {roi} does not match the image's spatial shape {spatial}")
        pad = [max(r - s, 0) for r, s in zip(roi, spatial)]
        if any(pad):  # the inferer pads small images with zeros as well
            widths = [w for p in reversed(pad) for w in (p // 2, p - p // 2)]
            image = F.pad(image, widths)
            label = None if label is None else F.pad(label, widths)
            spatial = tuple(image.shape[2:])
        images, labels = [], []
        for b in range(image.shape[0]):
            lab = None if label is None or label.ndim != image.ndim else label[b]
            for start in self._starts(spatial, roi, lab):
                window = (slice(None),) + tuple(slice(s, s + r) for s, r in zip(start, roi))
                images.append(image[b][window])
                if label is not None:
                    labels.append(label[b][window] if label.ndim == image.ndim else label[b])
        return torch.stack(images), (torch.stack(labels) if label is not None else None)


class PatchedBatches:
    """The batches of ``data`` cut by ``transform`` (``{"image", "label"}`` patches), to explain patch-trained networks.

    Args:
        data: a loader of ``{"image", "label"}`` batches (e.g. the evaluator's ``data_loader``).
        transform: a ``PatchOutputTransform``.
    """

    def __init__(self, data: Iterable, transform: PatchOutputTransform) -> None:
        self.data = data
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.data:
            image, label = self.transform(batch)
            yield {"image": image} if label is None else {"image": image, "label": label}
