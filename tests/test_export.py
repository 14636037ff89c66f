"""Deployment exports: torch.export (.pt2) and ONNX round trips of pruned 2D / 3D MONAI nets."""

from __future__ import annotations

import pytest
import torch
from monai.networks import nets

from monai_iaprune import channel_relevance, prune
from monai_iaprune.pruning import export as export_mod
from monai_iaprune.pruning import export_onnx, export_torch_export

X2 = torch.randn(1, 1, 32, 32)
X3 = torch.randn(1, 1, 16, 16, 16)


def _pruned(net: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if net == "densenet2d":
        model, x = (
            nets.DenseNet(
                spatial_dims=2,
                in_channels=1,
                out_channels=3,
                init_features=8,
                growth_rate=4,
                block_config=(2, 2),
                bn_size=2,
            ),
            X2,
        )
    else:
        model, x = (
            nets.UNet(
                spatial_dims=3,
                in_channels=1,
                out_channels=2,
                channels=(4, 8, 16),
                strides=(2, 2),
                num_res_units=1,
            ),
            X3,
        )
    before = sum(p.numel() for p in model.parameters())
    prune(model, channel_relevance(model, None, "magnitude", progress=False), 0.5, example_inputs=x)
    assert sum(p.numel() for p in model.parameters()) < before
    return model.eval(), x


def _onnx_deps():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


def _run_onnx_file(path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("net", ["densenet2d", "unet3d"])
def test_torch_export_round_trip_dynamic_batch(net, tmp_path):
    model, x = _pruned(net)
    path = export_torch_export(model, tmp_path / "net.pt2", x)
    assert path.is_file() and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    loaded = torch.export.load(str(path)).module()
    for batch in (1, 3):  # exported at batch 1, run at batch 3
        xb = torch.randn(batch, *x.shape[1:])
        with torch.no_grad():
            torch.testing.assert_close(loaded(xb), model(xb), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("net", ["densenet2d", "unet3d"])
def test_onnx_round_trip_dynamic_batch(net, tmp_path):
    _onnx_deps()
    model, x = _pruned(net)
    path = export_onnx(model, tmp_path / "net.onnx", x)
    for batch in (1, 3):
        xb = torch.randn(batch, *x.shape[1:])
        with torch.no_grad():
            torch.testing.assert_close(_run_onnx_file(path, xb), model(xb), rtol=1e-4, atol=1e-5)


def test_static_batch_keeps_example_shape(tmp_path):
    model, x = _pruned("densenet2d")
    loaded = torch.export.load(str(export_torch_export(model, tmp_path / "s.pt2", x, dynamic_batch=False)))
    with pytest.raises(Exception):  # noqa: B017 - torch raises its own guard error type
        loaded.module()(torch.randn(3, *x.shape[1:]))


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_existing_file_refused_without_overwrite(fmt, tmp_path):
    if fmt == "onnx":
        _onnx_deps()
    model, x = _pruned("densenet2d")
    export = export_torch_export if fmt == "pt2" else export_onnx
    path = tmp_path / f"net.{fmt}"
    path.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="net"):
        export(model, path, x)
    assert path.read_bytes() == b"keep me"
    export(model, path, x, overwrite=True)
    assert path.read_bytes() != b"keep me"


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_check_failure_names_file_and_difference(fmt, tmp_path, monkeypatch):
    if fmt == "onnx":
        _onnx_deps()
    model, x = _pruned("densenet2d")
    runner = "_run_pt2" if fmt == "pt2" else "_run_onnx"
    real = getattr(export_mod, runner)
    monkeypatch.setattr(export_mod, runner, lambda data, inputs: [o + 0.5 for o in real(data, inputs)])
    export = export_torch_export if fmt == "pt2" else export_onnx
    path = tmp_path / f"net.{fmt}"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match=r"net\.(pt2|onnx).*max abs difference 0\.5"):
        export(model, path, x, overwrite=True)
    assert path.read_bytes() == b"old"  # a file failing the check never replaces the old one
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    export(model, tmp_path / f"unchecked.{fmt}", x, check=False)  # check=False skips the runner


def test_mode_restored_and_bad_inputs(tmp_path):
    model, x = _pruned("densenet2d")
    model.train()
    export_torch_export(model, tmp_path / "m.pt2", x)
    assert model.training
    with pytest.raises(TypeError, match="example_inputs"):
        export_torch_export(model, tmp_path / "bad.pt2", [])
