"""The multi-GPU prune overlay: `torchrun --nproc_per_node=2 -m monai.bundle run prune` on CPU (gloo).

NCCL / GPUs are not exercised here; the overlay picks gloo when no GPU is available.
"""

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

BUNDLES = ROOT / "bundles"
NAMES = ("classification_2d", "classification_3d", "segmentation_3d")
CONFIGS = "['configs/train.json','configs/prune.json','configs/multi_gpu_prune.json']"
TINY_2D = [
    "--epochs", "1", "--finetune_epochs", "1", "--latency_repeats", "2", "--calibration_batches", "1",
    "--num_synthetic", "16", "--image_size", "16", "--batch_size", "4",
]  # fmt: skip


def _launcher_free_env() -> dict[str, str]:
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    return env


def _rank_logs(log_dir: Path) -> dict[int, str]:
    """torchrun --log-dir --redirects 3 writes <log_dir>/<run id>/attempt_0/<rank>/{stdout,stderr}.log."""
    logs: dict[int, str] = {}
    for f in log_dir.rglob("*.log"):
        if f.parent.name.isdigit():
            logs[int(f.parent.name)] = logs.get(int(f.parent.name), "") + f.read_text(errors="replace")
    return logs


def test_two_process_prune_bundle_writes_the_report_once(tmp_path: Path):
    bundle = tmp_path / "classification_2d"
    shutil.copytree(
        BUNDLES / "classification_2d",
        bundle,
        ignore=shutil.ignore_patterns("models", "eval", "data", "__pycache__"),
    )
    log_dir = tmp_path / "logs"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "--log-dir", str(log_dir), "--redirects", "3",
        "-m", "monai.bundle", "run", "prune", "--config_file", CONFIGS,
        *TINY_2D, "--log_level_other_ranks", "INFO",  # rank 1 logs too, so its silence about writing is visible
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=bundle, env=_launcher_free_env(), capture_output=True, text=True, timeout=280
    )
    logs = _rank_logs(log_dir)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stderr[-3000:]}\n" + "\n".join(
        f"--- rank {r}\n{t[-3000:]}" for r, t in sorted(logs.items())
    )
    assert sorted(logs) == [0, 1]

    # both ranks pre-trained under DDP, pruned the same network and fine-tuned; only rank 0 wrote anything
    for r in (0, 1):
        assert "pruning stage 1/1" in logs[r], f"rank {r} did not prune"
    stage = [
        line.split("pruning stage 1/1", 1)[1]
        for r in (0, 1)
        for line in logs[r].splitlines()
        if "pruning stage 1/1" in line
    ]
    # the same params / MACs on both ranks
    assert stage[0].split("; relevance")[0] == stage[1].split("; relevance")[0]
    assert logs[0].count("wrote ") == 1 and "prune_report.json" in logs[0]
    assert "wrote " not in logs[1]

    report = json.loads((bundle / "eval" / "prune_report.json").read_text())
    assert report["world_size"] == 2
    assert report["params_after"] < report["params_before"]
    # models/model.pt did not exist: trained under DDP, saved by rank 0
    assert "pretrain" in report["timings_s"]
    assert sorted(p.name for p in (bundle / "eval").iterdir()) == [
        "figures",
        "prune_report.json",
        "prune_report.md",
    ]
    # rank 0 alone drew the figures the report links
    assert sorted(p.suffix for p in (bundle / "eval" / "figures").iterdir()) == [".png"] * len(
        report["figures"]
    )
    assert sorted(p.name for p in (bundle / "models").iterdir()) == [
        "model.pt",
        "model_pruned.pt",
        "model_pruned.ts",
    ]

    from monai.networks.nets import DenseNet

    from monai_iaprune.bundle import load_network

    fresh = DenseNet(2, 1, 2, init_features=16, growth_rate=8, block_config=(2, 4, 4), bn_size=2)
    pruned = load_network(fresh, bundle / "models" / "model_pruned.pt")
    assert sum(p.numel() for p in pruned.parameters()) == report["params_after"]
    assert pruned.eval()(torch.rand(2, 1, 16, 16)).shape == (2, 2)
    plain = torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True)
    # the unwrapped network was saved, not the DDP wrapper
    assert not any(k.startswith("module.") for k in plain)


def test_overlay_outside_a_launcher_says_how_to_start_it(tmp_path: Path, monkeypatch):
    from monai.bundle import run

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    bundle = BUNDLES / "classification_2d"
    configs = [str(bundle / "configs" / c) for c in ("train.json", "prune.json", "multi_gpu_prune.json")]
    with pytest.raises(Exception) as info:
        run("prune", config_file=configs, bundle_root=str(tmp_path))
    chain, exc = [], info.value
    while exc is not None:
        chain.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert any("torchrun --nproc_per_node" in m for m in chain), chain
    assert not (tmp_path / "models").exists() and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("name", NAMES)
def test_overlay_mirrors_the_single_process_prune_steps(name):
    """Single- and multi-process runs execute the generic overlay's one "prune" list (drift guard): no bundle
    config repeats its steps, and the multi-GPU file only wires DDP (wrapper, samplers, process group)."""
    single = json.loads((BUNDLES / name / "configs" / "prune.json").read_text())
    multi = json.loads((BUNDLES / name / "configs" / "multi_gpu_prune.json").read_text())
    assert "prune" not in single and "prune" not in multi
    assert single["initialize"][0] == "$monai_iaprune.overlay.include_overlay()"
    assert any("init_distributed" in step for step in multi["+initialize"])
    assert multi["train#trainer#network"] == "@ddp_network"
