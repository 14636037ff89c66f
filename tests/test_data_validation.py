"""Input validation of the classification datalists: Decathlon JSON, class count, corrupt files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monai_iaprune import data


def _nifti_datalist(tmp_path, labels=(0, 1, 0, 1, 2), size=8):
    import nibabel as nib

    rs = np.random.RandomState(0)
    items = []
    for i, label in enumerate(labels):
        name = f"vol_{i}.nii.gz"
        nib.save(
            nib.Nifti1Image((rs.rand(size, size, size) * 100 - 50).astype(np.float32), np.eye(4)),
            tmp_path / name,
        )
        items.append({"image": name, "label": label})
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"training": items}))
    return path


def test_decathlon_json_classification_3d(tmp_path):
    """Old code: load_datalist read classification items with is_segmentation=True, so MONAI joined the
    integer label to the base folder (TypeError in os.path.join); the bundle transforms also expect arrays."""
    path = _nifti_datalist(tmp_path)
    train = data.classification_datalist(path, "train", 3)
    val = data.classification_datalist(path, "val", 3)
    assert [it["label"] for it in train] == [0, 1, 0, 1] and [it["label"] for it in val] == [2]
    img = train[0]["image"]
    assert img.shape == (1, 8, 8, 8) and img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1
    assert train[0]["id"].endswith("vol_0.nii.gz")
    with pytest.raises(ValueError, match="3D.*2D"):
        data.classification_datalist(path, "train", 2)


def test_decathlon_json_bad_label_and_missing_file(tmp_path):
    path = _nifti_datalist(tmp_path, labels=(0, 1))
    content = json.loads(path.read_text())
    content["training"][0]["label"] = "tumour"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="class index"):
        data.classification_datalist(path, "train", 3)
    content["training"][0]["label"] = 0
    content["training"][0]["image"] = "gone.nii.gz"  # item 1 is the val split
    path.write_text(json.dumps(content))
    with pytest.raises(FileNotFoundError, match="gone.nii.gz"):
        data.classification_datalist(path, "train", 3)


def _class_folder(tmp_path, n_classes=3, per_class=3):
    from PIL import Image

    for c in range(n_classes):
        (tmp_path / f"class{c}").mkdir()
        for i in range(per_class):
            Image.fromarray((np.random.rand(8, 8) * 255).astype(np.uint8)).save(
                tmp_path / f"class{c}" / f"{i}.png"
            )
    return tmp_path


def test_infer_num_classes():
    assert data.infer_num_classes([{"label": 0}, {"label": 3}, {"label": np.int64(1)}]) == 4
    assert data.infer_num_classes(data.synthetic_classification(4, size=8)) == 2
    with pytest.raises(ValueError, match="no item"):
        data.infer_num_classes([])
    with pytest.raises(ValueError, match="-1"):
        data.infer_num_classes([{"label": -1}])


def test_infer_num_classes_class_folders(tmp_path):
    root = _class_folder(tmp_path, n_classes=3, per_class=1)  # one image per class: val holds none of them
    assert data.infer_num_classes(root) == 3


def test_class_count_mismatch_named_before_training(tmp_path):
    """Old code: a 3-class folder with num_classes 2 built the datalist and stopped mid-epoch with
    ``IndexError: Target 2 is out of bounds`` in the loss; classification_datalist had no num_classes."""
    root = _class_folder(tmp_path)
    with pytest.raises(ValueError, match="--num_classes 3"):
        data.classification_datalist(root, "train", 2, num_classes=2)
    assert len(data.classification_datalist(root, "train", 2, num_classes=3)) == 6
    assert len(data.classification_datalist(root, "train", 2)) == 6  # None: no check


def test_class_count_mismatch_npz(tmp_path):
    path = tmp_path / "x.npz"
    np.savez(path, train_images=np.zeros((3, 8, 8), np.uint8), train_labels=np.array([[0], [4], [1]]))
    with pytest.raises(ValueError, match="num_classes 2.*--num_classes 5"):
        data.classification_datalist(path, "train", 2, num_classes=2)


def test_corrupt_npz_names_file(tmp_path):
    """Old code: numpy's BadZipFile / pickle error without the file name."""
    path = tmp_path / "broken.npz"
    path.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(ValueError, match="broken.npz"):
        data.load_medmnist(path)
    good = tmp_path / "trunc.npz"
    np.savez_compressed(
        good, train_images=np.random.randint(0, 255, (20, 8, 8), np.uint8), train_labels=np.zeros((20, 1))
    )
    good.write_bytes(good.read_bytes()[:-60])  # truncated download
    with pytest.raises(ValueError, match="trunc.npz"):
        data.load_medmnist(good)


def test_unreadable_image_names_file(tmp_path):
    """Old code: PIL's 'image file is truncated' OSError from convert() carries no path."""
    root = _class_folder(tmp_path, n_classes=2, per_class=4)
    bad = root / "class1" / "0.png"
    bad.write_bytes(bad.read_bytes()[:60])
    errors = []
    for split in ("train", "val"):  # the file lands in one of the two splits
        try:
            data.load_image_folder(root, split)
        except ValueError as e:
            errors.append(str(e))
    assert len(errors) == 1 and str(bad) in errors[0]


def test_damaged_files_are_named(tmp_path):
    """A MedMNIST file with fewer labels than images (zip would pair them silently), a datalist that is not JSON, a
    volume holding NaN (min-max scaling would turn the whole image into NaN): each error names the file."""
    rs = np.random.RandomState(0)
    np.savez(tmp_path / "short.npz", train_images=(rs.rand(6, 8, 8) * 255).astype(np.uint8),
             train_labels=np.zeros((4, 1), dtype=np.int64))  # fmt: skip
    with pytest.raises(ValueError, match="short.npz: 6 train images but 4 labels"):
        data.load_medmnist(tmp_path / "short.npz", "train")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        data.classification_datalist(tmp_path / "broken.json", "train", 3)
    path = _nifti_datalist(tmp_path, labels=(0, 1, 0))
    import nibabel as nib

    vol = np.zeros((8, 8, 8), dtype=np.float32)
    vol[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "vol_0.nii.gz")
    with pytest.raises(ValueError, match=r"vol_0.nii.gz holds 1 non-finite value"):
        data.classification_datalist(path, "train", 3)


@pytest.mark.parametrize("max_samples", [0, -1, 1.5])
def test_max_samples_must_be_a_positive_count(max_samples):
    """``items[:0]`` kept every item and ``items[:-1]`` all but one, silently."""
    with pytest.raises(ValueError, match=f"bad max_samples {max_samples!r}"):
        data.classification_datalist("", "train", 2, num_samples=4, size=8, max_samples=max_samples)
    assert len(data.classification_datalist("", "train", 2, num_samples=4, size=8, max_samples=3)) == 3


@pytest.mark.parametrize("value", [3.0, 0.5, -1.0, float("nan")])
def test_segmentation_label_values_outside_the_classes_are_refused_naming_the_file(tmp_path, value):
    """Class 3 with num_classes 2 failed inside the loss's one-hot step naming no file; 0.5 was truncated to 0."""
    import nibabel as nib
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    lab = np.zeros((8, 8, 8), dtype=np.float32)
    lab[2:4, 2:4, 2:4] = 1
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "good.nii.gz")
    lab[0, 0, 0] = value
    nib.save(nib.Nifti1Image(lab, np.eye(4)), tmp_path / "bad.nii.gz")
    load = Compose([LoadImaged("label"), EnsureChannelFirstd("label")])
    check = data.CheckLabelValuesd("label", num_classes=2)
    check(load({"label": str(tmp_path / "good.nii.gz")}))
    with pytest.raises(ValueError, match=r"label .*bad.nii.gz holds 1 voxel\(s\) .* not class indices 0..1"):
        check(load({"label": str(tmp_path / "bad.nii.gz")}))
