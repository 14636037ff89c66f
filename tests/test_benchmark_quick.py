"""The real-data benchmark's --quick mode end to end, and the inference-speed helpers it reports on."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from conftest import MEDMNIST, ROOT, require_file
from torch import nn

from monai_iaprune.pruning.speed import (
    OneDNNConv,
    OneDNNPool,
    conv_bn_pairs,
    fold_batchnorm,
    optimize_for_inference,
    select_kernels,
    to_memory_format,
)

REQUIRED = (
    "dataset,model,method,params_removed,seed,acc_base,acc_pruned,acc_finetuned,auc_base,auc_pruned,"
    "auc_finetuned,macs_ratio,latency_ratio"
).split(",")


def test_quick_benchmark_writes_rows_and_curves(tmp_path):
    require_file(MEDMNIST / "breastmnist.npz")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (tmp_path / "accuracy.csv").open() as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        rows = list(reader)
    assert header[: len(REQUIRED)] == REQUIRED
    assert sorted(r["method"] for r in rows) == ["random", "taylor"]
    for r in rows:
        assert r["dataset"] == "breastmnist"
        for k in ("acc_base", "acc_pruned", "acc_finetuned", "auc_pruned", "auc_finetuned"):
            assert 0.0 <= float(r[k]) <= 1.0, (k, r[k])
        # prune() reached the requested fraction of parameters and the network got cheaper
        assert abs(float(r["params_removed_reached"]) - 0.5) <= 0.02
        assert int(r["params_pruned"]) < int(r["params_base"])
        assert 0.0 < float(r["macs_ratio"]) < 1.0
        assert float(r["latency_ratio"]) > 0.0
    assert (tmp_path / "breastmnist_curves.png").stat().st_size > 1000
    assert "G2" in proc.stdout and "G1" in proc.stdout
    # the quick run must not touch the shared BENCHMARKS.md nor the real cache
    assert (tmp_path / "cache").is_dir()
    # predictions of a run outside benchmarks/results stay in its own folder, never in a cache the main grid reads
    assert sorted(f.name for f in (tmp_path / "preds").iterdir()) == [
        "breastmnist_base.npz",
        "breastmnist_random_0.50_0.npz",
        "breastmnist_taylor_0.50_0.npz",
    ]
    assert not (tmp_path / "cache" / "preds").exists()


class _ConvBN(nn.Module):
    def __init__(self, dims: int):
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv3d, nn.BatchNorm3d)
        self.conv1, self.bn1 = conv(1, 6, 3, padding=1), bn(6)
        self.conv2, self.bn2 = conv(6, 4, 3, padding=1), bn(4)
        self.side = conv(6, 4, 1)  # reads conv1's output through bn1 only: bn1 still foldable

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(h)) + self.side(h)


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


@pytest.mark.parametrize("dims", [2, 3])
def test_fold_batchnorm_keeps_outputs(dims):
    model = _ConvBN(dims).eval()
    _randomize_bn(model)
    x = torch.randn(2, 1, *([8] * dims))
    ref = model(x)
    assert fold_batchnorm(model) == 2
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.bn2, nn.Identity)
    torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)


def test_conv_output_used_twice_is_not_folded():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # folding would change the second use of y

    m = Shared().eval()
    _randomize_bn(m)
    assert conv_bn_pairs(m) == []
    x = torch.randn(1, 1, 6, 6)
    ref = m(x)
    optimize_for_inference(m)
    torch.testing.assert_close(m(x), ref)


def test_optimize_for_inference_channels_last_monai_resnet():
    from monai.networks.nets import ResNet

    net = ResNet(
        "basic", [1, 1, 1, 1], [4, 8, 8, 8], spatial_dims=3, n_input_channels=1, num_classes=2
    ).eval()
    _randomize_bn(net)
    x = torch.randn(1, 1, 16, 16, 16)
    ref = net(x)
    optimize_for_inference(net, memory_format="channels_last")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert net.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(net(to_memory_format(x, "channels_last")), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="memory_format"):
        optimize_for_inference(net, memory_format="nhwc")


needs_onednn = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN"
)


@needs_onednn
@pytest.mark.parametrize("dims", [2, 3])
def test_onednn_conv_matches_the_conv_it_wraps(dims):
    conv, convt = (nn.Conv2d, nn.ConvTranspose2d) if dims == 2 else (nn.Conv3d, nn.ConvTranspose3d)
    layers = [
        conv(4, 6, 3, stride=2, padding=1, bias=False),
        conv(4, 8, 3, padding=2, dilation=2, groups=2),
        convt(4, 3, 3, stride=2, padding=1, output_padding=1),
    ]
    x = torch.randn(2, 4, *([9] * dims))
    for layer in layers:
        layer.eval()
        wrapped = OneDNNConv(layer)
        assert list(wrapped.state_dict()) == list(layer.state_dict())  # same keys: checkpoints still load
        with torch.inference_mode():
            torch.testing.assert_close(wrapped(x), layer(x), atol=1e-4, rtol=1e-4)
            xc = to_memory_format(x, "channels_last")
            torch.testing.assert_close(wrapped(xc), layer(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="cannot run on oneDNN"):
        OneDNNConv(conv(4, 4, 3, padding="same"))


@needs_onednn
@pytest.mark.parametrize("dims", [2, 3])
def test_onednn_pool_matches_the_pool_it_wraps(dims):
    mp, ap = (nn.MaxPool2d, nn.AvgPool2d) if dims == 2 else (nn.MaxPool3d, nn.AvgPool3d)
    x = torch.randn(2, 5, *range(9, 9 + dims))  # odd, unequal sizes: ceil_mode and padding matter
    for pool in (mp(3, 2, 1), mp(2, ceil_mode=True), ap(2), ap(3, 2, count_include_pad=False)):
        with torch.inference_mode():
            for xi in (x, to_memory_format(x, "channels_last")):
                torch.testing.assert_close(OneDNNPool(pool)(xi), pool(xi), atol=0, rtol=0)
    for pool in (ap(3, 2, 1), ap(2, ceil_mode=True), mp(2, return_indices=True)):
        with pytest.raises(ValueError, match="cannot run on oneDNN"):
            OneDNNPool(pool)


@needs_onednn
@pytest.mark.parametrize("kernels", ["auto", "onednn"])
def test_select_kernels_keeps_outputs_and_names(kernels):
    model = _ConvBN(3).eval()
    _randomize_bn(model)
    model.side = nn.Sequential(
        nn.Conv3d(6, 4, 1, padding="same"), nn.MaxPool3d(3, 1, 1)
    )  # same: stays default
    x = torch.randn(1, 1, 10, 10, 10)
    ref, keys = model(x), list(model.state_dict())
    choice = select_kernels(model, x, kernels)
    assert set(choice) == {"conv1", "conv2", "side.0", "side.1"} and choice["side.0"] == "default"
    assert set(choice.values()) <= {"onednn", "default"}
    if kernels == "onednn":
        assert choice["conv1"] == choice["conv2"] == choice["side.1"] == "onednn"
        assert isinstance(model.conv2, OneDNNConv) and isinstance(model.side[1], OneDNNPool)
    assert list(model.state_dict()) == keys
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
    unwrapped = {n: c for n, c in choice.items() if c == "default"}
    assert select_kernels(model, x, "default") == unwrapped  # wrapped convs are not wrapped again


def _monai_nets(dims):
    from monai.networks.nets import ResNet, UNet

    unet = UNet(
        dims, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1
    )  # transposed convs, norm, PReLU
    resnet = ResNet("basic", [1, 1, 1, 1], [4, 8, 8, 8], spatial_dims=dims, n_input_channels=1, num_classes=2)
    return {"unet": unet, "resnet": resnet}


@needs_onednn
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(
    "options",
    [
        {"kernels": "auto", "backend": "eager"},
        {"kernels": "onednn", "backend": "jit"},
        {"kernels": "auto", "backend": "jit", "memory_format": "channels_last"},
    ],
)
def test_optimize_for_inference_backends_keep_outputs(dims, options):
    x = torch.randn(2, 1, *([16] * dims))
    for name, net in _monai_nets(dims).items():
        net.eval()
        _randomize_bn(net)
        with torch.no_grad():
            ref = net(x)
        fast = optimize_for_inference(net, example_inputs=x, **options)
        assert (fast is net) == (options["backend"] == "eager"), name
        with torch.inference_mode():
            out = fast(to_memory_format(x, options.get("memory_format")))
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_optimize_for_inference_rejects_bad_options():
    net = _ConvBN(2).eval()
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="unknown kernels"):
        optimize_for_inference(net, example_inputs=x, kernels="mkldnn")
    with pytest.raises(ValueError, match="unknown backend"):
        optimize_for_inference(net, example_inputs=x, backend="compile")
    with pytest.raises(ValueError, match="example_inputs"):
        optimize_for_inference(net, kernels="auto")
    with pytest.raises(ValueError, match="example_inputs"):
        optimize_for_inference(net, backend="jit")
    with pytest.raises(ValueError, match="example_inputs"):
        select_kernels(net)
    with pytest.raises(ValueError, match="unknown kernels"):
        select_kernels(net, x, "fast")
    with pytest.raises(ValueError, match="float32 CPU"):
        select_kernels(_ConvBN(2).double(), x.double(), "onednn")


def test_optimize_for_inference_refuses_before_changing_the_model():
    net = _ConvBN(2).double().eval()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert n_bn > 0
    with pytest.raises(ValueError, match="float32 CPU"):
        optimize_for_inference(net, example_inputs=torch.randn(1, 1, 8, 8).double(), kernels="auto")
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == n_bn  # nothing folded


def _bench_train():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from run import make_model, train
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return make_model, train


def test_distillation_fine_tune_follows_the_teacher_not_the_labels():
    make_model, train = _bench_train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 12, 12, generator=g)
    y = torch.randint(0, 2, (16,), generator=g)
    torch.manual_seed(0)
    teacher = make_model(2, (4, 4, 8, 8)).eval()
    student = make_model(2, (4, 4, 8, 8))

    def fine_tune(labels, alpha):
        s = __import__("copy").deepcopy(student)
        train(s, (x, labels), (x, y), epochs=1, batch=8, seed=0, teacher=teacher, kd_alpha=alpha)
        return torch.cat([p.detach().flatten() for p in s.parameters()])

    # kd_alpha=1: the loss is the distillation term alone, so the labels cannot matter
    torch.testing.assert_close(fine_tune(y, 1.0), fine_tune(1 - y, 1.0), rtol=0, atol=0)
    # kd_alpha=0.5 keeps the cross-entropy term: the labels change the result
    assert not torch.equal(fine_tune(y, 0.5), fine_tune(1 - y, 0.5))


def _merge_module():
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("merge_rows")
    finally:
        sys.path.pop(0)


def test_merge_rows_keeps_existing_rows_and_adds_the_new_ones(tmp_path):
    mr = _merge_module()
    cols = mr.COLUMNS

    def write(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, restval="")
            w.writeheader()
            w.writerows(rows)

    def row(method, ratio, seed, acc):
        return {"dataset": "d", "method": method, "params_removed": ratio, "seed": seed, "acc_pruned": acc}

    out, cache = tmp_path / "results", tmp_path / "cache"
    write(out / "accuracy.csv", [row("lrp", "0.7", "0", "0.5")])
    src = tmp_path / "grid"
    # the same key as a row already there (written as 0.70): dropped; two new rows from two criteria
    write(src / "lrp" / "accuracy.csv", [row("lrp", "0.70", "0", "0.9"), row("lrp", "0.95", "0", "0.6")])
    write(src / "taylor" / "accuracy.csv", [row("taylor", "0.7", "1", "0.7")])
    (src / "cache" / "preds").mkdir(parents=True)
    (src / "cache" / "preds" / "d_base.npz").write_bytes(b"new")
    (cache / "preds").mkdir(parents=True)
    (cache / "preds" / "d_base.npz").write_bytes(b"old")
    (src / "cache" / "preds" / "d_lrp_0.95_0.npz").write_bytes(b"x")
    (src / "taylor" / "preds").mkdir()
    (src / "taylor" / "preds" / "d_taylor_0.70_1.npz").write_bytes(b"t")

    assert mr.merge([src], out, cache) == 2
    with (out / "accuracy.csv").open() as f:
        got = {(r["method"], r["params_removed"], r["seed"]): r["acc_pruned"] for r in csv.DictReader(f)}
    assert got == {("lrp", "0.7", "0"): "0.5", ("lrp", "0.95", "0"): "0.6", ("taylor", "0.7", "1"): "0.7"}
    assert (cache / "preds" / "d_base.npz").read_bytes() == b"old"  # nothing overwritten
    assert (cache / "preds" / "d_lrp_0.95_0.npz").read_bytes() == b"x"
    assert (cache / "preds" / "d_taylor_0.70_1.npz").read_bytes() == b"t"
    assert mr.merge([src], out, cache) == 0  # merging again adds nothing
