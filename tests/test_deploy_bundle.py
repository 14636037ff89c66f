"""Deployment from a bundle: ONNX / torch.export next to TorchScript, inference.json and ckpt_export on a pruned model."""

from __future__ import annotations

import csv
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT

BUNDLE = ROOT / "bundles" / "classification_2d"
TINY = {"num_synthetic": 16, "image_size": 16, "batch_size": 8}
PRUNE = {"epochs": 1, "finetune_epochs": 1, "latency_repeats": 2, "calibration_batches": 1, "explain": False}


def _configs(b: Path, *names: str) -> list[str]:
    return [str(b / "configs" / n) for n in names]


def test_missing_onnx_packages_fail_before_any_work(tmp_path, monkeypatch):
    from monai.bundle import run

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "onnxscript" else real(n, *a))
    b = tmp_path / "b"
    shutil.copytree(BUNDLE, b, ignore=shutil.ignore_patterns("models", "eval"))
    with pytest.raises(Exception) as info:
        run(
            "prune",
            config_file=_configs(b, "train.json", "prune.json"),
            bundle_root=str(b),
            export_onnx="true",
        )
    chain, e = [], info.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("onnxscript is not installed" in m and "--export_onnx false" in m for m in chain), chain
    assert not (b / "models").exists()


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")),
    reason="needs the optional export packages",
)
def test_exports_inference_and_ckpt_export_on_pruned_model(tmp_path):
    from monai.bundle import ckpt_export, run

    b = tmp_path / "b"
    shutil.copytree(BUNDLE, b, ignore=shutil.ignore_patterns("models", "eval"))
    run(
        "prune",
        config_file=_configs(b, "train.json", "prune.json"),
        bundle_root=str(b),
        export_onnx="true",
        export_pt2=True,
        **TINY,
        **PRUNE,
    )
    models = b / "models"
    assert {p.name for p in models.iterdir()} == {
        "model.pt",
        "model_pruned.pt",
        "model_pruned.ts",
        "model_pruned.onnx",
        "model_pruned.pt2",
    }
    x = torch.rand(2, 1, 16, 16)
    ts = torch.jit.load(str(models / "model_pruned.ts"))
    pt2 = torch.export.load(str(models / "model_pruned.pt2")).module()
    torch.testing.assert_close(pt2(x), ts(x), atol=1e-4, rtol=1e-4)
    import onnxruntime

    sess = onnxruntime.InferenceSession(str(models / "model_pruned.onnx"), providers=["CPUExecutionProvider"])
    got = torch.as_tensor(sess.run(None, {"input": x.numpy()})[0])
    torch.testing.assert_close(got, ts(x), atol=1e-4, rtol=1e-4)

    # the README's inference command on the pruned checkpoint
    run(
        config_file=_configs(b, "train.json", "inference.json"),
        bundle_root=str(b),
        eval_checkpoint=str(models / "model_pruned.pt"),
        output_dir=str(b / "infer"),
        **TINY,
    )
    rows = list(csv.reader((b / "infer" / "predictions.csv").open()))
    assert len(rows) > 0 and all(r[1] in ("0.0", "1.0") for r in rows)

    # MONAI's ckpt_export with inference.json's network (load_network: the pruned structure, then the weights)
    ckpt_export(
        "network",
        filepath=str(b / "exported.ts"),
        ckpt_file=str(models / "model_pruned.pt"),
        key_in_ckpt="state_dict",
        meta_file=str(b / "configs" / "metadata.json"),
        config_file=_configs(b, "train.json", "inference.json"),
        bundle_root=str(b),
        eval_checkpoint=str(models / "model_pruned.pt"),
        use_trace=True,
        input_shape=[1, 1, 16, 16],
        **TINY,
    )
    exported = torch.jit.load(str(b / "exported.ts"))
    torch.testing.assert_close(exported(x), ts(x), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")), reason="needs onnx and onnxruntime"
)
def test_monai_onnx_export_command_on_a_pruned_checkpoint(tmp_path):
    """The README's ``python -m monai.bundle onnx_export`` command: inference.json's network is the pruned
    structure (load_network), MONAI loads the pruned weights into it and writes an ONNX file equal to eager."""
    import os
    import subprocess
    import sys

    import onnxruntime
    from monai.networks.nets import DenseNet

    from monai_iaprune import channel_relevance, prune
    from monai_iaprune.pruning.checkpoint import save_pruned

    b = tmp_path / "b"
    shutil.copytree(BUNDLE, b, ignore=shutil.ignore_patterns("models", "eval"))
    (b / "models").mkdir()
    net = DenseNet(2, 1, 2, init_features=16, growth_rate=8, block_config=(2, 4, 4), bn_size=2)  # train.json
    prune(net, channel_relevance(net, None, "magnitude"), 0.5, example_inputs=torch.randn(1, 1, 16, 16))
    save_pruned(net.eval(), b / "models" / "model_pruned.pt")
    cmd = [sys.executable, "-m", "monai.bundle", "onnx_export", "network", "--filepath", "models/model_pruned.onnx",
           "--ckpt_file", "models/model_pruned.pt", "--key_in_ckpt", "state_dict",
           "--meta_file", "configs/metadata.json",
           "--config_file", "['configs/train.json','configs/inference.json']",
           "--eval_checkpoint", "models/model_pruned.pt", "--use_trace", "true", "--input_shape", "[1, 1, 16, 16]",
           "--image_size", "16"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=b, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    x = torch.rand(1, 1, 16, 16)
    sess = onnxruntime.InferenceSession(
        str(b / "models" / "model_pruned.onnx"), providers=["CPUExecutionProvider"]
    )
    got = torch.as_tensor(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, net(x), atol=1e-4, rtol=1e-4)
