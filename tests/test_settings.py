"""Strict settings on every path: booleans from the command line (``--overwrite false`` arrives as a string),
ratios, counts; and a new relevance criterion (one ``register_method`` call) runs through a bundle's prune."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from monai_iaprune.utils.settings import as_bool, check_int, check_ratio

BUNDLE = ROOT / "bundles" / "classification_2d"
TINY = {
    "num_synthetic": 16,
    "image_size": 16,
    "batch_size": 8,
    "epochs": 1,
    "finetune_epochs": 1,
    "latency_repeats": 2,
}


@pytest.mark.parametrize(
    ("value", "expected"),
    [(True, True), (False, False), (1, True), (0, False), ("true", True), ("FALSE", False), ("Yes", True),
     ("no", False), ("1", True), ("0", False), (" False ", False)],
)  # fmt: skip
def test_as_bool_accepts(value, expected):
    assert as_bool(value, "overwrite") is expected


@pytest.mark.parametrize("value", ["maybe", "", "2", 2, None, 0.5, "off"])
def test_as_bool_refuses_naming_the_setting(value):
    with pytest.raises(ValueError, match=r"bad overwrite .*true or false"):
        as_bool(value, "overwrite")


def test_numeric_checks():
    assert check_ratio(0.3) == 0.3 and check_int(None, "relevance_batches", allow_none=True) is None
    for bad in (0, 1, 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="bad ratio"):
            check_ratio(bad)
    with pytest.raises(ValueError, match="bad calibration_batches 0"):
        check_int(0, "calibration_batches")


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "classification_2d"
    shutil.copytree(BUNDLE, dst, ignore=shutil.ignore_patterns("models", "eval", "data", "__pycache__"))
    return dst


def _chain(exc: BaseException | None) -> str:
    msgs = []
    while exc is not None:
        msgs.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(msgs)


def test_bundle_command_line_overwrite_false_keeps_the_pruned_checkpoint(tmp_path):
    b = _copy(tmp_path)
    (b / "models").mkdir()
    (b / "models" / "model_pruned.pt").write_bytes(b"keep me")
    cmd = [sys.executable, "-m", "monai.bundle", "run", "prune", "--config_file",
           "['configs/train.json','configs/prune.json']", "--overwrite", "false", "--method", "taylor"]  # fmt: skip
    for k, v in TINY.items():
        cmd += [f"--{k}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=b, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "refusing to overwrite" in proc.stderr and "model_pruned.pt" in proc.stderr, proc.stderr[-3000:]
    assert (b / "models" / "model_pruned.pt").read_bytes() == b"keep me"
    assert not (b / "models" / "model.pt").exists() and not (b / "eval").exists()


def test_bundle_overwrite_maybe_names_the_setting(tmp_path):
    from monai.bundle import run

    b = _copy(tmp_path)
    with pytest.raises(Exception) as info:
        run("prune", config_file=[str(b / "configs" / c) for c in ("train.json", "prune.json")],
            bundle_root=str(b), overwrite="maybe", method="taylor", **TINY)  # fmt: skip
    assert "bad overwrite 'maybe'" in _chain(info.value), _chain(info.value)[-2000:]
    assert not (b / "models").exists() and not (b / "eval").exists()


def test_overlay_overwrite_false_keeps_the_pruned_checkpoint(tmp_path):
    from monai.bundle import run
    from test_host_bundle import write_classification_bundle

    from monai_iaprune.overlay import overlay_path

    b = write_classification_bundle(tmp_path / "host", cases=12)
    (b / "models" / "model.pt").write_bytes(b"host weights")  # only read after the output checks
    (b / "models" / "pruned").mkdir()
    (b / "models" / "pruned" / "model_pruned.pt").write_bytes(b"keep me")
    with pytest.raises(Exception) as info:
        run("prune", config_file=[str(b / "configs" / "train.json"), str(overlay_path())], bundle_root=str(b),
            overwrite="false", method="taylor")  # fmt: skip
    assert "refusing to overwrite" in _chain(info.value), _chain(info.value)[-2000:]
    assert (b / "models" / "pruned" / "model_pruned.pt").read_bytes() == b"keep me"
    assert (b / "models" / "model.pt").read_bytes() == b"host weights"


def test_a_registered_criterion_runs_through_the_bundle(tmp_path):
    """A new criterion is one function and one ``register_method`` call; ``--explain false`` skips explanations."""
    from monai.bundle import run

    from monai_iaprune import register_method
    from monai_iaprune.relevance import unregister_method

    @register_method("toy")
    def toy(model, inputs, select, layers, **_):
        """Mean |activation| per channel and sample."""
        out = {}
        hooks = [
            m.register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o)) for n, m in layers.items()
        ]
        try:
            with torch.no_grad():
                model(inputs)
        finally:
            for h in hooks:
                h.remove()
        return {n: o.abs().reshape(o.shape[0], o.shape[1], -1).mean(2) for n, o in out.items()}

    b = _copy(tmp_path)
    try:
        run("prune", config_file=[str(b / "configs" / c) for c in ("train.json", "prune.json")],
            bundle_root=str(b), method="toy", ratio=0.3, explain="false", **TINY)  # fmt: skip
    finally:
        unregister_method("toy")
    report = json.loads((b / "eval" / "prune_report.json").read_text())
    assert report["method"] == "toy" and report["params_after"] < report["params_before"]
    assert "expl_spearman" not in report and "explanations_heatmaps.png" not in " ".join(report["figures"])
    assert (b / "models" / "model_pruned.pt").is_file()
