"""A prune run's outputs as one transaction: output-folder locks, writability first, temporary names, stale temps."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from monai_iaprune.utils.outputs import (
    LOCK_NAME,
    OutputTransaction,
    acquire_lock,
    check_folder_writable,
)

BUNDLE = ROOT / "bundles" / "classification_2d"
TINY = {
    "num_synthetic": 16,
    "image_size": 16,
    "batch_size": 8,
    "epochs": 1,
    "finetune_epochs": 1,
    "latency_repeats": 2,
    "calibration_batches": 1,
    "explain": False,
}


def _copy(tmp_path: Path) -> Path:
    dst = tmp_path / "classification_2d"
    shutil.copytree(BUNDLE, dst, ignore=shutil.ignore_patterns("models", "eval", "data", "__pycache__"))
    return dst


def _run(bundle: Path, **overrides):
    from monai.bundle import run

    configs = [str(bundle / "configs" / c) for c in ("train.json", "prune.json")]
    return run("prune", config_file=configs, bundle_root=str(bundle), **{**TINY, **overrides})


def _chain(exc: BaseException) -> str:
    msgs = []
    while exc is not None:
        msgs.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return "\n".join(msgs)


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


# ------------------------------------------------------------------------------------------------------------------
# the transaction itself
# ------------------------------------------------------------------------------------------------------------------
def test_transaction_commits_together_and_cleans(tmp_path):
    a, b = tmp_path / "m" / "a.pt", tmp_path / "r" / "b.json"
    stale = tmp_path / "m" / ".a.pt.123.deadbeef.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"partial")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / ".scratch.1.abc.tmp").mkdir()
    with OutputTransaction([a, b]) as tx:
        assert not stale.exists() and not (tmp_path / "r" / ".scratch.1.abc.tmp").exists()
        assert (tmp_path / "m" / LOCK_NAME).exists() and (tmp_path / "r" / LOCK_NAME).exists()
        tx.temp(a).write_bytes(b"a")
        tx.temp(b, tx.scratch(b.parent) / "b.json").write_text("{}")
        assert not a.exists() and not b.exists()
        tx.commit()
    assert a.read_bytes() == b"a" and b.read_text() == "{}"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["a.pt"]
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["b.json"]
    with pytest.raises(FileExistsError, match="b.json"):
        OutputTransaction([tmp_path / "m" / "new.pt", b]).begin()
    assert not (tmp_path / "m" / LOCK_NAME).exists()  # a refusal releases the locks


_KILLED_COMMIT = """
import os, signal, sys
from pathlib import Path
from monai_iaprune.utils import outputs
root = Path(sys.argv[1])
outs = [root / "models" / "model_pruned.pt", root / "models" / "model_pruned.ts", root / "eval" / "prune_report.json"]
tx = outputs.OutputTransaction(outs, overwrite=True).begin()
for i, p in enumerate(outs):
    tx.temp(p).write_text(f"new {i}")
real = os.replace
def die(src, dst):
    real(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = die
tx.commit()
"""


def test_a_commit_killed_between_renames_is_completed_by_the_next_run(tmp_path):
    """SIGKILL after the first of three renames: the next transaction on those folders rolls the journaled commit
    forward (every output of the killed run in place, no journal or temporary file left), then refuses to replace
    them as usual; a user file among the outputs was the killed run's to replace (it ran with overwrite)."""
    outs = [tmp_path / "models" / "model_pruned.pt", tmp_path / "models" / "model_pruned.ts",
            tmp_path / "eval" / "prune_report.json"]  # fmt: skip
    outs[2].parent.mkdir(parents=True)
    outs[2].write_text("old report")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_COMMIT, str(tmp_path)], cwd=ROOT, capture_output=True
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    # half done: the checkpoint is new, the TorchScript file missing, the report the old one
    assert outs[0].read_text() == "new 0" and not outs[1].exists() and outs[2].read_text() == "old report"
    assert len(list((tmp_path / "models").glob(".monai_iaprune.commit.*.json"))) == 1
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        OutputTransaction(outs).begin()
    assert [p.read_text() for p in outs] == ["new 0", "new 1", "new 2"]
    left = sorted(p.name for d in ("models", "eval") for p in (tmp_path / d).iterdir())
    assert left == ["model_pruned.pt", "model_pruned.ts", "prune_report.json"]


def test_an_unreadable_journal_is_dropped_with_its_temporaries(tmp_path):
    """Killed while writing the journal (before any rename): nothing is put in place, the temporaries go."""
    out = tmp_path / "a.pt"
    out.write_text("user")
    (tmp_path / ".monai_iaprune.commit.1.abc.json").write_text('{"renames": [["')
    (tmp_path / ".a.pt.1.abc.tmp").write_text("half")
    with OutputTransaction([tmp_path / "b.pt"]) as tx:
        tx.temp(tmp_path / "b.pt").write_text("b")
        tx.commit()
    assert out.read_text() == "user" and sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]


def test_transaction_error_leaves_nothing(tmp_path):
    a = tmp_path / "a.pt"
    with pytest.raises(RuntimeError, match="boom"), OutputTransaction([a]) as tx:
        tx.temp(a).write_bytes(b"x")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_stale_lock_of_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(f'{{"pid": {dead.pid}, "host": "{os.uname().nodename}", "start": 0}}')
    with caplog.at_level("WARNING"):
        path = acquire_lock(tmp_path)
    assert str(os.getpid()) in path.read_text() and "stale lock" in caplog.text


def test_unwritable_folder_fails_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        check_folder_writable(blocker / "eval")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip(
                "running as root: chmod does not make a folder unwritable (the path-under-a-file case ran)"
            )
        with pytest.raises(PermissionError, match="not writable"):
            check_folder_writable(ro)
    finally:
        ro.chmod(0o700)


def test_save_pruned_model_failing_export_leaves_nothing(tmp_path, monkeypatch):
    import monai_iaprune.pruning.checkpoint as ckpt
    from monai_iaprune.bundle import save_pruned_model

    written = []

    def failing_export(model, path, *args, **kwargs):
        written.append(sorted(p.name for p in tmp_path.iterdir()))  # the checkpoint's temporary file is there
        raise RuntimeError("killed during the export")

    monkeypatch.setattr(ckpt, "export_torchscript", failing_export)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
    with pytest.raises(RuntimeError, match="killed"):
        save_pruned_model(net, tmp_path / "m.pt", tmp_path / "m.ts", torch.rand(1, 1, 8, 8))
    assert any(n.startswith(".m.pt.") and n.endswith(".tmp") for n in written[0])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------------------
# bundle runs
# ------------------------------------------------------------------------------------------------------------------
def test_second_run_fails_at_once_naming_the_first(tmp_path):
    b = _copy(tmp_path)
    (b / "models").mkdir()
    (b / "models" / "model_pruned.pt.partial").write_bytes(b"first run's work")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from monai_iaprune.utils.outputs import acquire_lock;"
            f"acquire_lock({str(b / 'models')!r});"
            "print('locked', flush=True); time.sleep(60)",
        ],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _tree(b / "models")
        t0 = time.perf_counter()
        with pytest.raises(Exception) as info:
            _run(b)
        assert time.perf_counter() - t0 < 10
        msg = _chain(info.value)
        assert (
            "OutputLockedError" in msg and f"pid {holder.pid}" in msg and str(b / "models" / LOCK_NAME) in msg
        )
        assert _tree(b / "models") == before  # nothing trained, written or removed
        assert not (b / "eval").exists() or not any((b / "eval").iterdir())
    finally:
        holder.kill()
        holder.wait()


def test_unwritable_report_folder_fails_before_training(tmp_path):
    b = _copy(tmp_path)
    (tmp_path / "blocker").write_text("a file, not a folder")
    with pytest.raises(Exception) as info:
        _run(b, prune_report_dir=str(tmp_path / "blocker" / "eval"))
    assert "not writable" in _chain(info.value)
    assert not (b / "models" / "model.pt").exists()  # failed before train_if_missing trained


def test_run_refuses_when_only_report_leftovers_exist(tmp_path):
    b = _copy(tmp_path)
    (b / "eval" / "figures").mkdir(parents=True)  # the checkpoint and report were moved away, the figures not
    (b / "eval" / "figures" / "old.png").write_bytes(b"png")
    with pytest.raises(Exception) as info:
        _run(b)
    assert "FileExistsError" in _chain(info.value) and "figures" in _chain(info.value)
    assert (b / "eval" / "figures" / "old.png").read_bytes() == b"png"


def test_failing_final_export_leaves_no_report_and_no_temps(tmp_path, monkeypatch):
    import monai_iaprune.pruning.checkpoint as ckpt

    def failing_export(*args, **kwargs):
        raise RuntimeError("killed during the final save")

    monkeypatch.setattr(ckpt, "export_torchscript", failing_export)
    b = _copy(tmp_path)
    stale = b / "models" / ".model_pruned.pt.999.cafe.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"left by a killed run")
    with pytest.raises(Exception) as info:
        _run(b)
    assert "killed during the final save" in _chain(info.value)
    names = sorted(p.name for p in (b / "models").iterdir())
    # no checkpoint, no temporary file, no lock; the resume file stays so that --resume true can finish the run
    assert names == ["model.pt", "resume.pt"], names
    assert not (b / "eval").exists() or sorted(p.name for p in (b / "eval").iterdir()) == []


# ------------------------------------------------------------------------------------------------------------------
# evaluate_pruned: prune_evaluate.json is an output transaction too
# ------------------------------------------------------------------------------------------------------------------
def _evaluator_and_checkpoint(tmp_path: Path):
    from monai.engines import SupervisedEvaluator
    from monai.networks.nets import DenseNet

    from monai_iaprune import channel_relevance, prune
    from monai_iaprune.pruning.checkpoint import save_pruned

    def net():
        return DenseNet(2, 1, 2, init_features=8, growth_rate=4, block_config=(1, 1), bn_size=2)

    pruned = net()
    prune(pruned, channel_relevance(pruned, None, "magnitude"), 0.4, example_inputs=torch.randn(1, 1, 16, 16))
    save_pruned(pruned, tmp_path / "model_pruned.pt")
    host = net()
    data = [{"image": torch.randn(2, 1, 16, 16), "label": torch.tensor([0, 1])}]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=data, network=host, key_val_metric=None
    )
    return host, evaluator, tmp_path / "model_pruned.pt"


def test_evaluate_pruned_refuses_replacing_its_output_and_locks(tmp_path, monkeypatch):
    from monai_iaprune import host_bundle

    monkeypatch.setattr(host_bundle, "metric_name", lambda evaluator, key: "acc")
    host, evaluator, ckpt = _evaluator_and_checkpoint(tmp_path)
    evaluator.state.metrics = {}

    def run_with_metric():
        evaluator.state.metrics["acc"] = 0.5

    monkeypatch.setattr(evaluator, "run", run_with_metric)
    out = tmp_path / "eval"
    result = host_bundle.evaluate_pruned(host, evaluator, ckpt, out)
    written = out / "prune_evaluate.json"
    assert (
        result["metric"] == 0.5
        and written.is_file()
        and sorted(p.name for p in out.iterdir()) == [written.name]
    )

    written.write_text('{"keep": "me"}')
    with pytest.raises(FileExistsError, match="prune_evaluate.json"):
        host_bundle.evaluate_pruned(host, evaluator, ckpt, out)
    with pytest.raises(FileExistsError):
        host_bundle.evaluate_pruned(host, evaluator, ckpt, out, overwrite="false")
    assert written.read_text() == '{"keep": "me"}'

    import json
    import socket

    from monai_iaprune.utils.outputs import OutputLockedError

    # another live run (the parent process) holds the folder
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "start": 0}))
    with pytest.raises(OutputLockedError, match=f"pid {os.getppid()}"):
        host_bundle.evaluate_pruned(host, evaluator, ckpt, out, overwrite=True)
    assert written.read_text() == '{"keep": "me"}'


def test_evaluate_pruned_overwrite_replaces_through_a_temp_file(tmp_path, monkeypatch):
    from monai_iaprune import host_bundle

    host, evaluator, ckpt = _evaluator_and_checkpoint(tmp_path)
    monkeypatch.setattr(host_bundle, "metric_name", lambda evaluator, key: "acc")
    monkeypatch.setattr(evaluator, "run", lambda: evaluator.state.metrics.__setitem__("acc", 0.25))
    out = tmp_path / "eval"
    out.mkdir()
    (out / "prune_evaluate.json").write_text("old")
    (out / ".prune_evaluate.json.999.dead.tmp").write_text("left by a killed run")
    host_bundle.evaluate_pruned(host, evaluator, ckpt, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["prune_evaluate.json"]
    assert '"metric": 0.25' in (out / "prune_evaluate.json").read_text()
