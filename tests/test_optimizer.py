"""remap_optimizer: the same optimizer follows the pruned parameters with correctly sliced state."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import DenseNet, ResNet
from torch import nn

from monai_iaprune import channel_relevance, prune
from monai_iaprune.pruning.optimizer import kept_indices, parameter_snapshot, remap_optimizer


def tiny_resnet18() -> nn.Module:
    """resnet18 topology (basic blocks, [2, 2, 2, 2]) with tiny widths."""
    return ResNet("basic", [2, 2, 2, 2], [4, 8, 16, 32], spatial_dims=2, n_input_channels=1, num_classes=3)


def tiny_densenet121() -> nn.Module:
    """DenseNet121 topology (block_config 6-12-24-16, concatenations) with tiny widths."""
    return DenseNet(2, 1, 3, init_features=8, growth_rate=4, block_config=(6, 12, 24, 16), bn_size=2)


def tiny_mixed() -> nn.Module:
    """Depthwise conv, conv-transpose and linear layers in one net."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.BatchNorm2d(8),
        nn.ConvTranspose2d(8, 6, 2, stride=2),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
    )


def tiny_depthwise_up() -> nn.Module:
    """A depthwise transposed conv (weight ``(C, 1, k, k)``, MedNeXt's up blocks) between prunable convs."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 2, stride=2, groups=8),
        nn.BatchNorm2d(8),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    )


def _train_steps(
    net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, n: int = 2
) -> None:
    net.train()
    for _ in range(n):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()


@pytest.mark.parametrize(
    "net_fn",
    [tiny_resnet18, tiny_densenet121, tiny_mixed, tiny_depthwise_up],
    ids=["resnet18", "densenet121", "mixed", "depthwise-transposed"],
)
def test_remap_slices_state_like_torch_pruning_slices_weights(net_fn):
    net = net_fn()
    size = 32 if net_fn is tiny_densenet121 else 16  # DenseNet121 downsamples 32x
    x, y = torch.randn(4, 1, size, size), torch.tensor([0, 1, 2, 0])
    # one pruning (slow on DenseNet's concatenations), two optimizers holding the same parameters
    adam = torch.optim.Adam(net.parameters(), lr=1e-3)
    sgd = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
    _train_steps(net, adam, x, y)
    _train_steps(net, sgd, x, y)
    # oracle: state tensors that are a known function of their own parameter; torch-pruning slices the
    # weights, so after remapping every state tensor must be the same function of the new parameter
    for p in net.parameters():
        adam.state[p]["exp_avg"] = p.detach() * 2 + 1
        adam.state[p]["exp_avg_sq"] = p.detach() ** 2 + 0.5
        sgd.state[p]["momentum_buffer"] = p.detach() * 3 - 1
    steps = {n: adam.state[p]["step"].clone() for n, p in net.named_parameters()}
    relevance = channel_relevance(net, [(x, y)], "taylor", progress=False)
    snapshot = parameter_snapshot(net)
    result = prune(net, relevance, 0.4, target="channels", example_inputs=x[:1])  # no bisection: fast
    assert any(kind == "in" for _, kind, _ in result.history)
    changed = [n for n, p in net.named_parameters() if p.shape != snapshot[n].shape]
    assert changed, "pruning changed no parameter shape"

    for opt in (adam, sgd):
        assert remap_optimizer(opt, snapshot, net, result.history) is opt
        held = [p for g in opt.param_groups for p in g["params"]]
        assert [id(p) for p in held] == [id(p) for p in net.parameters()]
        assert len(opt.state) == len(held)  # the old tensors' state is gone
    for n, p in net.named_parameters():
        st = adam.state[p]
        assert st["exp_avg"].shape == p.shape and st["exp_avg_sq"].shape == p.shape, n
        torch.testing.assert_close(st["exp_avg"], p.detach() * 2 + 1, msg=n)
        torch.testing.assert_close(st["exp_avg_sq"], p.detach() ** 2 + 0.5, msg=n)
        assert torch.equal(st["step"], steps[n]), n
        assert sgd.state[p]["momentum_buffer"].shape == p.shape, n
        torch.testing.assert_close(sgd.state[p]["momentum_buffer"], p.detach() * 3 - 1, msg=n)
    # a step of either optimizer updates every (new) parameter
    for opt in (adam, sgd):
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        _train_steps(net, opt, x, y, n=1)
        for n, p in net.named_parameters():
            assert not torch.equal(before[n], p.detach()), (
                f"{n} was not updated by {type(opt).__name__} after remapping"
            )


def test_kept_indices_compose_successive_removals():
    lin = nn.Sequential(nn.Linear(4, 6))
    snap = parameter_snapshot(lin)
    # remove original rows 1 and 4: first [1], then (in the shrunk tensor, old row 4 is now row 3) [3]
    kept = kept_indices(snap, lin, [("0", "out", [1]), ("0", "out", [3])])
    assert kept["0.weight"][0].tolist() == [0, 2, 3, 5]
    assert kept["0.weight"][1] is None
    assert kept["0.bias"][0].tolist() == [0, 2, 3, 5]
    kept = kept_indices(snap, lin, [("0", "in", [0, 2])])
    assert kept["0.weight"][1].tolist() == [1, 3] and "0.bias" not in kept


def test_remap_refuses_history_that_does_not_explain_the_shapes():
    net = tiny_mixed()
    x = torch.randn(2, 1, 16, 16)
    opt = torch.optim.Adam(net.parameters())
    _train_steps(net, opt, x, torch.tensor([0, 1]))
    snapshot = parameter_snapshot(net)
    relevance = channel_relevance(net, None, "magnitude", progress=False)
    prune(net, relevance, 0.3, target="channels", example_inputs=x[:1])
    with pytest.raises(ValueError, match="pruning history explains"):
        remap_optimizer(opt, snapshot, net, history=[])


def test_unknown_history_module_is_named():
    net = tiny_mixed()
    with pytest.raises(KeyError, match="nope"):
        kept_indices(parameter_snapshot(net), net, [("nope", "out", [0])])
