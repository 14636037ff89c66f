"""CUDA: relevance, pruning, BatchNorm re-calibration, inference clean-up and the trainer handler on a GPU
give what they give on the CPU (same weights, same data), and leave the network on the GPU.

Skipped without CUDA. ``MONAI_IAPRUNE_TEST_DEVICE=cpu`` runs the same code with the CPU as the "other"
device (a smoke test of the tests themselves, where no GPU is at hand).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from ignite.metrics import Accuracy
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import from_engine
from monai.networks.nets import DenseNet, ResNet, UNet
from test_handlers import loader, tiny_resnet18
from torch import nn

from monai_iaprune import channel_relevance, prune, recalibrate_batchnorm
from monai_iaprune.handlers import RelevancePruningHandler
from monai_iaprune.pruning.speed import optimize_for_inference, to_memory_format

DEVICE = torch.device(os.environ.get("MONAI_IAPRUNE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"
)
METHODS = ("lrp", "ig", "dlb", "taylor", "magnitude")
_BN = nn.modules.batchnorm._BatchNorm


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full float32 convs and matmuls on the GPU (TF32 is cuDNN's default), so GPU and CPU agree to float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters (defaults would make eval-mode BN nearly identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BN):
                n = m.num_features
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
    return model


def _densenet_3d() -> nn.Module:
    return DenseNet(3, 1, 3, init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2)


def _unet_3d() -> nn.Module:
    return UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="batch")


def _class_batches(shape: tuple[int, ...], classes: int = 3, n: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randn(*shape, generator=g),
            "label": torch.randint(0, classes, (shape[0],), generator=g),
        }
        for _ in range(n)
    ]


def _mask_batches(shape: tuple[int, ...], n: int = 2, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(*shape, generator=g)
        out.append({"image": x, "label": (x > 0.5).float()})  # a mask that follows the image
    return out


NETS = {
    "resnet18_2d": (tiny_resnet18, lambda: list(loader(n=8, batch_size=4))),
    "densenet_3d": (_densenet_3d, lambda: _class_batches((2, 1, 16, 16, 16))),
    "unet_3d": (_unet_3d, lambda: _mask_batches((2, 1, 16, 16, 16))),
}


def _pair(build) -> tuple[nn.Module, nn.Module]:
    """The same network (same weights and BatchNorm statistics) on the CPU and on DEVICE."""
    torch.manual_seed(0)
    cpu = _randomize_bn(build()).eval()
    return cpu, copy.deepcopy(cpu).to(DEVICE)


def _on_device(model: nn.Module, device: torch.device) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return bool(tensors) and all(t.device.type == device.type for t in tensors)


def _assert_close_per_layer(got: dict, want: dict, rtol: float, scale_atol: float, what: str) -> None:
    assert set(got) == set(want), what
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape, f"{what} {name}"
        atol = scale_atol * float(w.abs().max())
        diff = float((g.double() - w.double()).abs().max())
        torch.testing.assert_close(
            g, w, rtol=rtol, atol=atol, msg=f"{what}, layer {name!r}: max |diff| {diff:.3e}, atol {atol:.3e}"
        )


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("method", METHODS)
def test_channel_relevance_equals_cpu(net, method):
    build, batches = NETS[net]
    cpu, dev = _pair(build)
    data = batches()
    state = {k: v.detach().clone() for k, v in dev.state_dict().items()}
    want = channel_relevance(cpu, data, method, progress=False)
    got = channel_relevance(dev, data, method, progress=False)
    # what collect.py promises: scores on the CPU, float32, one per output channel, whatever the model's device
    for name, v in got.items():
        assert v.device.type == "cpu" and v.dtype == torch.float32, (name, v.device, v.dtype)
        assert torch.isfinite(v).all(), name
    assert got.num_samples == want.num_samples and got.method == method
    assert (got.example_input is None) == (want.example_input is None)
    if got.example_input is not None:
        assert got.example_input.device.type == "cpu"
        assert torch.equal(got.example_input, want.example_input)
    assert sum(float(v.sum()) for v in want.values()) > 0, "all-zero relevance: a vacuous comparison"
    _assert_close_per_layer(got, want, rtol=1e-3, scale_atol=1e-4, what=f"{net}/{method} {DEVICE} vs cpu")
    # the model is left where it was, with its weights, and in eval mode as before
    assert _on_device(dev, DEVICE) and not dev.training
    after = dev.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())


PRUNE_NETS = ("resnet18_2d", "unet_3d")


def _loss(out: torch.Tensor, batch: dict) -> torch.Tensor:
    label = batch["label"].to(out.device)
    if out.ndim == 2:
        return nn.functional.cross_entropy(out, label.long())
    return nn.functional.cross_entropy(out, label[:, 0].long())


@pytest.mark.parametrize("net", PRUNE_NETS)
def test_prune_removes_the_same_channels_as_on_cpu(net):
    build, batches = NETS[net]
    cpu, dev = _pair(build)
    data = batches()
    rel = channel_relevance(cpu, data, "taylor", progress=False)
    x = rel.example_input
    res_cpu = prune(cpu, rel, 0.5, example_inputs=x)
    res_dev = prune(dev, rel, 0.5, example_inputs=x.to(DEVICE))
    assert 0.45 < res_dev.params_removed < 0.55
    assert res_dev.history == res_cpu.history
    assert res_dev.channels == res_cpu.channels
    assert (res_dev.params_after, res_dev.macs_after) == (res_cpu.params_after, res_cpu.macs_after)
    sd_cpu, sd_dev = cpu.state_dict(), dev.state_dict()
    assert list(sd_dev) == list(sd_cpu)
    for k, v in sd_cpu.items():
        assert sd_dev[k].shape == v.shape, k
        assert torch.equal(sd_dev[k].cpu(), v), f"{k}: pruning kept different values on {DEVICE}"
    assert _on_device(dev, DEVICE), "the pruned network left the device"
    # eval outputs agree, then one training step runs on the device
    batch = data[0]
    with torch.no_grad():
        torch.testing.assert_close(
            dev(batch["image"].to(DEVICE)).cpu(), cpu(batch["image"]), rtol=1e-4, atol=1e-5
        )
    dev.train()
    out = dev(batch["image"].to(DEVICE))
    assert out.device.type == DEVICE.type
    _loss(out, batch).backward()
    grads = [p.grad for p in dev.parameters()]
    assert all(g is not None and g.device.type == DEVICE.type and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


def test_prune_with_device_relevance_and_example_input():
    """The handler path: relevance from the GPU model, example input taken from that relevance."""
    _, dev = _pair(tiny_resnet18)
    rel = channel_relevance(dev, list(loader()), "lrp", progress=False)
    result = prune(dev, rel, 0.5)  # example_inputs from rel (a CPU tensor): moved to the model's device
    assert 0.45 < result.params_removed < 0.55
    assert result.params_after == sum(p.numel() for p in dev.parameters())
    assert _on_device(dev, DEVICE)


@pytest.mark.parametrize("net", PRUNE_NETS)
def test_recalibrate_batchnorm_equals_cpu(net):
    build, batches = NETS[net]
    cpu, dev = _pair(build)
    data = batches()
    rel = channel_relevance(cpu, None, "magnitude", progress=False)
    x = data[0]["image"][:1]
    prune(cpu, rel, 0.5, example_inputs=x)
    prune(dev, rel, 0.5, example_inputs=x.to(DEVICE))
    n_cpu = recalibrate_batchnorm(cpu, data)
    n_dev = recalibrate_batchnorm(dev, data)  # CPU batches: moved to the model's device
    assert n_cpu == n_dev == sum(b["image"].shape[0] for b in data)
    assert _on_device(dev, DEVICE) and not dev.training
    bns_cpu = {n: m for n, m in cpu.named_modules() if isinstance(m, _BN)}
    bns_dev = {n: m for n, m in dev.named_modules() if isinstance(m, _BN)}
    assert set(bns_dev) == set(bns_cpu) and bns_cpu
    for name, b in bns_cpu.items():
        d = bns_dev[name]
        # re-estimated, not the reset values (mean 0, var 1): the comparison is not vacuous
        assert float(b.running_mean.abs().max()) > 1e-3, name
        torch.testing.assert_close(d.running_mean.cpu(), b.running_mean, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(d.running_var.cpu(), b.running_var, rtol=1e-4, atol=1e-5, msg=name)
        assert int(d.num_batches_tracked) == int(b.num_batches_tracked) == len(data), name
        assert d.momentum == b.momentum == 0.1, "momentum not restored"


def _resnet(dims: int) -> nn.Module:
    return ResNet("basic", [1, 1, 1, 1], [4, 8, 8, 16], spatial_dims=dims, n_input_channels=1, num_classes=2)


@pytest.mark.parametrize("dims", [2, 3])
def test_optimize_for_inference_channels_last_equals_eager(dims):
    _, dev = _pair(lambda: _resnet(dims))
    x = torch.randn(2, 1, *([16] * dims), device=DEVICE)
    with torch.no_grad():
        ref = dev(x)
    n_bn = sum(isinstance(m, _BN) for m in dev.modules())
    fast = optimize_for_inference(dev, fold_bn=True, memory_format="channels_last", example_inputs=x)
    assert fast is dev and _on_device(dev, DEVICE)
    assert n_bn > 0 and not any(isinstance(m, _BN) for m in dev.modules()), "BatchNorm not folded"
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    assert dev.conv1.weight.is_contiguous(memory_format=fmt)
    with torch.inference_mode():
        out = fast(to_memory_format(x, "channels_last"))
    assert out.device.type == DEVICE.type
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(DEVICE.type == "cpu", reason="oneDNN kernels are the CPU path itself")
@pytest.mark.parametrize("kernels", ["auto", "onednn"])
def test_cpu_kernel_choice_refuses_a_cuda_model(kernels):
    """``kernels="auto"`` / ``"onednn"`` are oneDNN (CPU) kernels: on a CUDA model they refuse with a clear error
    rather than timing or swapping in CPU-only layers; the model stays on the device."""
    _, dev = _pair(lambda: _resnet(2))
    x = torch.randn(1, 1, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match="float32 CPU model"):
        optimize_for_inference(dev, example_inputs=x, kernels=kernels)
    assert _on_device(dev, DEVICE)
    assert not any(type(m).__name__.startswith("OneDNN") for m in dev.modules())


def test_optimize_for_inference_jit_on_device():
    _, dev = _pair(lambda: _resnet(3))
    x = torch.randn(1, 1, 16, 16, 16, device=DEVICE)
    with torch.no_grad():
        ref = dev(x)
    fast = optimize_for_inference(dev, example_inputs=x, backend="jit")
    with torch.inference_mode():
        out = fast(x)
    assert out.device.type == DEVICE.type
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["taylor", "lrp"])
def test_pruning_handler_in_a_trainer_on_device(method):
    torch.manual_seed(0)
    net = tiny_resnet18().to(DEVICE)
    params_original = sum(p.numel() for p in net.parameters())
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    data = loader()
    evaluator = SupervisedEvaluator(
        device=DEVICE,
        val_data_loader=loader(seed=1),
        network=net,
        key_val_metric={"acc": Accuracy(output_transform=from_engine(["pred", "label"]))},
    )
    handler = RelevancePruningHandler(
        method=method, ratio=0.5, stages=2, data=data, evaluator=evaluator, max_batches=2
    )
    trainer = SupervisedTrainer(
        device=DEVICE,
        max_epochs=3,
        train_data_loader=data,
        network=net,
        optimizer=opt,
        loss_function=nn.CrossEntropyLoss(),
        train_handlers=[handler],
    )
    trainer.run()
    assert [h["epoch"] for h in handler.history] == [1, 2]
    params_now = sum(p.numel() for p in net.parameters())
    assert abs((1 - params_now / params_original) - 0.5) < 0.03
    assert trainer.network is net and _on_device(net, DEVICE), "the pruned network left the device"
    held = [p for g in opt.param_groups for p in g["params"]]
    assert [id(p) for p in held] == [id(p) for p in net.parameters()]
    for p in net.parameters():
        st = opt.state[p]
        assert st["exp_avg"].shape == p.shape and st["exp_avg"].device == p.device
    output = trainer.state.output
    loss = output[0]["loss"] if isinstance(output, list) else output["loss"]
    assert torch.isfinite(torch.as_tensor(loss)).all()
    assert 0.0 <= handler.history[-1]["metric_pruned"] <= 1.0
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, 16, 16, device=DEVICE))
    assert out.shape == (2, 3) and out.device.type == DEVICE.type
