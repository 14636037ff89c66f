"""ISBI 2012 EM membrane segmentation as a dataset of the budget benchmark (issue #17): data, MONAI 2D UNet, Dice.

Data: ``../shared/data/membrane`` (``image/N.png`` and ``label/N.png``, N = 0..29, 512x512 uint8; label 0 = membrane,
255 = cell interior). Fixed split: images 0-19 train, 20-23 validation, 24-29 test. Class 1 = membrane (label 0),
class 0 = interior, so the segmentation relevance target (class logit summed over the label mask of every
foreground class) explains the membrane logit over the true membrane pixels.

Model: MONAI ``UNet`` (2D, channels 16/32/64/128, strides 2, 2 residual units, batch norm, 2 output channels),
trained with ``run.train`` (AdamW, one-cycle, cross-entropy, best validation epoch) on random 128x128 crops with
flips / transposes; evaluated on the full 512x512 images (the UNet is fully convolutional and 512 is a multiple of
its total stride 8, so no sliding window). Metric: Dice of the membrane class per test image (prediction = the
argmax), averaged over the 6 test images; it goes in budget.csv's ``acc_*`` columns (the AUC columns are NaN).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import run
import torch
from torch import nn

DATA_DIR = run.DATA_DIR.parent / "membrane"
SPLITS = {"train": range(0, 20), "val": range(20, 24), "test": range(24, 30)}
CONFIG: dict[str, Any] = {
    "channels": (16, 32, 64, 128),
    "strides": (2, 2, 2),
    "num_res_units": 2,
    "crop": 128,
    "crops_per_image": 8,  # one epoch = 20 images x 8 crops = 160 crops (20 steps of 8)
    "batch": 8,
    "lr": 3e-3,
    "epochs": 60,
    "ft_epochs": 4,  # 1/15 of the base budget, as PneumoniaMNIST's 1 of 15
    "calib": 16,  # calibration crops (relevance, BatchNorm re-estimation): 16 x 128^2 = the pixels of one image
    "image_size": 512,
}


def load_split(
    split: str, limit: int | None = None, root: Path = DATA_DIR
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float ``[N, 1, 512, 512]`` in [-1, 1] and labels as long ``[N, 1, 512, 512]`` (1 = membrane)."""
    from PIL import Image

    if split not in SPLITS:
        raise ValueError(f"unknown membrane split {split!r}: use one of {sorted(SPLITS)}")
    idx = list(SPLITS[split])[:limit]
    xs, ys = [], []
    for i in idx:
        for sub in ("image", "label"):
            if not (root / sub / f"{i}.png").exists():
                raise FileNotFoundError(f"membrane {sub} {i} missing: {root / sub / f'{i}.png'}")
        xs.append(np.asarray(Image.open(root / "image" / f"{i}.png").convert("L"), dtype=np.float32))
        ys.append(np.asarray(Image.open(root / "label" / f"{i}.png").convert("L")) < 128)
    x = torch.from_numpy(np.stack(xs) / 127.5 - 1.0).float().unsqueeze(1)
    return x, torch.from_numpy(np.stack(ys).astype(np.int64)).unsqueeze(1)


def random_crops(
    x: torch.Tensor, y: torch.Tensor, n: int, size: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random ``size``x``size`` crops of random images, each flipped / transposed at random (label alike)."""
    img = torch.randint(0, len(x), (n,), generator=gen).tolist()
    top = torch.randint(0, x.shape[-2] - size + 1, (n,), generator=gen).tolist()
    left = torch.randint(0, x.shape[-1] - size + 1, (n,), generator=gen).tolist()
    aug = torch.randint(0, 2, (n, 3), generator=gen).tolist()
    xs, ys = [], []
    for i, t, lf, (fh, fw, tr) in zip(img, top, left, aug):
        pair = [x[i, :, t : t + size, lf : lf + size], y[i, :, t : t + size, lf : lf + size]]
        if fh:
            pair = [p.flip(-2) for p in pair]
        if fw:
            pair = [p.flip(-1) for p in pair]
        if tr:
            pair = [p.transpose(-2, -1) for p in pair]
        xs.append(pair[0])
        ys.append(pair[1])
    return torch.stack(xs), torch.stack(ys)


def dice_per_image(y: torch.Tensor | np.ndarray, p: np.ndarray) -> np.ndarray:
    """Dice of the membrane class per image: prediction ``p >= 0.5`` (the argmax of 2 classes) vs label ``y == 1``;
    1.0 where both are empty."""
    g = np.asarray(y).reshape(len(p), -1).astype(bool)
    q = np.asarray(p).reshape(len(p), -1) >= 0.5
    inter, total = (g & q).sum(1), g.sum(1) + q.sum(1)
    return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


class SegmentationTask:
    """The membrane dataset for ``benchmarks/budget.py``: the same interface as its ``ClassificationTask``."""

    metric = "Dice"
    goal = False  # reported beside the MedMNIST rows; the goals are not evaluated on it

    def __init__(self, name: str = "membrane", cfg: dict[str, Any] | None = None, root: Path = DATA_DIR):
        self.name, self.cfg, self.root = name, dict(CONFIG if cfg is None else cfg), root
        self.default_calib = self.cfg["calib"]
        self.ft_epochs = self.cfg["ft_epochs"]
        c = self.cfg
        self.model_name = f"monai-unet-2d-c{c['channels'][0]}-d{len(c['channels'])}-r{c['num_res_units']}"
        self.description = (
            "ISBI 2012 EM membranes (Cardona et al. 2010; `../shared/data/membrane`): images 0-19 train, 20-23 "
            f"validation, 24-29 test, full 512x512. MONAI 2D UNet (channels {'/'.join(map(str, c['channels']))}, "
            f"strides 2, {c['num_res_units']} residual units, batch norm, 2 classes) trained {c['epochs']} epochs of "
            f"{c['crops_per_image']} random {c['crop']}x{c['crop']} crops per image (flips, transposes; cross-entropy, "
            "best validation Dice). Metric: Dice of the membrane class (argmax) per test image, mean over the 6 test "
            "images; MACs and latency at one 512x512 image."
        )

    def data_path(self) -> Path:
        return self.root / "label" / "29.png"

    def load(self, limit: int | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {s: load_split(s, limit, self.root) for s in SPLITS}

    def example_input(self) -> torch.Tensor:
        return torch.zeros(1, 1, self.cfg["image_size"], self.cfg["image_size"])

    def fresh_model(self) -> nn.Module:
        from monai.networks.nets import UNet

        c = self.cfg
        return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=c["channels"], strides=c["strides"],
                    num_res_units=c["num_res_units"], norm="batch")  # fmt: skip

    @torch.inference_mode()
    def predict(self, model: nn.Module, x: torch.Tensor) -> np.ndarray:
        """Membrane probability maps ``[N, H, W]`` on the full images, one image at a time."""
        model.eval()
        return np.stack([torch.softmax(model(xi[None].to(run.DEVICE)), 1)[0, 1].cpu().numpy() for xi in x])

    def metrics(self, y: torch.Tensor, p: np.ndarray) -> tuple[float, float]:
        return float(dice_per_image(y, p).mean()), float("nan")

    def saved(self, y: torch.Tensor, p: np.ndarray, stage: str | None = None) -> dict[str, np.ndarray]:
        """What the benchmark keeps per row (``stage``) or for the base (None): per-image Dice, not the maps."""
        if stage is not None:
            return {f"{stage}_score": dice_per_image(y, p)}
        # a collapsed network predicts one class everywhere: all-interior scores 0, all-membrane this
        return {"score": dice_per_image(y, p), "trivial": float(dice_per_image(y, np.ones(y.shape)).mean())}

    def _batches(self, data: dict, gen: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = data["train"]
        n, b = len(x) * self.cfg["crops_per_image"], self.cfg["batch"]
        xc, yc = random_crops(x, y, n, self.cfg["crop"], gen)
        for i in range(0, n, b):
            yield xc[i : i + b], yc[i : i + b, 0]  # CrossEntropyLoss takes [B, H, W] class maps

    def steps_per_epoch(self, data: dict) -> int:
        return -(-len(data["train"][0]) * self.cfg["crops_per_image"] // self.cfg["batch"])

    def train(
        self,
        model: nn.Module,
        data: dict,
        epochs: int,
        seed: int,
        include_start: bool = False,
        extra_loss=None,
    ) -> dict:
        """``run.train`` on random crops, keeping the epoch of the best validation Dice (full images)."""
        xv, yv = data["val"]
        return run.train(
            model, None, None, epochs, self.cfg["batch"], seed, lr=self.cfg["lr"], include_start=include_start,
            batch_fn=lambda g: self._batches(data, g), steps_per_epoch=self.steps_per_epoch(data),
            score_fn=lambda m: self.metrics(yv, self.predict(m, xv))[:1], extra_loss=extra_loss,
        )  # fmt: skip

    def finetune(
        self, model: nn.Module, data: dict, epochs: int, seed: int, extra_loss=None, **variant
    ) -> dict:
        """The recovery fine-tune (``self.train`` from the pruned weights). ``variant``: ``budget.py``'s fine-tune
        settings; only their plain values are accepted here (no logit distillation for segmentation; its own
        learning rate, ``cfg["lr"]``)."""
        if variant.get("kd_alpha") or variant.get("lr", 1e-3) != 1e-3:
            raise ValueError(
                f"membrane fine-tune: {variant} not available for segmentation (no logit distillation, own lr)"
            )
        return self.train(model, data, epochs, seed, include_start=True, extra_loss=extra_loss)

    def base_model_path(self, cache: Path, n_train: int, epochs: int, seed: int) -> Path:
        return cache / f"{self.name}_{self.model_name}_e{epochs}_n{n_train}_s{seed}.pt"

    def base_model(self, data: dict, cache: Path, epochs: int | None, seed: int) -> tuple[nn.Module, dict]:
        """The unpruned UNet, initialised and trained with ``seed`` (cached: reruns load it)."""
        ep = self.cfg["epochs"] if epochs is None else epochs
        path = self.base_model_path(cache, len(data["train"][0]), ep, seed)
        torch.manual_seed(seed)
        model = self.fresh_model().to(run.DEVICE)
        if path.exists():
            blob = torch.load(path, map_location=run.DEVICE, weights_only=True)
            model.load_state_dict(blob["state"])
            return model, blob["info"]
        info = self.train(model, data, ep, seed)
        info["epochs"] = ep
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state": model.state_dict(), "info": info}, path)
        return model, info

    def calibration(self, data: dict, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` random training crops chosen by the seed, batches of 8, labels ``[B, 1, H, W]`` (relevance targets,
        BatchNorm statistics on crops)."""
        g = torch.Generator().manual_seed(1000 + seed)
        xc, yc = random_crops(*data["train"], n, self.cfg["crop"], g)
        return [(xc[i : i + 8], yc[i : i + 8]) for i in range(0, n, 8)]
