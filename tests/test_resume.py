"""Resume: a 3-stage bundle prune run killed with SIGKILL in stage 3 continues from stage 2 with --resume true."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from monai_iaprune.pruning.checkpoint import safe_load

BUNDLE = ROOT / "bundles" / "classification_2d"
TINY = ["--num_synthetic", "16", "--image_size", "16", "--batch_size", "8", "--epochs", "1"]
PRUNE = TINY + [
    "--stages", "3", "--stage_epochs", "1", "--finetune_epochs", "2", "--latency_repeats", "2",
    "--calibration_batches", "1", "--explain", "false", "--seed", "3",
]  # fmt: skip
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _cmd(run_id: str, configs: str) -> list[str]:
    return [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", configs]


PRUNE_CMD = _cmd("prune", "['configs/train.json','configs/prune.json']") + PRUNE


def _copy(dst: Path) -> Path:
    shutil.copytree(BUNDLE, dst, ignore=shutil.ignore_patterns("models", "eval", "data", "__pycache__"))
    return dst


def _shapes(path: Path) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in safe_load(path)["state_dict"].items()}


def _stages_in(resume: Path) -> int:
    try:
        return len(safe_load(resume)["pruning"]["history"])
    except (FileNotFoundError, ValueError, KeyError, EOFError, RuntimeError):
        return 0


@pytest.mark.timeout(200) if hasattr(pytest.mark, "timeout") else (lambda f: f)
def test_killed_run_resumes_to_the_same_architecture(tmp_path):
    a, b = _copy(tmp_path / "a"), _copy(tmp_path / "b")
    # the uninterrupted run and the one to kill run side by side; each trains models/model.pt first
    full = subprocess.Popen(
        PRUNE_CMD, cwd=a, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    killed = subprocess.Popen(PRUNE_CMD, cwd=b, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume = b / "models" / "resume.pt"
    t0 = time.time()
    while _stages_in(resume) < 2:  # stage 2's record is saved at the start of epoch 2; stage 3 runs after it
        assert killed.poll() is None, "the run ended before stage 2 was recorded"
        assert time.time() - t0 < 120
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (b / "eval" / "prune_report.json").exists() and not (b / "models" / "model_pruned.pt").exists()
    stages_at_kill = _stages_in(resume)

    _, err = full.communicate(timeout=150)
    assert full.returncode == 0, err[-3000:]
    proc = subprocess.run(
        PRUNE_CMD + ["--resume", "true"], cwd=b, env=ENV, capture_output=True, text=True, timeout=150
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from models/resume.pt: epoch {stages_at_kill - 1}" in proc.stdout
    assert not resume.exists() and not (b / "models" / ".monai_iaprune.lock").exists()

    # both runs trained models/model.pt themselves (train_if_missing, same seed): the same starting point
    ma, mb = safe_load(a / "models" / "model.pt"), safe_load(b / "models" / "model.pt")
    assert all(torch.equal(ma[k], mb[k]) for k in ma)
    report_a = json.loads((a / "eval" / "prune_report.json").read_text())
    report_b = json.loads((b / "eval" / "prune_report.json").read_text())
    assert report_b["per_layer"] == report_a["per_layer"]
    assert [h["params_after"] for h in report_b["stages_detail"]] == [
        h["params_after"] for h in report_a["stages_detail"]
    ]
    assert _shapes(b / "models" / "model_pruned.pt") == _shapes(a / "models" / "model_pruned.pt")
    wa = safe_load(a / "models" / "model_pruned.pt")["state_dict"]
    wb = safe_load(b / "models" / "model_pruned.pt")["state_dict"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5) for k in wa)  # same weights, too


def test_resume_without_resume_file_is_a_clear_error(tmp_path):
    b = _copy(tmp_path / "b")
    proc = subprocess.run(
        PRUNE_CMD + ["--resume", "true"], cwd=b, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0 and "no resume file" in proc.stderr
    assert not (b / "models" / "model.pt").exists()  # refused before training


# ------------------------------------------------------------------------------------------------------------------
# the handler alone, in process: a trainer that crashes in stage 3 and a new one that resumes
# ------------------------------------------------------------------------------------------------------------------
def _handler_run(
    resume_file: Path, resume: bool = False, crash_before_stage: int | None = None, scheduler: bool = False
):
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer
    from monai.handlers import LrScheduleHandler
    from test_handlers import tiny_resnet18

    from monai_iaprune.handlers import PruneResumeHandler, RelevancePruningHandler

    torch.manual_seed(0)
    net = tiny_resnet18()
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.randn(1, 16, 16, generator=g), "label": i % 3} for i in range(12)]
    loader = torch.utils.data.DataLoader(
        data, batch_size=4, shuffle=True
    )  # shuffling draws from the torch RNG
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    handler = RelevancePruningHandler(
        method="taylor", ratio=0.6, stages=3, prune_epochs=[0, 1, 2], max_batches=2
    )
    # a closed-form schedule of the epoch count: a scheduler restarted at epoch 0 gives another LR
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.5**e) if scheduler else None
    resumer = PruneResumeHandler(
        resume_file,
        handler,
        resume=resume,
        settings={"ratio": 0.6},
        lr_schedulers=[lr_scheduler] if scheduler else [],
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=4,
        train_data_loader=loader,
        network=net,
        optimizer=opt,
        loss_function=torch.nn.CrossEntropyLoss(),
        train_handlers=[LrScheduleHandler(lr_scheduler, print_lr=False)] if scheduler else None,
    )
    if crash_before_stage is not None:

        @trainer.on(Events.EPOCH_COMPLETED)
        def _crash(engine):
            if engine.state.epoch == handler.prune_epochs[crash_before_stage - 1]:
                raise KeyboardInterrupt("killed in stage 3")

    resumer.attach(trainer)
    handler.attach(trainer)
    if resume:
        trainer.state.epoch, trainer.state.iteration = resumer.trainer_state()
    trainer.run()
    return (net, handler, trainer.optimizer) if scheduler else (net, handler)


def test_handler_resume_matches_an_uninterrupted_run(tmp_path):
    full, full_handler = _handler_run(tmp_path / "a" / "resume.pt")
    resume = tmp_path / "b" / "resume.pt"
    with pytest.raises(KeyboardInterrupt):
        _handler_run(resume, crash_before_stage=3)
    assert len(safe_load(resume)["pruning"]["history"]) == 2
    resumed, handler = _handler_run(resume, resume=True)
    assert [h["params_after"] for h in handler.history] == [h["params_after"] for h in full_handler.history]
    assert {k: v.shape for k, v in resumed.state_dict().items()} == {
        k: v.shape for k, v in full.state_dict().items()
    }
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="other settings"):
        from monai_iaprune.handlers import PruneResumeHandler

        PruneResumeHandler(resume, handler, resume=True, settings={"ratio": 0.5})


def test_resume_continues_the_lr_schedule(tmp_path):
    """resume.pt holds the LR scheduler's state: the resumed run ends at the uninterrupted run's learning rate."""
    _, _, full_opt = _handler_run(tmp_path / "a" / "resume.pt", scheduler=True)
    resume = tmp_path / "b" / "resume.pt"
    with pytest.raises(KeyboardInterrupt):
        _handler_run(resume, crash_before_stage=3, scheduler=True)
    saved = safe_load(resume)
    assert saved["lr_schedulers"][0]["last_epoch"] == saved["epoch"] == 1  # saved when epoch 2 started
    _, _, resumed_opt = _handler_run(resume, resume=True, scheduler=True)
    expected = 1e-2 * 0.5**4  # four epochs of LambdaLR(0.5 ** epoch)
    assert full_opt.param_groups[0]["lr"] == pytest.approx(expected)
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(expected)


def test_resume_refuses_a_different_number_of_lr_schedulers(tmp_path):
    from monai_iaprune.handlers import PruneResumeHandler

    resume = tmp_path / "resume.pt"
    with pytest.raises(KeyboardInterrupt):
        _handler_run(resume, crash_before_stage=3, scheduler=True)
    with pytest.raises(ValueError, match="holds 1 LR scheduler state"):
        PruneResumeHandler(resume, None, resume=True, settings={"ratio": 0.6})
