"""The generic prune overlay on model-zoo-style bundles built from scratch (3D UNet segmentation, 2D classification).

Each bundle is written to a temporary folder in the model-zoo key layout (``train#trainer``, ``validate#evaluator``,
``validate#key_metric``, a ``CheckpointSaver`` writing ``models/model.pt``), trained for one epoch with its own
``run``, then pruned by ``python -m monai.bundle run prune`` with the packaged overlay in a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_iaprune.host_bundle import PatchOutputTransform, missing_host_keys
from monai_iaprune.overlay import OVERLAY_NAME, copy_overlay, main, overlay_path

# ------------------------------------------------------------------------------------------------------------------
# bundle builders (model-zoo layout, modelled on spleen_ct_segmentation's train.json)
# ------------------------------------------------------------------------------------------------------------------
FROM_ENGINE = "$monai.handlers.from_engine(['pred', 'label'])"


def _saver() -> dict:
    return {
        "_target_": "CheckpointSaver",
        "save_dir": "@ckpt_dir",
        "save_dict": {"model": "@network"},
        "save_key_metric": True,
        "key_metric_filename": "model.pt",
    }


def _common(network_def: dict) -> dict:
    return {
        "imports": ["$import glob", "$import os", "$import ignite"],
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/data'",
        "epochs": 1,
        "device": "$torch.device('cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@train#trainer.run()"],
    }


def _trainer(loss: str, postprocessing: str) -> dict:
    return {
        "_target_": "SupervisedTrainer",
        "max_epochs": "@epochs",
        "device": "@device",
        "train_data_loader": "@train#dataloader",
        "network": "@network",
        "loss_function": loss,
        "optimizer": "@optimizer",
        "inferer": "@train#inferer",
        "postprocessing": postprocessing,
        "train_handlers": "@train#handlers",
        "amp": False,
    }


def _evaluator() -> dict:
    return {
        "_target_": "SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": "@validate#dataloader",
        "network": "@network",
        "inferer": "@validate#inferer",
        "postprocessing": "@validate#postprocessing",
        "key_val_metric": "@validate#key_metric",
        "val_handlers": "@validate#handlers",
        "amp": False,
    }


def write_segmentation_bundle(
    root: Path,
    cases: int = 5,
    size: int = 32,
    roi: int = 16,
    network_def: dict | None = None,
    spatial_dims: int = 3,
    loss: dict | str | None = None,
    train_postprocessing: bool = True,
) -> Path:
    """A spleen_ct_segmentation-like bundle: NIfTI phantoms, RandCropByPosNegLabeld, sliding window.

    The network is a tiny UNet unless ``network_def`` is given (2 output classes, ``spatial_dims`` 2 or 3); ``loss``
    replaces the DiceCELoss (e.g. a deep-supervision loss); ``train_postprocessing=False`` drops the trainer's
    post-processing (for networks whose training output is a list or a stack of deep-supervision outputs).
    """
    import nibabel as nib
    from monai.data.synthetic import create_test_image_2d, create_test_image_3d

    for sub in ("imagesTr", "labelsTr"):
        (root / "data" / sub).mkdir(parents=True, exist_ok=True)
    for i in range(cases):
        img, seg = (create_test_image_3d if spatial_dims == 3 else create_test_image_2d)(
            *([size] * spatial_dims),
            num_objs=3,
            rad_max=8,
            noise_max=0.1,
            num_seg_classes=1,
            random_state=np.random.RandomState(i),
        )
        nib.save(
            nib.Nifti1Image(img.astype(np.float32), np.eye(4)), root / "data" / "imagesTr" / f"case{i}.nii.gz"
        )
        nib.save(
            nib.Nifti1Image(seg.astype(np.uint8), np.eye(4)), root / "data" / "labelsTr" / f"case{i}.nii.gz"
        )
    keys = ["image", "label"]
    cfg = _common(
        network_def
        or {
            "_target_": "UNet",
            "spatial_dims": spatial_dims,
            "in_channels": 1,
            "out_channels": 2,
            "channels": [4, 8, 16],
            "strides": [2, 2],
            "num_res_units": 1,
            "norm": "batch",
        }
    )
    cfg.update(
        {
            "images": "$list(sorted(glob.glob(@dataset_dir + '/imagesTr/*.nii.gz')))",
            "labels": "$list(sorted(glob.glob(@dataset_dir + '/labelsTr/*.nii.gz')))",
            "loss": loss or {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
            "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 0.01},
            "train": {
                "deterministic_transforms": [
                    {"_target_": "LoadImaged", "keys": keys},
                    {"_target_": "EnsureChannelFirstd", "keys": keys},
                    {"_target_": "Orientationd", "keys": keys, "axcodes": "RAS"[:spatial_dims]},
                    {
                        "_target_": "Spacingd",
                        "keys": keys,
                        "pixdim": [1.0] * spatial_dims,
                        "mode": ["bilinear", "nearest"],
                    },
                    {
                        "_target_": "ScaleIntensityRanged",
                        "keys": "image",
                        "a_min": 0,
                        "a_max": 1,
                        "b_min": 0,
                        "b_max": 1,
                        "clip": True,
                    },
                    {"_target_": "EnsureTyped", "keys": keys},
                ],
                "random_transforms": [
                    {
                        "_target_": "RandCropByPosNegLabeld",
                        "keys": keys,
                        "label_key": "label",
                        "spatial_size": [roi] * spatial_dims,
                        "pos": 1,
                        "neg": 1,
                        "num_samples": 2,
                        "image_key": "image",
                        "image_threshold": 0,
                    }
                ],
                "preprocessing": {
                    "_target_": "Compose",
                    "transforms": "$@train#deterministic_transforms + @train#random_transforms",
                },
                "dataset": {
                    "_target_": "CacheDataset",
                    "data": "$[{'image': i, 'label': l} for i, l in zip(@images[:-2], @labels[:-2])]",
                    "transform": "@train#preprocessing",
                    "cache_rate": 1.0,
                    "num_workers": 0,
                    "progress": False,
                },
                "dataloader": {
                    "_target_": "DataLoader",
                    "dataset": "@train#dataset",
                    "batch_size": 2,
                    "shuffle": True,
                    "num_workers": 0,
                },
                "inferer": {"_target_": "SimpleInferer"},
                "postprocessing": {
                    "_target_": "Compose",
                    "transforms": [
                        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                        {
                            "_target_": "AsDiscreted",
                            "keys": ["pred", "label"],
                            "argmax": [True, False],
                            "to_onehot": 2,
                        },
                    ],
                },
                "handlers": [
                    {
                        "_target_": "ValidationHandler",
                        "validator": "@validate#evaluator",
                        "epoch_level": True,
                        "interval": 1,
                    },
                    {
                        "_target_": "StatsHandler",
                        "tag_name": "train_loss",
                        "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
                    },
                ],
                "trainer": _trainer("@loss", "@train#postprocessing" if train_postprocessing else "$None"),
            },
            "validate": {
                "preprocessing": {"_target_": "Compose", "transforms": "%train#deterministic_transforms"},
                "dataset": {
                    "_target_": "CacheDataset",
                    "data": "$[{'image': i, 'label': l} for i, l in zip(@images[-2:], @labels[-2:])]",
                    "transform": "@validate#preprocessing",
                    "cache_rate": 1.0,
                    "progress": False,
                },
                "dataloader": {
                    "_target_": "DataLoader",
                    "dataset": "@validate#dataset",
                    "batch_size": 1,
                    "shuffle": False,
                    "num_workers": 0,
                },
                "inferer": {
                    "_target_": "SlidingWindowInferer",
                    "roi_size": [roi] * spatial_dims,
                    "sw_batch_size": 4,
                    "overlap": 0.25,
                },
                "postprocessing": "%train#postprocessing",
                "handlers": [{"_target_": "StatsHandler", "iteration_log": False}, _saver()],
                "key_metric": {
                    "val_mean_dice": {
                        "_target_": "MeanDice",
                        "include_background": False,
                        "output_transform": FROM_ENGINE,
                    }
                },
                "evaluator": _evaluator(),
            },
        }
    )
    return _write_configs(root, cfg, "tiny 3D UNet segmentation (synthetic NIfTI)")


def write_classification_bundle(root: Path, cases: int = 24, size: int = 32) -> Path:
    """A 2D classification bundle (PNG images, DenseNet, accuracy key metric) in the model-zoo layout."""
    from PIL import Image

    rng = np.random.RandomState(0)
    (root / "data").mkdir(parents=True, exist_ok=True)
    items = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(cases):
        label = i % 2
        cy, cx = rng.randint(8, size - 8, 2)
        shape = (
            (np.abs(yy - cy) < 5) & (np.abs(xx - cx) < 5) if label else (yy - cy) ** 2 + (xx - cx) ** 2 < 25
        )
        img = (shape * 200 + rng.rand(size, size) * 40).astype(np.uint8)
        Image.fromarray(img).save(root / "data" / f"img{i}.png")
        items.append({"image": f"img{i}.png", "label": label})
    (root / "data" / "datalist.json").write_text(json.dumps(items))
    cfg = _common(
        {
            "_target_": "DenseNet",
            "spatial_dims": 2,
            "in_channels": 1,
            "out_channels": 2,
            "init_features": 8,
            "growth_rate": 4,
            "block_config": [2, 2],
            "bn_size": 2,
        }
    )
    cfg["imports"].append("$import json")
    cfg.update(
        {
            "datalist": "$[{'image': os.path.join(@dataset_dir, d['image']), 'label': d['label']} for d in json.load(open(os.path.join(@dataset_dir, 'datalist.json')))]",
            "loss": {"_target_": "torch.nn.CrossEntropyLoss"},
            "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": 0.005},
            "train": {
                "preprocessing": {
                    "_target_": "Compose",
                    "transforms": [
                        {"_target_": "LoadImaged", "keys": "image", "reader": "PILReader"},
                        {"_target_": "EnsureChannelFirstd", "keys": "image"},
                        {"_target_": "ScaleIntensityd", "keys": "image"},
                        {"_target_": "RandFlipd", "keys": "image", "prob": 0.5, "spatial_axis": 0},
                        {
                            "_target_": "EnsureTyped",
                            "keys": "image",
                            "dtype": "$torch.float32",
                            "track_meta": False,
                        },
                    ],
                },
                "dataset": {
                    "_target_": "Dataset",
                    "data": "$@datalist[:16]",
                    "transform": "@train#preprocessing",
                },
                "dataloader": {
                    "_target_": "DataLoader",
                    "dataset": "@train#dataset",
                    "batch_size": 8,
                    "shuffle": True,
                    "num_workers": 0,
                },
                "inferer": {"_target_": "SimpleInferer"},
                "handlers": [
                    {
                        "_target_": "ValidationHandler",
                        "validator": "@validate#evaluator",
                        "epoch_level": True,
                        "interval": 1,
                    },
                    {
                        "_target_": "StatsHandler",
                        "tag_name": "train_loss",
                        "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
                    },
                ],
                "trainer": _trainer("@loss", "$None"),
            },
            "validate": {
                "preprocessing": {
                    "_target_": "Compose",
                    "transforms": [
                        {"_target_": "LoadImaged", "keys": "image", "reader": "PILReader"},
                        {"_target_": "EnsureChannelFirstd", "keys": "image"},
                        {"_target_": "ScaleIntensityd", "keys": "image"},
                        {
                            "_target_": "EnsureTyped",
                            "keys": "image",
                            "dtype": "$torch.float32",
                            "track_meta": False,
                        },
                    ],
                },
                "dataset": {
                    "_target_": "Dataset",
                    "data": "$@datalist[16:]",
                    "transform": "@validate#preprocessing",
                },
                "dataloader": {
                    "_target_": "DataLoader",
                    "dataset": "@validate#dataset",
                    "batch_size": 4,
                    "shuffle": False,
                    "num_workers": 0,
                },
                "inferer": {"_target_": "SimpleInferer"},
                "postprocessing": {
                    "_target_": "Compose",
                    "transforms": [
                        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                        {
                            "_target_": "AsDiscreted",
                            "keys": ["pred", "label"],
                            "argmax": [True, False],
                            "to_onehot": 2,
                        },
                    ],
                },
                "handlers": [{"_target_": "StatsHandler", "iteration_log": False}, _saver()],
                "key_metric": {
                    "val_accuracy": {"_target_": "ignite.metrics.Accuracy", "output_transform": FROM_ENGINE}
                },
                "evaluator": _evaluator(),
            },
        }
    )
    return _write_configs(root, cfg, "tiny 2D DenseNet classification (synthetic PNG)")


def _write_configs(root: Path, cfg: dict, name: str) -> Path:
    (root / "configs").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(exist_ok=True)
    (root / "configs" / "train.json").write_text(json.dumps(cfg, indent=2))
    meta = {"version": "0.1.0", "changelog": {"0.1.0": "test bundle"}, "monai_version": "1.6.1", "name": name}
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    return root


# ------------------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _shell(bundle: Path, command: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        command, shell=True, cwd=bundle, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{command}\nfailed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _train(bundle: Path) -> None:
    """The host's own ``run`` (one epoch), in this process."""
    from monai.bundle import run

    run(config_file=str(bundle / "configs" / "train.json"), bundle_root=str(bundle))
    assert (bundle / "models" / "model.pt").is_file(), "the host's CheckpointSaver wrote no models/model.pt"


def _prune_error(bundle: Path, configs: list[str], **overrides) -> BaseException:
    """Run the overlay's ``prune`` in this process; return the root cause of the failure it must raise."""
    from monai.bundle import run

    with pytest.raises(
        Exception
    ) as info:  # MONAI wraps expression errors: RuntimeError("Failed to evaluate ...")
        run("prune", config_file=[str(bundle / c) for c in configs], bundle_root=str(bundle), **overrides)
    err: BaseException = info.value
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def _fresh_network(bundle: Path) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser["bundle_root"] = str(bundle)
    return parser.get_parsed_content("network_def")


TINY = "--method taylor --ratio 0.3 --finetune_epochs 1 --calibration_batches 1 --latency_repeats 2"


def _check_pruned(bundle: Path, host_sha: str, input_shape: list[int]) -> dict:
    report = json.loads((bundle / "eval" / "prune_report.json").read_text())
    assert (bundle / "eval" / "prune_report.md").is_file()
    assert _sha(bundle / "models" / "model.pt") == host_sha, "the host's models/model.pt changed"
    assert report["host_checkpoint_sha256"] == host_sha
    assert report["method"] == "taylor" and report["ratio"] == pytest.approx(0.3)
    assert report["params_after"] < report["params_before"]
    assert report["params_removed"] == pytest.approx(0.3, abs=0.05)
    for key in ("metric_before", "metric_pruned", "metric_after"):
        assert np.isfinite(report[key]) and 0.0 <= report[key] <= 1.0, (key, report[key])
    assert report["relevance_input_shape"] == input_shape
    # the host's CheckpointSaver was redirected to models/pruned and saved the *pruned* network there
    saved = torch.load(bundle / "models" / "pruned" / "model.pt", map_location="cpu", weights_only=True)
    assert (
        sum(v.numel() for k, v in saved.items() if "running" not in k and "num_batches" not in k)
        == report["params_after"]
    )

    # a fresh process (the overlay's evaluate_pruned) reloads the pruned checkpoint and reproduces metric_after
    _shell(
        bundle,
        f"python -m monai.bundle run evaluate_pruned --config_file \"['configs/train.json','{overlay_path()}']\"",
    )
    evaluated = json.loads((bundle / "eval" / "prune_evaluate.json").read_text())
    assert evaluated["params"] == report["params_after"]
    assert evaluated["metric"] == pytest.approx(report["metric_after"], abs=1e-5)

    # and here: network_def + pruned checkpoint == the TorchScript export
    from monai_iaprune.bundle import load_network

    net = load_network(_fresh_network(bundle), bundle / "models" / "pruned" / "model_pruned.pt").eval()
    assert sum(p.numel() for p in net.parameters()) == report["params_after"]
    ts = torch.jit.load(str(bundle / "models" / "pruned" / "model_pruned.ts"))
    x = torch.rand(input_shape)
    with torch.no_grad():
        torch.testing.assert_close(ts(x), net(x), atol=1e-5, rtol=1e-4)
    return report


# ------------------------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg_bundle(tmp_path_factory) -> Path:
    bundle = write_segmentation_bundle(tmp_path_factory.mktemp("host") / "spleen_like")
    _train(bundle)
    return bundle


def test_prune_segmentation_bundle(seg_bundle):
    host_sha = _sha(seg_bundle / "models" / "model.pt")
    # the documented command: the overlay located with python -m monai_iaprune.overlay
    _shell(
        seg_bundle,
        "python -m monai.bundle run prune "
        "--config_file \"['configs/train.json','$(python -m monai_iaprune.overlay)']\" " + TINY,
    )
    report = _check_pruned(seg_bundle, host_sha, [1, 1, 16, 16, 16])  # a patch of the inferer's roi_size
    assert report["metric_name"] == "val_mean_dice" and report["patch_size"] == [16, 16, 16]
    assert report["patch_mode"] == "foreground"


def test_prune_classification_bundle(tmp_path):
    bundle = write_classification_bundle(tmp_path / "cls2d")
    _train(bundle)
    host_sha = _sha(bundle / "models" / "model.pt")
    assert main(["--copy", str(bundle / "configs")]) == 0  # the other way: copy the overlay into the bundle
    _shell(
        bundle,
        "python -m monai.bundle run prune --config_file \"['configs/train.json','configs/prune_overlay.json']\" "
        + TINY,
    )
    report = _check_pruned(bundle, host_sha, [1, 1, 32, 32])
    assert report["metric_name"] == "val_accuracy" and report["patch_size"] is None


# ------------------------------------------------------------------------------------------------------------------
# clear errors, nothing written
# ------------------------------------------------------------------------------------------------------------------
def _renamed_evaluator(bundle: Path) -> str:
    """A host config whose evaluator lives at ``validate#checker`` instead of ``validate#evaluator``."""
    text = (bundle / "configs" / "train.json").read_text().replace("validate#evaluator", "validate#checker")
    cfg = json.loads(text)
    cfg["validate"]["checker"] = cfg["validate"].pop("evaluator")
    (bundle / "configs" / "train_renamed.json").write_text(json.dumps(cfg))
    return "configs/train_renamed.json"


def test_missing_host_key_names_key_and_override(seg_bundle, tmp_path):
    from monai_iaprune.host_bundle import HostConfigError

    renamed = _renamed_evaluator(seg_bundle)
    out = tmp_path / "out"
    err = _prune_error(
        seg_bundle, [renamed, str(overlay_path())], ckpt_dir=str(out), prune_report_dir=str(out)
    )
    assert isinstance(err, HostConfigError), err
    assert "`validate#evaluator`" in str(err) and "--host_evaluator @" in str(err)
    assert not out.exists()
    # with the override the overlay finds everything
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(seg_bundle / renamed), str(overlay_path())])
    assert missing_host_keys(parser)  # still missing without the override
    parser["host_evaluator"] = "@validate#checker"
    assert missing_host_keys(parser) == []


def test_checkpoint_not_matching_network_def(seg_bundle, tmp_path):
    out = tmp_path / "out"
    sha = _sha(seg_bundle / "models" / "model.pt")
    overrides = {"network_def#channels": [8, 16, 32], "ckpt_dir": str(out), "prune_report_dir": str(out)}
    err = _prune_error(seg_bundle, ["configs/train.json", str(overlay_path())], method="taylor", **overrides)
    assert (
        isinstance(err, ValueError)
        and "does not match the architecture" in str(err)
        and "network_def" in str(err)
    )
    assert not (out / "model_pruned.pt").exists() and not (out / "prune_report.json").exists()
    assert _sha(seg_bundle / "models" / "model.pt") == sha


def test_refuses_saver_writing_into_host_checkpoint_folder(seg_bundle, tmp_path):
    sha = _sha(seg_bundle / "models" / "model.pt")
    err = _prune_error(
        seg_bundle,
        ["configs/train.json", str(overlay_path())],
        ckpt_dir=str(seg_bundle / "models"),
        pruned_checkpoint=str(tmp_path / "p.pt"),
        pruned_torchscript=str(tmp_path / "p.ts"),
        prune_report_dir=str(tmp_path),
        method="taylor",
    )
    assert isinstance(err, ValueError) and "CheckpointSaver" in str(err) and "ckpt_dir" in str(err), err
    assert _sha(seg_bundle / "models" / "model.pt") == sha
    assert not (tmp_path / "p.pt").exists()


def test_missing_host_checkpoint(tmp_path):
    bundle = write_segmentation_bundle(tmp_path / "untrained", cases=3)
    err = _prune_error(bundle, ["configs/train.json", str(overlay_path())], method="taylor")
    assert isinstance(err, FileNotFoundError) and "train the host bundle first" in str(err)


# ------------------------------------------------------------------------------------------------------------------
# units: patches, overlay command
# ------------------------------------------------------------------------------------------------------------------
def test_patch_output_transform_modes():
    image = torch.arange(2 * 8 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8, 8)
    label = torch.zeros(2, 1, 8, 8, 8)
    label[0, 0, 0:2, 0:2, 0:2] = 1  # foreground in a corner for sample 0, none for sample 1
    out = {"image": image, "label": label}
    img, lab = PatchOutputTransform([4, 4, 4], "center")(out)
    assert img.shape == (2, 1, 4, 4, 4) and lab.shape == (2, 1, 4, 4, 4)
    torch.testing.assert_close(img[0], image[0, :, 2:6, 2:6, 2:6])
    img, lab = PatchOutputTransform([4, 4, 4], "foreground")(out)
    torch.testing.assert_close(img[0], image[0, :, 0:4, 0:4, 0:4])  # clipped to the volume
    assert lab[0].sum() == 8 and lab[1].sum() == 0
    torch.testing.assert_close(img[1], image[1, :, 2:6, 2:6, 2:6])  # no foreground: centre
    img, _ = PatchOutputTransform([4, 4, 4], "sliding")(out)
    assert img.shape == (16, 1, 4, 4, 4)
    assert img.sum() == image.sum()  # the non-overlapping grid covers every voxel exactly once
    img, _ = PatchOutputTransform([4, 4, 4], "sliding", max_patches=3)(out)
    assert img.shape[0] == 6
    # one-hot labels (after AsDiscreted) and a roi larger than the image (zero padded, like the inferer)
    onehot = torch.cat([1 - label, label], 1)
    img, lab = PatchOutputTransform([4, 4, 4], "foreground")({"image": image, "label": onehot})
    torch.testing.assert_close(img[0], image[0, :, 0:4, 0:4, 0:4])
    img, _ = PatchOutputTransform([10, -1, 8], "center")(out)
    assert img.shape == (2, 1, 10, 8, 8) and img[:, :, 0].abs().sum() == 0
    with pytest.raises(ValueError, match="unknown patch_mode"):
        PatchOutputTransform(4, "random")


def test_overlay_command(tmp_path, capsys):
    assert main([]) == 0
    printed = capsys.readouterr().out.strip()
    assert Path(printed) == overlay_path() and json.loads(Path(printed).read_text())["prune"]
    target = copy_overlay(tmp_path / "configs")
    assert (
        target == tmp_path / "configs" / OVERLAY_NAME and target.read_bytes() == overlay_path().read_bytes()
    )
    with pytest.raises(FileExistsError, match="--overwrite"):
        copy_overlay(tmp_path / "configs")
    assert main(["--copy", str(tmp_path / "configs")]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert main(["--copy", str(tmp_path / "configs"), "--overwrite"]) == 0


def test_overlay_uses_only_model_zoo_keys():
    """Every host key the overlay reads is one of the model-zoo conventions (or a --host_* indirection)."""
    cfg = json.loads(overlay_path().read_text())
    from monai.bundle import ReferenceResolver

    refs = set()
    for value in json.dumps(cfg).split('"'):
        refs |= set(ReferenceResolver.match_refs_pattern(value))
    host_refs = {r.replace("::", "#") for r in refs} - set(cfg)
    assert host_refs <= {
        "bundle_root",
        "network",
        "train#trainer",
        "validate#evaluator",
        "validate#key_metric",
    }, host_refs
    assert "imports" not in cfg, "an overlay 'imports' would replace the host's imports"
