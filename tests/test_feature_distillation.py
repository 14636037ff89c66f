"""Kept-channel feature distillation: the channel map matches the pruned weights, the loss is zero for the
teacher itself, its gradient reaches only the student, and misuse is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.networks.nets import ResNet, UNet
from torch import nn

from monai_iaprune import channel_relevance, prune
from monai_iaprune.pruning.feature_distillation import FeatureDistillationLoss, _width, kept_channels


def tiny_resnet(dims: int = 2) -> nn.Module:
    return ResNet(
        "basic", [1, 1, 1, 1], [8, 8, 16, 16], spatial_dims=dims, n_input_channels=1, num_classes=3,
        conv1_t_size=3, conv1_t_stride=1, no_max_pool=True,
    )  # fmt: skip


def tiny_unet() -> nn.Module:
    return UNet(
        spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16), strides=(2,), num_res_units=1
    )


def _input(net: nn.Module, dims: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 1, *([8] * dims if dims == 3 else [16, 16]), generator=g)


def _randomise_norms(net: nn.Module) -> nn.Module:
    """Give every norm layer distinct affine parameters: the oracle reads channel identity off them."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return net


def _prune_steps(net: nn.Module, x: torch.Tensor, ratios: list[float]) -> list:
    histories = []
    for r in ratios:
        rel = channel_relevance(net, None, "random", progress=False)
        histories.append(prune(net, rel, r, target="macs", example_inputs=x[:1]).history)
    return histories


@pytest.mark.parametrize("case", ["resnet2d", "resnet3d", "unet"])
@pytest.mark.parametrize("steps", [[0.5], [0.3, 0.4]])
def test_kept_channels_names_the_teacher_channel_of_every_norm_and_bias(case: str, steps: list[float]):
    torch.manual_seed(0)
    dims = 3 if case == "resnet3d" else 2
    teacher = _randomise_norms(tiny_unet() if case == "unet" else tiny_resnet(dims)).eval()
    x = _input(teacher, dims)
    student = copy.deepcopy(teacher)
    kept = kept_channels(teacher, *_prune_steps(student, x, steps))
    tmods, smods = dict(teacher.named_modules()), dict(student.named_modules())
    checked = 0
    for name, idx in kept.items():
        t, s = tmods[name], smods[name]
        if isinstance(t, nn.modules.batchnorm._NormBase) and t.affine:
            assert torch.equal(s.weight, t.weight[idx]) and torch.equal(s.bias, t.bias[idx])
            checked += 1
        elif getattr(t, "bias", None) is not None:
            assert torch.equal(s.bias, t.bias[idx])
            checked += 1
    assert checked >= 3, "the oracle must see several pruned layers"
    assert any(len(i) < _width(tmods[n]) for n, i in kept.items())


def test_kept_channels_matches_first_layer_outputs_exactly():
    """The stem sees the full input in both networks: its kept outputs are the teacher's selected channels."""
    teacher = tiny_resnet().eval()
    x = _input(teacher)
    student = copy.deepcopy(teacher)
    kept = kept_channels(teacher, *_prune_steps(student, x, [0.5]))
    assert "conv1" in kept and len(kept["conv1"]) < 8
    with torch.no_grad():
        assert torch.allclose(student.conv1(x), teacher.conv1(x)[:, kept["conv1"]])


def test_kept_channels_rejects_foreign_histories():
    teacher = tiny_resnet()
    with pytest.raises(KeyError, match="does not have"):
        kept_channels(teacher, [("nope", "out", [0])])
    with pytest.raises(ValueError, match="removes channel 9"):
        kept_channels(teacher, [("conv1", "out", [9])])


@pytest.mark.parametrize("case", ["resnet2d", "unet"])
def test_loss_is_zero_for_the_teacher_itself_and_reaches_only_the_student(case: str):
    torch.manual_seed(0)
    teacher = (tiny_unet() if case == "unet" else tiny_resnet()).eval()
    x = _input(teacher)
    student = copy.deepcopy(teacher).eval()
    loss = FeatureDistillationLoss(teacher)
    loss.attach(student)
    student(x)
    assert float(loss(x).detach()) == pytest.approx(0.0, abs=1e-10)
    # a changed student: positive, with gradients in the student and none in the teacher
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(1.1)
    with pytest.raises(RuntimeError, match="no student output"):
        loss(x)
    out = student(x)
    term = loss(x)
    assert float(term.detach()) > 1e-4
    (term + 0 * out.sum()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_training_with_the_term_pulls_a_pruned_student_towards_the_teacher():
    torch.manual_seed(0)
    teacher = tiny_resnet().eval()
    x = _input(teacher)
    student = copy.deepcopy(teacher)
    kept = kept_channels(teacher, *_prune_steps(student, x, [0.5]))
    loss = FeatureDistillationLoss(teacher, kept)
    loss.attach(student)
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    student.eval()  # fixed BN statistics: the term alone moves the weights
    values = []
    for _ in range(30):
        opt.zero_grad()
        student(x)
        term = loss(x)
        term.backward()
        opt.step()
        values.append(float(term.detach()))
    assert values[-1] < 0.5 * values[0]


def test_width_mismatch_and_missing_attach_are_refused():
    teacher = tiny_resnet().eval()
    x = _input(teacher)
    student = copy.deepcopy(teacher)
    _prune_steps(student, x, [0.5])
    loss = FeatureDistillationLoss(teacher)  # no kept map for a pruned student
    with pytest.raises(RuntimeError, match="attach"):
        loss(x)
    with pytest.raises(ValueError, match="kept=kept_channels"):
        loss.attach(student)
    with pytest.raises(KeyError, match="not in both"):
        FeatureDistillationLoss(teacher, layers=["nope"]).attach(copy.deepcopy(teacher))
    with pytest.raises(TypeError, match="nn.Module"):
        FeatureDistillationLoss("teacher")  # type: ignore[arg-type]


def test_detach_removes_the_hooks():
    teacher = tiny_resnet().eval()
    student = copy.deepcopy(teacher)
    loss = FeatureDistillationLoss(teacher)
    loss.attach(student)
    loss.detach()
    student(_input(teacher))
    assert not any(m._forward_hooks for m in student.modules())
    assert not any(m._forward_hooks for m in teacher.modules())
