"""The segmentation_3d bundle's model-zoo training pipeline: synthetic training, physical geometry, real MRI.

The bundle is copied to a temporary folder and run in-process with MONAI's ``create_workflow`` (what
``python -m monai.bundle run`` does), so ``initialize`` / ``run`` / ``finalize`` all execute.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import NIFTI, ROOT, require_file

BUNDLE = ROOT / "bundles" / "segmentation_3d"
# measured: 0.874 after the default 6 epochs (12 synthetic volumes); untrained nets give 0.001-0.38 (seeds 0-2)
SYNTHETIC_DICE_FLOOR = 0.6


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "segmentation_3d"
    shutil.copytree(BUNDLE, dst, ignore=shutil.ignore_patterns("models", "eval", "data", "__pycache__"))
    return dst


def _workflow(bundle: Path, configs: list[str], run_id: str = "run", **overrides):
    from monai.bundle.scripts import create_workflow

    return create_workflow(
        config_file=[str(c) if Path(c).is_absolute() else str(bundle / "configs" / c) for c in configs],
        run_id=run_id,
        bundle_root=str(bundle),
        **overrides,
    )


def _train(bundle: Path, **overrides) -> float:
    """Run the bundle's training (initialize, run, finalize); return the last validation Dice."""
    wf = _workflow(bundle, ["train.json"], **overrides)
    wf.run()
    wf.finalize()
    return float(wf.parser.get_parsed_content("validate#evaluator").state.metrics["val_mean_dice"])


def test_synthetic_training_reaches_dice_floor_and_writes_checkpoint(tmp_path):
    bundle = _copy(tmp_path)
    dice = _train(bundle)
    ckpt = bundle / "models" / "model.pt"
    assert ckpt.is_file()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert any(k.startswith("convInit") for k in state)
    assert dice > SYNTHETIC_DICE_FLOOR, f"validation Dice {dice:.3f} after the default synthetic run"
    # the synthetic phantoms carry their spacing in the affine, and validation sees whole volumes
    import nibabel as nib

    first = sorted((bundle / "data" / "synthetic").rglob("train_000_image.nii.gz"))[0]
    assert nib.load(str(first)).header.get_zooms() == (1.0, 1.0, 2.0)
    with pytest.raises(RuntimeError) as err:  # initialize refuses to replace model.pt (MONAI wraps the error)
        _workflow(bundle, ["train.json"])
    cause = err.value.__cause__
    assert isinstance(cause, FileExistsError) and "refusing to overwrite" in str(cause)


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    import nibabel as nib

    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def test_preprocessing_keeps_physical_geometry(tmp_path):
    from monai.bundle import ConfigParser

    shape, spacing, pixdim = (30, 24, 8), (1.0, 1.0, 3.0), (1.5, 1.5, 1.5)
    affine = np.diag([-spacing[0], spacing[1], spacing[2], 1.0])  # first axis R->L: Orientationd must flip it
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij"))
    centre = np.array([14.0, 12.0, 10.5]).reshape(3, 1, 1, 1)
    ball = (((grid - centre) ** 2).sum(0) <= 7.0**2).astype(np.uint8)  # a sphere of radius 7 mm
    image = (1.0 + ball + 0.1 * np.random.RandomState(0).rand(*shape)).astype(np.float32)  # > 0: no crop
    item = {
        "image": _write_nifti(tmp_path / "img.nii.gz", image, affine),
        "label": _write_nifti(tmp_path / "lab.nii.gz", ball, affine),
    }
    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser.update({"bundle_root": str(tmp_path), "pixdim": list(pixdim), "roi_size": [8, 8, 8]})
    out = parser.get_parsed_content("validate#preprocessing")(item)
    img, lab = out["image"], out["label"]

    expected = tuple(int(round((n - 1) * s / p)) + 1 for n, s, p in zip(shape, spacing, pixdim))
    assert tuple(img.shape) == (1, *expected) == tuple(lab.shape)  # (1, 20, 16, 17): z upsampled, x/y down
    np.testing.assert_allclose(img.pixdim.numpy(), pixdim)
    np.testing.assert_allclose(np.diag(img.affine.numpy())[:3], pixdim)  # RAS: positive diagonal
    # the physical extent is kept to within one target voxel
    for n, s, m, p in zip(shape, spacing, expected, pixdim):
        assert abs((m - 1) * p - (n - 1) * s) <= p / 2 + 1e-6
    # nearest-neighbour labels stay labels; the sphere's physical volume is kept (4/3 pi 7^3 = 1437 mm^3)
    assert set(np.unique(lab.numpy()).tolist()) <= {0.0, 1.0}
    vol_in = ball.sum() * np.prod(spacing)
    vol_out = float(lab.sum()) * np.prod(pixdim)
    assert abs(vol_out - vol_in) / vol_in < 0.15 and abs(vol_in - 4 / 3 * math.pi * 7**3) / vol_in < 0.15
    # the sphere's centre lands where it was in physical space (x flipped by the RAS reorientation)
    idx = np.argwhere(lab.numpy()[0] > 0).mean(0)
    world = (img.affine.numpy() @ np.append(idx, 1.0))[:3]
    np.testing.assert_allclose(world, [-14.0, 12.0, 10.5], atol=1.0)
    # the intensity setting is checked before any work
    parser.update({"intensity": "bogus"})
    with pytest.raises(RuntimeError) as err:  # MONAI wraps expression errors; the cause names the setting
        parser.get_parsed_content("initialize")
    assert "unknown intensity 'bogus'" in str(err.value.__cause__)


def test_real_mri_trains_and_prunes(tmp_path):
    from monai_iaprune.overlay import overlay_path

    image = require_file(NIFTI / "itk_KmeansTest_T1UCharRaw.nii.gz")
    label = require_file(NIFTI / "itk_KmeansTest_T1RawSkullStrip.nii.gz")  # labels 0, 4, 5, 6
    bundle = _copy(tmp_path)
    # one labelled subject: train and validate on it (a pipeline smoke run, not an accuracy claim)
    pair = {"image": str(image), "label": str(label)}
    datalist = tmp_path / "dataset.json"
    datalist.write_text(json.dumps({"training": [pair], "validation": [pair]}))
    settings = {
        "dataset_dir": str(datalist),
        "num_classes": 7,
        "pixdim": [4.0, 4.0, 4.0],  # 2 x 2 x 3 mm, LSA on disk -> RAS 4 mm
        "roi_size": [32, 32, 32],
        "num_samples": 2,
    }
    dice = _train(bundle, epochs=2, **settings)
    assert (bundle / "models" / "model.pt").is_file()
    assert math.isfinite(dice)

    wf = _workflow(
        bundle,
        ["train.json", str(overlay_path())],
        run_id="prune",
        stages=1,
        finetune_epochs=1,
        latency_repeats=2,
        calibration_batches=1,
        **settings,
    )
    wf.run()
    wf.finalize()
    report = json.loads((bundle / "eval" / "prune_report.json").read_text())
    assert report["metric_name"] == "val_mean_dice"
    assert report["patch_size"] == [32, 32, 32]  # relevance on patches of the sliding window's roi_size
    assert report["params_after"] < report["params_before"]
    assert all(math.isfinite(report[k]) for k in ("metric_before", "metric_pruned", "metric_after"))
    assert (bundle / "models" / "pruned" / "model_pruned.pt").is_file()
