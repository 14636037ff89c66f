"""The relevance-method registry: a method is one register_method call, and runs everywhere a built-in one does."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from monai.engines import SupervisedTrainer
from torch import nn
from torch.utils.data import DataLoader

from monai_iaprune import channel_relevance, prune
from monai_iaprune.handlers import RelevancePruningHandler
from monai_iaprune.pruning.prune import resolve_normalizer
from monai_iaprune.relevance.layers import out_channels
from monai_iaprune.relevance.registry import METHODS, get_method, register_method, unregister_method
from tests.conftest import ROOT

TOY = "toy_channel_index"
BUILT_IN = {"lrp", "ig", "dlb", "taylor", "magnitude", "random"}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    )


def _loader(n: int = 8, batch_size: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.randn(1, 12, 12, generator=g), "label": i % 3} for i in range(n)]
    return DataLoader(data, batch_size=batch_size, shuffle=False)


@pytest.fixture
def toy_method():
    """Register a toy method scoring channel ``i`` of every layer ``i + 1``; returns ``register(shared_scale)``.

    The list it returns with the name records the batch size of each call.
    """
    calls: list[int] = []

    def register(shared_scale: bool) -> list[int]:
        @register_method(TOY, shared_scale=shared_scale)
        def channel_index(model, inputs, select, layers, **_):
            calls.append(inputs.shape[0])
            select(model(inputs))  # the selection is callable on the model output
            return {
                name: (torch.arange(out_channels(m)) + 1.0).expand(inputs.shape[0], -1)
                for name, m in layers.items()
            }

        return calls

    yield register
    unregister_method(TOY)


@pytest.mark.parametrize("shared_scale", [True, False])
def test_a_registered_method_runs_through_channel_relevance_and_prune(toy_method, shared_scale):
    calls = toy_method(shared_scale)
    assert get_method(TOY).shared_scale is shared_scale and not get_method(TOY).data_free
    model = _net()
    rel = channel_relevance(model, _loader(), TOY, progress=False)
    assert calls == [4, 4] and rel.method == TOY and rel.num_samples == 8
    for name in ("0", "3", "6", "10"):
        torch.testing.assert_close(rel[name], torch.arange(out_channels(model.get_submodule(name))) + 1.0)

    # "auto" honours the trait: raw scores for a shared scale, per-layer means otherwise
    assert resolve_normalizer("auto", rel) == (None if shared_scale else "mean")
    results = {}
    for normalizer in ("auto", None, "mean"):
        results[normalizer] = prune(copy.deepcopy(model), rel, 0.5, normalizer=normalizer).channels
    assert results[None] != results["mean"]  # the two normalisers prune this net differently
    assert results["auto"] == results[None if shared_scale else "mean"]

    pruned = copy.deepcopy(model)
    result = prune(pruned, rel, 0.5)
    for module, direction, removed in result.history:
        if direction == "out" and module in ("0", "3", "6"):
            assert removed == list(range(len(removed))), (module, removed)  # lowest scores (indices) go first


def test_a_registered_method_runs_in_the_pruning_handler(toy_method):
    calls = toy_method(True)
    net = _net()
    original = copy.deepcopy(net)
    data = _loader()
    handler = RelevancePruningHandler(method=TOY, ratio=0.5, data=data, max_batches=1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=1e-3),
        loss_function=nn.CrossEntropyLoss(),
        train_handlers=[handler],
    )
    trainer.run()
    assert calls == [4]  # max_batches=1
    assert len(handler.history) == 1 and handler.history[0]["method"] == TOY
    # the scores do not depend on the weights: the handler prunes as prune() does on the untrained net, raw scores
    expected = prune(copy.deepcopy(original), handler.last_relevance, 0.5, normalizer=None).channels
    assert {n: net.get_submodule(n).out_channels for n in ("0", "3", "6")} == {
        n: expected[n][1] for n in ("0", "3", "6")
    }
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in original.parameters())


def test_unknown_method_lists_the_registered_names():
    with pytest.raises(ValueError, match=r"unknown relevance method 'nope'.*'dlb'.*'ig'.*'lrp'"):
        get_method("nope")
    with pytest.raises(ValueError, match=r"'nope'.*available: \[.*'taylor'"):
        channel_relevance(_net(), _loader(), "nope", progress=False)
    with pytest.raises(ValueError, match=r"'nope'.*'magnitude'"):
        RelevancePruningHandler(method="nope", ratio=0.5)


def test_unregister_removes_the_method(toy_method):
    toy_method(False)
    assert TOY in METHODS
    unregister_method(TOY)
    with pytest.raises(ValueError, match=TOY):
        channel_relevance(_net(), _loader(), TOY, progress=False)


def test_import_registers_every_method_with_its_traits():
    # a fresh interpreter: only `import monai_iaprune`, no method module imported by hand
    code = (
        "import monai_iaprune\n"
        "from monai_iaprune.relevance.registry import METHODS\n"
        "for n, s in sorted(METHODS.items()):\n"
        "    print(n, int(s.data_free), int(s.shared_scale), int(s.input_maps is not None))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, timeout=300
    ).stdout
    traits = {line.split()[0]: tuple(map(int, line.split()[1:])) for line in out.splitlines()}
    assert BUILT_IN <= set(traits), out
    assert {n for n in BUILT_IN if traits[n][0]} == {"magnitude", "random"}
    assert {n for n in BUILT_IN if traits[n][1]} == {"lrp", "ig", "taylor"}
    assert {n for n in BUILT_IN if traits[n][2]} == {"lrp", "ig"}
