"""Pruned checkpoints: fresh-process round trip, TorchScript export, atomic and non-overwriting writes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from monai.networks.nets import ResNet

from monai_iaprune import channel_relevance, prune
from monai_iaprune.pruning.checkpoint import export_torchscript, load_pruned, save_pruned

NET_DEF = 'ResNet("basic", [2, 2, 2, 2], [4, 8, 16, 32], spatial_dims=2, n_input_channels=1, num_classes=3)'


def _pruned_net() -> torch.nn.Module:
    net = eval(NET_DEF, {"ResNet": ResNet})
    x = torch.randn(2, 1, 16, 16)
    net.train()
    for _ in range(2):  # make BatchNorm running stats non-trivial
        net(x)
    relevance = channel_relevance(net, None, "magnitude", progress=False)
    prune(net, relevance, 0.4, target="channels", example_inputs=x[:1])
    return net.eval()


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    return _pruned_net()


def test_round_trip_in_fresh_process(pruned, tmp_path: Path):
    fresh = eval(NET_DEF, {"ResNet": ResNet})
    assert any(p.shape != q.shape for p, q in zip(pruned.parameters(), fresh.parameters())), (
        "nothing was pruned"
    )
    with pytest.raises(RuntimeError, match="size mismatch"):  # why the structure is needed at all
        fresh.load_state_dict(pruned.state_dict())
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        expected = pruned(x)
    ckpt = save_pruned(pruned, tmp_path / "pruned.pt", extra={"method": "magnitude", "ratio": 0.4})
    torch.save(x, tmp_path / "x.pt")
    code = textwrap.dedent(
        f"""
        import torch
        from monai.networks.nets import ResNet
        from monai_iaprune.pruning.checkpoint import load_pruned
        x = torch.load(r"{tmp_path / "x.pt"}")
        a = load_pruned(r"{ckpt}", {NET_DEF})  # fresh network_def + recorded structure (weights_only load)
        with torch.no_grad():
            torch.save({{"a": a(x), "extra": torch.load(r"{ckpt}", weights_only=True)["extra"]}}, r"{tmp_path / "out.pt"}")
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out["a"], expected)
    assert out["extra"] == {"method": "magnitude", "ratio": 0.4}


def test_wrong_network_def_is_refused(pruned, tmp_path: Path):
    ckpt = save_pruned(pruned, tmp_path / "p.pt")
    other = ResNet("basic", [1, 1, 1, 1], [4, 8, 16, 32], spatial_dims=2, n_input_channels=1, num_classes=3)
    with pytest.raises(ValueError, match="does not have"):
        load_pruned(ckpt, other)
    with pytest.raises(ValueError, match="pass network_def"):
        load_pruned(ckpt)


def test_torchscript_export_gives_identical_outputs(pruned, tmp_path: Path):
    x = torch.randn(2, 1, 16, 16)
    path = export_torchscript(pruned, tmp_path / "pruned.ts", x[:1])
    loaded = torch.jit.load(str(path))
    with torch.no_grad():
        assert torch.allclose(loaded(x), pruned(x), atol=1e-6)


def test_no_silent_overwrite(pruned, tmp_path: Path):
    target = tmp_path / "p.pt"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="p.pt"):
        save_pruned(pruned, target)
    with pytest.raises(FileExistsError, match="p.pt"):
        export_torchscript(pruned, target, torch.randn(1, 1, 16, 16))
    assert target.read_bytes() == b"precious"
    save_pruned(pruned, target, overwrite=True)
    assert load_pruned(target, eval(NET_DEF, {"ResNet": ResNet})) is not None


def test_failed_save_leaves_no_partial_file(pruned, tmp_path: Path, monkeypatch):
    target = tmp_path / "p.pt"

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise RuntimeError("fails on purpose")

    monkeypatch.setattr(torch, "save", failing_save)  # torch.save fails midway
    with pytest.raises(RuntimeError, match="on purpose"):
        save_pruned(pruned, target, extra={"method": "magnitude"})
    assert list(tmp_path.iterdir()) == []
    # an existing file survives a failed overwrite unchanged
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="on purpose"):
        save_pruned(pruned, target, extra={"method": "magnitude"}, overwrite=True)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["p.pt"]


def test_written_files_get_normal_permissions(pruned, tmp_path: Path):
    """Outputs are written through 0600 temporary files; the saved file must get a new file's mode (umask), and an
    overwritten file keeps its own mode."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        target = save_pruned(pruned, tmp_path / "p.pt")
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        ts = export_torchscript(pruned, tmp_path / "p.ts", torch.randn(1, 1, 16, 16))
        assert stat.S_IMODE(ts.stat().st_mode) == 0o644
        os.umask(0o027)
        assert stat.S_IMODE(save_pruned(pruned, tmp_path / "q.pt").stat().st_mode) == 0o640
        target.chmod(0o604)
        save_pruned(pruned, target, overwrite=True)
        assert stat.S_IMODE(target.stat().st_mode) == 0o604
    finally:
        os.umask(old)
