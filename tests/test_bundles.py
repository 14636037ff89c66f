"""The three model-zoo bundles: prune runs end to end, metadata, verify_net_in_out, and bad-input errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

BUNDLES = ROOT / "bundles"
NAMES = ("classification_2d", "classification_3d", "segmentation_3d")
CONFIGS = "['configs/train.json','configs/prune.json']"
COMMON = ["--epochs", "1", "--finetune_epochs", "1", "--latency_repeats", "2", "--calibration_batches", "1"]
TINY = {
    "classification_2d": ["--num_synthetic", "16", "--image_size", "16", "--batch_size", "8"],
    "classification_3d": ["--num_synthetic", "8", "--image_size", "12", "--batch_size", "4"],
    "segmentation_3d": ["--num_synthetic", "4", "--image_size", "16", "--batch_size", "2"],
}
TINY_KW = {
    name: {k[2:]: int(v) for k, v in zip(args[::2], args[1::2])}
    | {"epochs": 1, "finetune_epochs": 1, "latency_repeats": 2}
    for name, args in TINY.items()
}


def _copy(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copytree(
        BUNDLES / name, dst, ignore=shutil.ignore_patterns("models", "eval", "data", "__pycache__")
    )
    return dst


def _chain(exc: BaseException) -> str:
    msgs = []
    while exc is not None:
        msgs.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(msgs)


def _run_inprocess(bundle: Path, run_id: str, configs: list[str], **overrides):
    from monai.bundle import run

    return run(
        run_id,
        config_file=[str(bundle / "configs" / c) for c in configs],
        bundle_root=str(bundle),
        **overrides,
    )


# ------------------------------------------------------------------------------------------------------------------
# metadata (MONAI's verify_metadata downloads its schema; its required fields are checked here instead)
# ------------------------------------------------------------------------------------------------------------------
REQUIRED_META = (
    "version",
    "changelog",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "name",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)
REQUIRED_IO = (
    "type",
    "format",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
)


@pytest.mark.parametrize("name", NAMES)
def test_metadata_has_schema_required_fields(name):
    meta = json.loads((BUNDLES / name / "configs" / "metadata.json").read_text())
    missing = [k for k in REQUIRED_META if k not in meta]
    assert not missing, f"{name} metadata misses {missing}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"]) and meta["version"] in meta["changelog"]
    assert meta["schema"].startswith("https://") and meta["schema"].endswith(".json")
    for side, key in (("inputs", "image"), ("outputs", "pred")):
        io = meta["network_data_format"][side][key]
        assert not [k for k in REQUIRED_IO if k not in io], f"{name} {side}.{key} misses fields"
        assert len(io["channel_def"]) == io["num_channels"]
    for f in ("train.json", "prune.json", "evaluate.json", "inference.json", "logging.conf"):
        assert (BUNDLES / name / "configs" / f).is_file()
    readme = (BUNDLES / name / "docs" / "README.md").read_text()
    assert "python -m monai.bundle run prune --config_file" in readme


@pytest.mark.parametrize("name", NAMES)
def test_verify_net_in_out(name, tmp_path):
    from monai.bundle import verify_net_in_out

    b = _copy(tmp_path, name)
    kw = dict(
        meta_file=str(b / "configs/metadata.json"),
        config_file=str(b / "configs/train.json"),
        device="cpu",
        bundle_root=str(b),
    )
    verify_net_in_out("network_def", **kw)
    # the check is real: a wrong output channel count in the metadata is caught
    with pytest.raises(ValueError, match="output channel number"):
        verify_net_in_out("network_def", **kw, **{"_meta_#network_data_format#outputs#pred#num_channels": 3})


# ------------------------------------------------------------------------------------------------------------------
# end-to-end prune runs, one subprocess per bundle, exactly as the README runs them
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "method", "ratio"),
    [
        ("classification_2d", "lrp", 0.4),
        ("classification_3d", "taylor", 0.5),
        ("segmentation_3d", "taylor", 0.5),
    ],
)
def test_bundle_prune_run(name, method, ratio, tmp_path):
    b = _copy(tmp_path, name)
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "prune",
        "--config_file",
        CONFIGS,
        "--method",
        method,
        "--ratio",
        str(ratio),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        cmd + COMMON + TINY[name], cwd=b, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((b / "eval" / "prune_report.json").read_text())
    assert report["method"] == method and report["ratio"] == ratio
    assert report["params_after"] < report["params_before"]
    assert abs(report["params_removed"] - ratio) < 0.05
    assert abs(1 - report["params_after"] / report["params_before"] - report["params_removed"]) < 1e-9
    assert report["macs_after"] < report["macs_before"]
    for k in ("metric_before", "metric_pruned", "metric_after"):
        assert 0.0 <= report[k] <= 1.0, k
    assert report["latency_ms_before"] > 0 and report["latency_ms_after"] > 0
    assert report["latency"]["batch_size"] == 1 and report["latency"]["device"] == "cpu"
    layers = report["per_layer"]
    assert any(p["channels_after"] < p["channels_before"] for p in layers)
    assert all(p["channels_after"] <= p["channels_before"] for p in layers)
    assert {"pretrain", "relevance", "prune", "finetune", "evaluate_after"} <= set(report["timings_s"])
    assert report["versions"]["monai"] and report["versions"]["torch"]
    md = (b / "eval" / "prune_report.md").read_text()
    assert method in md and f"{report['params_after']:,}" in md
    # the default run compares explanations (IG) and links every figure from the Markdown, relative to it
    assert -1.0 <= report["expl_spearman"] <= 1.0 and 0.0 <= report["expl_top10_iou"] <= 1.0
    for k in ("deletion_auc_base", "deletion_auc_pruned", "insertion_auc_base", "insertion_auc_pruned"):
        assert 0.0 <= report[k] <= 1.0, k
    assert "figures_error" not in report, report.get("figures_error")
    assert {
        "figures/channels_per_layer.png",
        "figures/relevance_distribution.png",
        "figures/explanations_heatmaps.png",
        "figures/explanations_deletion_insertion.png",
    } <= set(report["figures"])
    for f in report["figures"]:
        assert (b / "eval" / f).stat().st_size > 1000, f
        assert f"]({f})" in md, f
    for f in ("model.pt", "model_pruned.pt", "model_pruned.ts"):
        assert (b / "models" / f).is_file(), f
    # the pruned checkpoint reloads in a fresh parse of the bundle and reproduces metric_after exactly
    key = report["metric_name"]
    evaluator_metrics = _evaluate(b, name, "models/model_pruned.pt")
    assert evaluator_metrics[key] == pytest.approx(report["metric_after"], abs=1e-6)
    ts = torch.jit.load(str(b / "models" / "model_pruned.ts"))
    assert sum(p.numel() for p in ts.parameters()) == report["params_after"]


def _evaluate(b: Path, name: str, ckpt: str) -> dict:
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(b / "configs/train.json"), str(b / "configs/evaluate.json")],
        workflow_type="eval",
        bundle_root=str(b),
        eval_checkpoint=str(b / ckpt),
        **{k: v for k, v in TINY_KW[name].items()},
    )
    wf.initialize()
    evaluator = wf.parser.get_parsed_content("evaluator")
    evaluator.run()
    return dict(evaluator.state.metrics)


# ------------------------------------------------------------------------------------------------------------------
# bad input: a clear error, nothing written or overwritten
# ------------------------------------------------------------------------------------------------------------------
def _expect_error(
    b: Path, pattern: str, configs=("train.json", "prune.json"), run_id: str = "prune", **overrides
) -> None:
    before = {p: p.read_bytes() for p in b.rglob("*") if p.is_file()}
    with pytest.raises(Exception) as info:
        _run_inprocess(b, run_id, list(configs), **(TINY_KW["classification_2d"] | overrides))
    assert re.search(pattern, _chain(info.value)), _chain(info.value)[-2000:]
    after = {p: p.read_bytes() for p in b.rglob("*") if p.is_file()}
    assert after == before, "a failed run wrote or changed files"


def test_bad_method_and_ratio(tmp_path):
    b = _copy(tmp_path, "classification_2d")
    _expect_error(b, r"unknown method 'bogus'; available relevance methods: \[.*'lrp'", method="bogus")
    _expect_error(b, r"bad ratio 1\.5", ratio=1.5)
    _expect_error(b, r"bad ratio 0", ratio=0)
    _expect_error(b, r"bad stages 0", stages=0)


def test_missing_dataset_dir(tmp_path):
    b = _copy(tmp_path, "classification_3d")
    _expect_error(b, "dataset_dir does not exist: .*nowhere", dataset_dir=str(tmp_path / "nowhere"))


def test_datalist_naming_missing_files(tmp_path):
    b = _copy(tmp_path, "segmentation_3d")
    dl = tmp_path / "datalist.json"
    dl.write_text(
        json.dumps({"training": [{"image": "a.nii.gz", "label": "a_seg.nii.gz"}] * 2, "validation": []})
    )
    _expect_error(b, r"names 2 missing file\(s\)", dataset_dir=str(dl), method="taylor")


def test_wrong_architecture_checkpoint_and_no_overwrite(tmp_path):
    b = _copy(tmp_path, "classification_2d")
    (b / "models").mkdir()
    torch.save(torch.nn.Conv2d(1, 4, 3).state_dict(), b / "models" / "model.pt")
    _expect_error(b, r"checkpoint .*model\.pt does not match the architecture of DenseNet", method="taylor")
    assert not (b / "eval").exists() and not (b / "models" / "model_pruned.pt").exists()
    # an existing pruned model is never replaced silently
    (b / "models" / "model.pt").unlink()
    (b / "models" / "model_pruned.pt").write_bytes(b"keep me")
    _expect_error(b, r"refusing to overwrite .*model_pruned\.pt.*--overwrite true", method="taylor")
    # the training run refuses to replace models/model.pt
    (b / "models" / "model.pt").write_bytes(b"keep me too")
    _expect_error(b, r"refusing to overwrite .*model\.pt", configs=("train.json",), run_id="train")


def test_class_folder_with_more_classes_than_num_classes_stops_before_training(tmp_path):
    """Issue #13: a 3-class folder with num_classes 2 stopped mid-epoch (IndexError in the loss)."""
    from PIL import Image

    root = tmp_path / "folders"
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray((torch.rand(16, 16) * 255).byte().numpy()).save(root / split / c / f"{i}.png")
    b = _copy(tmp_path, "classification_2d")
    _expect_error(b, r"--num_classes 3", dataset_dir=str(root))
    assert not (b / "models").exists()  # nothing trained


def test_segmentation_label_of_another_grid_is_refused_naming_the_file(tmp_path):
    """Issue #13: a label of another spatial size than its image was resampled and trained on with no warning."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    items = []
    for i in range(2):
        img, lab = tmp_path / f"img{i}.nii.gz", tmp_path / f"lab{i}.nii.gz"
        nib.save(nib.Nifti1Image(rng.random((20, 20, 20)).astype(np.float32), np.eye(4)), img)
        shape = (20, 20, 20) if i == 0 else (16, 20, 20)  # the second label is on another grid
        nib.save(nib.Nifti1Image((rng.random(shape) > 0.5).astype(np.uint8), np.eye(4)), lab)
        items.append({"image": str(img), "label": str(lab)})
    dl = tmp_path / "datalist.json"
    dl.write_text(json.dumps({"training": items, "validation": items}))
    b = _copy(tmp_path, "segmentation_3d")
    _expect_error(b, r"different spatial shapes.*lab1\.nii\.gz", dataset_dir=str(dl), method="taylor")
    assert not (b / "models").exists()
