"""Dataset readers for the bundles: MedMNIST ``.npz``, class folders, Decathlon datalists, synthetic phantoms.

Every reader returns a MONAI datalist (a list of dicts). Classification items are
``{"image": float32 array [C, *spatial] in [0, 1], "label": int, "id": str}``; segmentation items are
``{"image": path, "label": path}`` of NIfTI files, read back by ``LoadImaged`` in the bundle.

With no ``dataset_dir`` the bundles use offline defaults made with MONAI's synthetic phantoms
(``monai.data.synthetic``), so every bundle runs on any machine without downloads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.transforms import MapTransform

from monai_iaprune.utils.settings import check_int

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")


def _split_seed(split: str, seed: int) -> int:
    # different, reproducible phantoms per split so validation never repeats a training sample
    return int(seed) * 1000 + SPLITS.index(split) * 7919


# ------------------------------------------------------------------------------------------------- synthetic defaults
def synthetic_classification(
    num_samples: int,
    spatial_dims: int = 2,
    size: int = 32,
    split: str = "train",
    seed: int = 0,
    noise: float = 0.5,
) -> list[dict[str, Any]]:
    """Phantoms from ``monai.data.synthetic`` with a learnable two-class label: small vs large objects.

    Class 0 phantoms hold small blobs (radius about ``size/12``-``size/8``), class 1 phantoms larger ones
    (about ``size/8``-``size/5``); object count (1-4), positions and noise are random, so the total bright
    area overlaps between classes and the task is not trivially separable. Classes alternate.

    Args:
        num_samples: number of items.
        spatial_dims: 2 (``create_test_image_2d``) or 3 (``create_test_image_3d``).
        size: edge length of the square / cubic image.
        split: ``"train"``, ``"val"`` or ``"test"``; each split draws different phantoms.
        seed: base random seed.
        noise: maximum uniform noise added by the generator.

    Returns:
        ``[{"image": float32 [1, *spatial] in [0, 1], "label": 0 | 1, "id": str}, ...]``.
    """
    from monai.data.synthetic import create_test_image_2d, create_test_image_3d

    _check_split(split)
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if num_samples < 1 or size < 8:
        raise ValueError(f"need num_samples >= 1 and size >= 8, got num_samples={num_samples}, size={size}")
    rs = np.random.RandomState(_split_seed(split, seed))
    small = (max(1, size // 12), max(2, size // 8))
    large = (max(2, size // 8), max(3, size // 5))
    items = []
    for i in range(num_samples):
        label = i % 2
        rad_min, rad_max = large if label else small
        kwargs = dict(
            num_objs=int(rs.randint(1, 5)),
            rad_max=rad_max,
            rad_min=rad_min,
            noise_max=noise,
            num_seg_classes=1,
            channel_dim=0,
            random_state=rs,
        )
        if spatial_dims == 2:
            img, _ = create_test_image_2d(size, size, **kwargs)
        else:
            img, _ = create_test_image_3d(size, size, size, **kwargs)
        img = img.astype(np.float32)
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-8)
        items.append({"image": img, "label": label, "id": f"synthetic_{split}_{i:04d}"})
    return items


def synthetic_segmentation_nifti(
    out_dir: str | os.PathLike,
    num_samples: int,
    size: int = 32,
    split: str = "train",
    seed: int = 0,
    num_seg_classes: int = 1,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> list[dict[str, str]]:
    """Write 3D phantoms and their masks as NIfTI files (``create_test_image_3d``) and return the datalist.

    The files carry a real affine: voxel size ``spacing`` (mm) on the diagonal, so a bundle's ``Spacingd``
    resamples them like acquired volumes (anisotropic ``spacing`` turns the voxel-grid spheres into
    ellipsoids in physical space). Files already present with the same name are reused (the generator is
    deterministic for a seed), so repeated runs do not rewrite them.

    Args:
        out_dir: folder to write ``{split}_{i:03d}_image.nii.gz`` / ``_label.nii.gz`` into (created if missing).
        num_samples: number of volumes.
        size: edge length of the cubic volume.
        split: ``"train"``, ``"val"`` or ``"test"``.
        seed: base random seed.
        num_seg_classes: foreground classes in the mask (labels ``1..num_seg_classes``, 0 is background).
        spacing: voxel size in mm along the three axes, written into the NIfTI affine.

    Returns:
        ``[{"image": path, "label": path}, ...]``.
    """
    import nibabel as nib
    from monai.data.synthetic import create_test_image_3d

    _check_split(split)
    if num_samples < 1 or size < 8:
        raise ValueError(f"need num_samples >= 1 and size >= 8, got num_samples={num_samples}, size={size}")
    spacing = tuple(float(v) for v in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive voxel sizes (mm), got {spacing}")
    affine = np.diag([*spacing, 1.0])
    sp = "x".join(f"{v:g}" for v in spacing)
    out = Path(out_dir) / f"s{size}_c{num_seg_classes}_seed{seed}_sp{sp}"
    out.mkdir(parents=True, exist_ok=True)
    rs = np.random.RandomState(_split_seed(split, seed))
    items = []
    for i in range(num_samples):
        img, seg = create_test_image_3d(
            size,
            size,
            size,
            num_objs=int(rs.randint(3, 7)),
            rad_max=max(3, size // 5),
            rad_min=max(2, size // 10),
            noise_max=0.3,
            num_seg_classes=num_seg_classes,
            random_state=rs,
        )
        ip, lp = out / f"{split}_{i:03d}_image.nii.gz", out / f"{split}_{i:03d}_label.nii.gz"
        for path, arr in ((ip, img.astype(np.float32)), (lp, seg.astype(np.uint8))):
            if not path.exists():
                tmp = path.with_name(path.name.replace(".nii.gz", f".tmp{os.getpid()}.nii.gz"))
                nib.save(nib.Nifti1Image(arr, affine), str(tmp))
                os.replace(tmp, path)
        items.append({"image": str(ip), "label": str(lp)})
    return items


# -------------------------------------------------------------------------------------------------- real data readers
def load_medmnist(
    path: str | os.PathLike, split: str = "train", spatial_dims: int | None = None
) -> list[dict[str, Any]]:
    """Read one split of a MedMNIST v2 ``.npz`` (2D or 3D) as a classification datalist.

    Args:
        path: the ``.npz`` file (keys ``{split}_images`` uint8 and ``{split}_labels`` of shape ``(N, 1)``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        spatial_dims: expected dimensionality (2 or 3); a mismatch raises. ``None`` accepts either.

    Returns:
        ``[{"image": float32 [C, *spatial] in [0, 1], "label": int, "id": str}, ...]``.
    """
    _check_split(split)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MedMNIST file not found: {path}")
    ik, lk = f"{split}_images", f"{split}_labels"
    try:
        with np.load(path) as npz:
            keys = sorted(npz.keys())
            if ik in npz and lk in npz:
                images, labels = npz[ik], npz[lk]
    except Exception as e:  # BadZipFile, zlib / struct errors of a truncated download, pickle refusal, ...
        raise ValueError(
            f"cannot read MedMNIST file {path} ({type(e).__name__}: {e}); the file is corrupt or not an .npz"
        ) from e
    if ik not in keys or lk not in keys:
        raise KeyError(f"{path} is not a MedMNIST .npz: keys {ik!r} / {lk!r} missing (has {keys})")
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise ValueError(
            f"{path.name} has multi-label targets (shape {labels.shape}); only single-label sets are supported"
        )
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != len(images):
        raise ValueError(
            f"{path.name}: {len(images)} {split} images but {len(labels)} labels; the file is damaged"
        )
    if images.ndim == 3:  # (N, H, W) grey 2D
        images, dims = images[:, None], 2
    elif images.ndim == 4 and images.shape[-1] == 3 and spatial_dims != 3:  # (N, H, W, 3) RGB 2D
        images, dims = images.transpose(0, 3, 1, 2), 2
    elif images.ndim == 4:  # (N, D, H, W) grey 3D
        images, dims = images[:, None], 3
    else:
        raise ValueError(f"unexpected MedMNIST image array of shape {images.shape} in {path}")
    if spatial_dims is not None and dims != spatial_dims:
        raise ValueError(f"{path.name} holds {dims}D images but this bundle is {spatial_dims}D")
    images = images.astype(np.float32) / 255.0
    return [
        {"image": img, "label": int(lbl), "id": f"{path.stem}_{split}_{i:05d}"}
        for i, (img, lbl) in enumerate(zip(images, labels))
    ]


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _read_image(path: Path, channels: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    except Exception as e:  # PIL's UnidentifiedImageError / "image file is truncated" OSError name no file
        raise ValueError(f"cannot read image {path} ({type(e).__name__}: {e})") from e
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def load_image_folder(
    root: str | os.PathLike, split: str = "train", channels: int = 1, val_fraction: float = 0.2, seed: int = 0
) -> list[dict[str, Any]]:
    """Read a folder of class sub-folders of 2D images (PNG/JPEG/...) as a classification datalist.

    Layouts: ``root/<class>/*.png`` (split deterministically: ``val_fraction`` of each class to ``"val"``,
    the same files for ``"test"``), or ``root/{train,val,test}/<class>/*.png``. Class indices follow the
    sorted class-folder names.

    Args:
        root: the dataset folder.
        split: ``"train"``, ``"val"`` or ``"test"``.
        channels: 1 (read as greyscale) or 3 (RGB).
        val_fraction: held-out fraction per class for the single-level layout.
        seed: shuffling seed of that split.

    Returns:
        ``[{"image": float32 [channels, H, W] in [0, 1], "label": int, "id": file path}, ...]`` (sizes may differ; the
        bundle transforms resize).
    """
    _check_split(split)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    if (root / "train").is_dir():
        folder = root / split
        if not folder.is_dir() and split == "test":
            folder = root / "val"
        if not folder.is_dir():
            raise FileNotFoundError(f"{root} has a train/ folder but no {split}/ folder")
        classes = [p.name for p in _class_dirs(root / "train")]
        files = []
        for ci, name in enumerate(classes):
            if (folder / name).is_dir():
                files += [(f, ci) for f in _images_in(folder / name)]
    else:
        classes = [p.name for p in _class_dirs(root)]
        files = []
        rs = np.random.RandomState(seed)
        for ci, name in enumerate(classes):
            imgs = _images_in(root / name)
            order = rs.permutation(len(imgs))
            n_val = max(1, int(round(val_fraction * len(imgs)))) if len(imgs) > 1 else 0
            chosen = order[:n_val] if split in ("val", "test") else order[n_val:]
            files += [(imgs[j], ci) for j in sorted(chosen)]
    if len(classes) < 2:
        raise ValueError(f"{root} must hold at least two class sub-folders of images, found {classes}")
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found for split {split!r} under {root}")
    return [{"image": _read_image(f, channels), "label": ci, "id": str(f)} for f, ci in files]


def load_datalist(
    path: str | os.PathLike, split: str = "train", val_fraction: float = 0.2, *, label_is_path: bool = True
) -> list[dict[str, Any]]:
    """Read a Decathlon-style datalist JSON of NIfTI files and check every file exists.

    Keys: ``"training"`` (and optionally ``"validation"`` / ``"test"``) lists of ``{"image": ..., "label": ...}``,
    paths relative to the JSON's folder (MONAI's ``load_decathlon_datalist``). With no ``"validation"`` list, the
    last ``val_fraction`` of ``"training"`` (at least one item) is the validation split.

    Args:
        path: the JSON file, or a folder holding ``dataset.json``.
        split: ``"train"``, ``"val"`` or ``"test"`` (falls back to ``"val"`` when the file has no test list).
        val_fraction: held-out fraction when there is no ``"validation"`` list.
        label_is_path: ``True`` for segmentation (labels are mask files, resolved and checked like images);
            ``False`` for classification (labels are class indices, kept as they are).

    Returns:
        ``[{"image": absolute path, "label": absolute path or class index}, ...]``.

    Raises:
        FileNotFoundError: the JSON, or any file it names, is missing (all missing files are listed).
    """
    from monai.data import load_decathlon_datalist

    _check_split(split)
    path = Path(path)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"datalist JSON not found: {path}")
    try:
        content = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"datalist {path} is not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(content, dict) or "training" not in content:
        raise KeyError(f"datalist {path} has no 'training' list (keys: {sorted(content)})")
    key = {"train": "training", "val": "validation", "test": "test"}[split]
    if key == "test" and key not in content:
        key = "validation"
    if key in content and (split != "train" or "validation" in content):
        items = load_decathlon_datalist(
            str(path), is_segmentation=label_is_path, data_list_key=key, base_dir=str(path.parent)
        )
    else:  # no validation list: hold out the last val_fraction of "training"
        items = load_decathlon_datalist(
            str(path), is_segmentation=label_is_path, data_list_key="training", base_dir=str(path.parent)
        )
        n_val = max(1, int(round(val_fraction * len(items)))) if len(items) > 1 else 0
        items = items[len(items) - n_val :] if split != "train" else items[: len(items) - n_val]
    if not items:
        raise ValueError(f"datalist {path} yields no item for split {split!r}")
    file_keys = ("image", "label") if label_is_path else ("image",)
    missing = sorted(
        {str(v) for it in items for k, v in it.items() if k in file_keys and not Path(v).exists()}
    )
    if missing:
        raise FileNotFoundError(f"datalist {path} names {len(missing)} missing file(s): {missing[:5]}")
    return items


def _class_index(value: Any, where: str) -> int:
    """``value`` as a class index (an int >= 0, or a float / one-element list holding one), else ValueError."""
    v = value
    if isinstance(v, (list, tuple, np.ndarray)) and np.size(v) == 1:
        v = np.asarray(v).reshape(-1)[0]
    numeric = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
    if not numeric or float(v) != int(v) or int(v) < 0:
        raise ValueError(f"{where}: label {value!r} is not a class index (an integer 0, 1, ...)")
    return int(v)


def _read_volume(path: str | os.PathLike, spatial_dims: int) -> np.ndarray:
    """One image file (NIfTI, or any format MONAI's ``LoadImage`` reads) as float32 ``[C, *spatial]`` in [0, 1]."""
    from monai.transforms import LoadImage

    try:
        img = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
    except Exception as e:
        raise ValueError(f"cannot read image {path} ({type(e).__name__}: {e})") from e
    arr = np.asarray(img, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(
            f"image {path} holds {int((~np.isfinite(arr)).sum())} non-finite value(s) (NaN / Inf)"
        )
    if arr.ndim - 1 != spatial_dims:
        raise ValueError(
            f"{path} holds {arr.ndim - 1}D images (shape {arr.shape}) but this bundle is {spatial_dims}D"
        )
    lo, hi = float(arr.min()), float(arr.max())  # per-image min-max, like the synthetic default
    return (arr - lo) / max(hi - lo, 1e-8)


def load_classification_datalist(
    path: str | os.PathLike, split: str = "train", spatial_dims: int = 3, val_fraction: float = 0.2
) -> list[dict[str, Any]]:
    """Read a Decathlon-style datalist JSON of ``{"image": file, "label": class index}`` items and load the images.

    Splits as ``load_datalist``. Images are read with MONAI's ``LoadImage`` (NIfTI and the other formats it
    knows), channel first, and scaled per image to [0, 1], so the items match the other classification readers.

    Args:
        path: the JSON file, or a folder holding ``dataset.json``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        spatial_dims: expected dimensionality of the images (2 or 3); a mismatch raises.
        val_fraction: held-out fraction when there is no ``"validation"`` list.

    Returns:
        ``[{"image": float32 [C, *spatial] in [0, 1], "label": int, "id": file path}, ...]``.

    Raises:
        FileNotFoundError: the JSON or an image it names is missing.
        ValueError: a label is not a class index, or an image cannot be read or has the wrong dimensionality
            (the message names the file).
    """
    items = load_datalist(path, split, val_fraction, label_is_path=False)
    out = []
    for it in items:
        if "label" not in it:
            raise ValueError(f"datalist {path}: item {it.get('image')!r} has no 'label' (a class index)")
        label = _class_index(it["label"], f"datalist {path}, item {it['image']}")
        out.append({"image": _read_volume(it["image"], spatial_dims), "label": label, "id": str(it["image"])})
    return out


def infer_num_classes(data: Sequence[Mapping[str, Any]] | str | os.PathLike) -> int:
    """The number of classes of a classification dataset.

    Args:
        data: a classification datalist (``max(label) + 1``; a split may lack the last classes, so prefer the
            training split) or a folder of class sub-folders (their number, as ``load_image_folder`` indexes
            them; with a ``train/`` folder, its sub-folders).

    Returns:
        The class count.

    Raises:
        ValueError: an empty datalist, a label that is not a class index, or a folder with no class sub-folder.
    """
    if isinstance(data, (str, os.PathLike)):
        root = Path(data)
        if not root.is_dir():
            raise ValueError(f"infer_num_classes: {root} is not a folder of class sub-folders")
        classes = _class_dirs(root / "train" if (root / "train").is_dir() else root)
        if not classes:
            raise ValueError(f"infer_num_classes: {root} holds no class sub-folder")
        return len(classes)
    if not len(data):
        raise ValueError("infer_num_classes: the datalist has no item")
    return 1 + max(_class_index(it["label"], f"item {it.get('id', i)}") for i, it in enumerate(data))


def check_num_classes(
    items: Sequence[Mapping[str, Any]], num_classes: int, source: Any, exact: int | None = None
) -> None:
    """Raise a ValueError naming ``--num_classes`` when the data hold more classes than ``num_classes``.

    Args:
        items: the classification datalist.
        num_classes: the network's output count (the bundle's ``num_classes`` setting).
        source: what the items came from, for the message (``dataset_dir``).
        exact: the dataset's known class count (class folders); then any difference raises.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    found = max(infer_num_classes(items), exact or 0)
    if found > num_classes or (exact is not None and exact != num_classes):
        raise ValueError(
            f"dataset_dir {source} holds {found} classes (labels 0..{found - 1}) but num_classes {num_classes} "
            f"is set; pass --num_classes {found}"
        )


# ----------------------------------------------------------------------------- dispatchers used by the bundle configs
def _existing(dataset_dir: str | os.PathLike) -> Path:
    path = Path(os.path.expanduser(str(dataset_dir)))
    if not path.exists():
        raise FileNotFoundError(f"dataset_dir does not exist: {path}")
    return path


def classification_datalist(
    dataset_dir: str | os.PathLike | None,
    split: str,
    spatial_dims: int,
    num_samples: int = 64,
    size: int = 32,
    seed: int = 0,
    channels: int = 1,
    max_samples: int | None = None,
    num_classes: int | None = None,
) -> list[dict[str, Any]]:
    """The classification datalist a bundle trains / evaluates on.

    Args:
        dataset_dir: ``None`` or ``""`` for the synthetic default; a MedMNIST ``.npz`` file; a folder of class
            sub-folders of images (2D only); or a Decathlon-style JSON with ``{"image", "label"}`` items.
        split: ``"train"``, ``"val"`` or ``"test"``.
        spatial_dims: 2 or 3.
        num_samples: synthetic items per split (train; val and test get half).
        size: synthetic image edge length.
        seed: synthetic / split seed.
        channels: image channels of a class folder (1 grey, 3 RGB).
        max_samples: keep at most this many items (the first ones), for quick runs on real data.
        num_classes: the network's class count; a dataset with more classes (or a class folder with a
            different number of class sub-folders) raises before any training, naming ``--num_classes``.
            ``None`` checks nothing (``infer_num_classes`` on the training datalist gives the count).

    Returns:
        A list of ``{"image", "label"}`` dicts.

    Raises:
        ValueError: the data do not match ``num_classes`` or ``spatial_dims``, or a file cannot be read.
    """
    check_int(max_samples, "max_samples", 1, allow_none=True)  # 0 or -1 would keep all / all but one silently
    if dataset_dir in (None, "", "None", "null"):
        n = num_samples if split == "train" else max(2, num_samples // 2)
        items = synthetic_classification(n, spatial_dims, size, split, seed)
        exact, source = None, "'' (synthetic, 2 classes)"
    else:
        path = _existing(dataset_dir)
        exact, source = None, path
        if path.is_file() and path.suffix == ".npz":
            items = load_medmnist(path, split, spatial_dims)
        elif path.is_file() and path.suffix == ".json":
            items = load_classification_datalist(path, split, spatial_dims)
        elif path.is_dir():
            if spatial_dims != 2:
                raise ValueError(
                    f"a folder of class sub-folders of images is a 2D dataset; this bundle is {spatial_dims}D"
                )
            items = load_image_folder(path, split, channels=channels, seed=seed)
            exact = infer_num_classes(path)
        else:
            raise ValueError(
                f"unsupported dataset_dir {path}: give a MedMNIST .npz, a class-folder directory or a datalist .json"
            )
    if num_classes is not None:
        check_num_classes(items, num_classes, source, exact)
    return items[:max_samples] if max_samples else items


def segmentation_datalist(
    dataset_dir: str | os.PathLike | None,
    split: str,
    synthetic_dir: str | os.PathLike,
    num_samples: int = 8,
    size: int = 32,
    seed: int = 0,
    num_seg_classes: int = 1,
    max_samples: int | None = None,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
) -> list[dict[str, str]]:
    """The segmentation datalist (NIfTI paths) a bundle trains / evaluates on.

    Args:
        dataset_dir: ``None`` or ``""`` for synthetic phantoms written as NIfTI under ``synthetic_dir``; a
            Decathlon-style datalist JSON (or a folder holding ``dataset.json``).
        split: ``"train"``, ``"val"`` or ``"test"``.
        synthetic_dir: where synthetic NIfTI files are written.
        num_samples: synthetic volumes for ``"train"`` (val / test get half, at least 2).
        size: synthetic volume edge length.
        seed: synthetic seed.
        num_seg_classes: synthetic foreground classes.
        max_samples: keep at most this many items.
        spacing: synthetic voxel size in mm (written into the NIfTI affine).

    Returns:
        A list of ``{"image": path, "label": path}`` dicts.
    """
    check_int(max_samples, "max_samples", 1, allow_none=True)
    if dataset_dir in (None, "", "None", "null"):
        n = num_samples if split == "train" else max(2, num_samples // 2)
        items = synthetic_segmentation_nifti(synthetic_dir, n, size, split, seed, num_seg_classes, spacing)
    else:
        items = load_datalist(_existing(dataset_dir), split)
    return items[:max_samples] if max_samples else items


class CheckSameSpatialShaped(MapTransform):
    """Refuse a sample whose label has another spatial shape than its image, naming both files.

    Put it right after ``EnsureChannelFirstd``: later resampling (``Spacingd``) would otherwise bring a label of
    another grid to the image's shape silently and the network would train on misaligned masks.

    Args:
        keys: the image key first, then the label key(s).
    """

    def __init__(self, keys: Sequence[str] = ("image", "label")) -> None:
        super().__init__(keys, allow_missing_keys=True)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        shapes = {k: tuple(d[k].shape[1:]) for k in self.keys if k in d}
        if len(set(shapes.values())) > 1:
            files = {k: str(getattr(d[k], "meta", {}).get("filename_or_obj", "?")) for k in shapes}
            raise ValueError(
                f"image and label of one sample have different spatial shapes {shapes} (files {files}); "
                "resample the label to its image's grid first"
            )
        return d


class CheckLabelValuesd(MapTransform):
    """Refuse a segmentation label holding values other than the class indices ``0 .. num_classes - 1``, naming the file.

    Put it right after loading: a value ``>= num_classes`` fails deep inside the loss's one-hot step without naming the
    file, and a fractional value (an image given as label, a label resampled with linear interpolation) would be
    truncated to a class silently.

    Args:
        keys: the label key(s).
        num_classes: the network's output channels (background included).
    """

    def __init__(self, keys: Sequence[str] = ("label",), num_classes: int = 2) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.num_classes = check_int(num_classes, "num_classes", 1)

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        d = dict(data)
        for key in self.key_iterator(d):
            v = torch.as_tensor(d[key]).float()
            bad = ~torch.isfinite(v) | (v < 0) | (v > self.num_classes - 1) | (v != v.round())
            if bad.any():
                values = torch.unique(v[bad])[:5].tolist()
                name = str(getattr(d[key], "meta", {}).get("filename_or_obj", key))
                raise ValueError(
                    f"label {name} holds {int(bad.sum())} voxel(s) with values {values} that are not class indices "
                    f"0..{self.num_classes - 1} (num_classes {self.num_classes}); fix the label or pass --num_classes"
                )
        return d


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """Return ``value`` when it is one of ``choices``, else raise a ValueError naming the setting."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")
    return value


__all__ = [
    "CheckLabelValuesd",
    "CheckSameSpatialShaped",
    "check_choice",
    "check_num_classes",
    "classification_datalist",
    "infer_num_classes",
    "load_classification_datalist",
    "load_datalist",
    "load_image_folder",
    "load_medmnist",
    "segmentation_datalist",
    "synthetic_classification",
    "synthetic_segmentation_nifti",
]
