"""Dataset readers and synthetic defaults of monai_iaprune.data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import MEDMNIST, require_file

from monai_iaprune import data


def test_synthetic_classification_is_learnable_and_deterministic():
    a = data.synthetic_classification(40, spatial_dims=2, size=32, split="train", seed=0)
    b = data.synthetic_classification(40, spatial_dims=2, size=32, split="train", seed=0)
    v = data.synthetic_classification(40, spatial_dims=2, size=32, split="val", seed=0)
    assert a[0]["image"].shape == (1, 32, 32) and a[0]["image"].dtype == np.float32
    assert [x["label"] for x in a] == [i % 2 for i in range(40)]
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert not np.array_equal(a[0]["image"], v[0]["image"])  # splits differ
    # the label is learnable: class 1 (larger objects) has more bright area on average
    area = {c: np.mean([(x["image"] > 0.6).mean() for x in a if x["label"] == c]) for c in (0, 1)}
    assert area[1] > 1.5 * area[0]
    vol = data.synthetic_classification(2, spatial_dims=3, size=16)
    assert vol[0]["image"].shape == (1, 16, 16, 16)


def test_synthetic_segmentation_nifti_round_trip(tmp_path):
    from monai.data.synthetic import create_test_image_3d
    from monai.transforms import LoadImage

    items = data.synthetic_segmentation_nifti(tmp_path, 2, size=16, split="train", seed=3)
    assert len(items) == 2
    rs = np.random.RandomState(data._split_seed("train", 3))
    img, seg = create_test_image_3d(
        16,
        16,
        16,
        num_objs=int(rs.randint(3, 7)),
        rad_max=3,
        rad_min=2,
        noise_max=0.3,
        num_seg_classes=1,
        random_state=rs,
    )
    for reader in ("NibabelReader", "ITKReader"):
        loaded = LoadImage(reader=reader, image_only=True)(items[0]["image"])
        np.testing.assert_allclose(np.asarray(loaded), img, rtol=1e-6, atol=1e-6)
        lab = LoadImage(reader=reader, image_only=True)(items[0]["label"])
        np.testing.assert_array_equal(np.asarray(lab), seg)
    mtime = {p: __import__("os").stat(p).st_mtime_ns for it in items for p in it.values()}
    again = data.synthetic_segmentation_nifti(tmp_path, 2, size=16, split="train", seed=3)
    assert again == items
    assert all(__import__("os").stat(p).st_mtime_ns == t for p, t in mtime.items())  # reused, not rewritten


def test_synthetic_segmentation_nifti_spacing(tmp_path):
    import nibabel as nib

    items = data.synthetic_segmentation_nifti(tmp_path, 1, size=16, spacing=(0.8, 0.8, 2.5))
    for path in items[0].values():
        img = nib.load(path)
        np.testing.assert_allclose(np.diag(img.affine)[:3], [0.8, 0.8, 2.5])
        assert img.shape == (16, 16, 16)
    iso = data.synthetic_segmentation_nifti(tmp_path, 1, size=16)  # another spacing: other files, not reused
    assert iso[0]["image"] != items[0]["image"]
    with pytest.raises(ValueError, match="spacing must be three positive"):
        data.synthetic_segmentation_nifti(tmp_path, 1, size=16, spacing=(1.0, 0.0, 1.0))


def _fake_medmnist(path, shape, labels=None):
    rs = np.random.RandomState(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 3), ("test", 2)):
        arrays[f"{split}_images"] = rs.randint(0, 256, size=(n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels(n) if labels else (np.arange(n) % 2).reshape(n, 1)
    np.savez(path, **arrays)
    return arrays


def test_load_medmnist_2d_rgb_3d_and_errors(tmp_path):
    a2 = _fake_medmnist(tmp_path / "g.npz", (28, 28))
    items = data.load_medmnist(tmp_path / "g.npz", "val", spatial_dims=2)
    assert len(items) == 3 and items[1]["image"].shape == (1, 28, 28) and items[1]["label"] == 1
    np.testing.assert_allclose(items[2]["image"][0], a2["val_images"][2] / 255.0, rtol=1e-6)
    _fake_medmnist(tmp_path / "rgb.npz", (28, 28, 3))
    assert data.load_medmnist(tmp_path / "rgb.npz", "train")[0]["image"].shape == (3, 28, 28)
    _fake_medmnist(tmp_path / "v.npz", (8, 8, 8))
    assert data.load_medmnist(tmp_path / "v.npz", "test", spatial_dims=3)[0]["image"].shape == (1, 8, 8, 8)
    with pytest.raises(ValueError, match="3D images but this bundle is 2D"):
        data.load_medmnist(tmp_path / "v.npz", "test", spatial_dims=2)
    _fake_medmnist(tmp_path / "ml.npz", (28, 28), labels=lambda n: np.zeros((n, 14), dtype=int))
    with pytest.raises(ValueError, match="multi-label"):
        data.load_medmnist(tmp_path / "ml.npz", "train")
    with pytest.raises(FileNotFoundError, match="MedMNIST file not found"):
        data.load_medmnist(tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="unknown split"):
        data.load_medmnist(tmp_path / "g.npz", "training")


def test_load_real_breastmnist():
    path = require_file(MEDMNIST / "breastmnist.npz")
    items = data.classification_datalist(path, "val", spatial_dims=2)
    assert len(items) == 78  # documented split size
    assert items[0]["image"].shape == (1, 28, 28) and {it["label"] for it in items} == {0, 1}


def test_load_image_folder(tmp_path):
    from PIL import Image

    rs = np.random.RandomState(0)
    for cls, n in (("benign", 5), ("malignant", 4)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(rs.randint(0, 256, (20, 24), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    train = data.load_image_folder(tmp_path, "train", val_fraction=0.25)
    val = data.load_image_folder(tmp_path, "val", val_fraction=0.25)
    assert len(train) + len(val) == 9
    assert not {it["id"] for it in train} & {it["id"] for it in val}
    assert {it["label"] for it in train} == {0, 1}  # sorted class folder names -> indices
    assert all(("malignant" in it["id"]) == (it["label"] == 1) for it in train + val)
    assert (
        train[0]["image"].shape == (1, 20, 24)
        and 0.0 <= train[0]["image"].min() <= train[0]["image"].max() <= 1.0
    )
    assert data.load_image_folder(tmp_path, "train", channels=3)[0]["image"].shape == (3, 20, 24)
    (tmp_path / "one" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="at least two class sub-folders"):
        data.load_image_folder(tmp_path / "one", "train")
    (tmp_path / "one" / "b").mkdir()
    with pytest.raises(ValueError, match="no images"):
        data.load_image_folder(tmp_path / "one", "train")
    assert data.classification_datalist(tmp_path, "val", 2)[0]["image"].ndim == 3
    with pytest.raises(ValueError, match="2D dataset"):
        data.classification_datalist(tmp_path, "val", 3)


def test_load_datalist_relative_paths_split_and_missing_files(tmp_path):
    items = data.synthetic_segmentation_nifti(tmp_path / "img", 3, size=8)
    rel = [
        {k: str(__import__("pathlib").Path(v).relative_to(tmp_path)) for k, v in it.items()} for it in items
    ]
    (tmp_path / "dataset.json").write_text(json.dumps({"training": rel}))
    train = data.load_datalist(tmp_path, "train", val_fraction=0.34)
    val = data.load_datalist(tmp_path / "dataset.json", "val", val_fraction=0.34)
    assert [it["image"] for it in train + val] == [it["image"] for it in items]
    assert len(val) == 1
    (tmp_path / "bad.json").write_text(
        json.dumps({"training": [{"image": "nope.nii.gz", "label": "nope_seg.nii.gz"}] + rel})
    )
    with pytest.raises(FileNotFoundError, match=r"names 2 missing file\(s\)"):
        data.load_datalist(tmp_path / "bad.json", "train")
    with pytest.raises(FileNotFoundError, match="datalist JSON not found"):
        data.load_datalist(tmp_path / "absent.json")


def test_dispatch_synthetic_default_and_missing_dir(tmp_path):
    items = data.classification_datalist("", "val", 3, num_samples=8, size=12)
    assert len(items) == 4 and items[0]["image"].shape == (1, 12, 12, 12)
    with pytest.raises(FileNotFoundError, match="dataset_dir does not exist"):
        data.classification_datalist(tmp_path / "nowhere", "train", 2)
    with pytest.raises(FileNotFoundError, match="dataset_dir does not exist"):
        data.segmentation_datalist(tmp_path / "nowhere.json", "train", tmp_path)
    seg = data.segmentation_datalist(None, "train", tmp_path, num_samples=2, size=8, max_samples=1)
    assert len(seg) == 1 and seg[0]["label"].endswith("_label.nii.gz")
