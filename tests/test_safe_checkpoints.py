"""Checkpoints never run code when loaded (issue #13, finding 2): every load is ``weights_only=True``."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from monai.networks.nets import DenseNet, SegResNet

from monai_iaprune import channel_relevance, prune
from monai_iaprune.bundle import load_network, load_state_dict
from monai_iaprune.pruning.checkpoint import load_pruned, pruned_structure, save_pruned


class _RunsCode:
    """Pickles as a call of ``os.makedirs(marker)``: loading it with pickle creates the folder."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _tiny_densenet() -> torch.nn.Module:
    return DenseNet(2, 1, 2, init_features=8, growth_rate=4, block_config=(1, 1), bn_size=2)


def test_state_dict_checkpoint_with_a_pickled_call_is_refused(tmp_path: Path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "model.pt"
    net = _tiny_densenet()
    torch.save({"model": net.state_dict(), "payload": _RunsCode(marker)}, path)
    with pytest.raises(ValueError, match="model.pt"):
        load_state_dict(_tiny_densenet(), path)
    with pytest.raises(ValueError, match="weights_only"):
        load_network(_tiny_densenet(), path)
    assert not marker.exists()
    # the same weights without the payload load fine
    torch.save({"model": net.state_dict()}, path)
    loaded = load_state_dict(_tiny_densenet(), path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))


def _pruned(net: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    rel = channel_relevance(net, None, "magnitude", progress=False)
    prune(net, rel, 0.4, target="channels", example_inputs=x)
    return net.eval()


def test_legacy_pruned_file_with_a_pickled_module_never_unpickles_it(tmp_path: Path):
    """Format 1 stored the module pickled as bytes; ``load_pruned(path)`` without a network ran that pickle."""
    marker = tmp_path / "code_ran"
    x = torch.randn(1, 1, 16, 16)
    net = _pruned(_tiny_densenet(), x)
    buf = io.BytesIO()
    torch.save(_RunsCode(marker), buf)
    legacy = {
        "format": "monai_iaprune.pruned/1",
        "state_dict": net.state_dict(),
        "pruned_structure": pruned_structure(net),
        "extra": {},
        "module": buf.getvalue(),
    }
    path = tmp_path / "legacy.pt"
    torch.save(legacy, path)
    with pytest.raises(ValueError, match="network_def"):
        load_pruned(path)
    loaded = load_pruned(path, _tiny_densenet())
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert not marker.exists()


def test_pruned_file_holds_no_pickled_module_and_loads_safely(tmp_path: Path):
    x = torch.randn(1, 1, 16, 16, 16)

    def make() -> torch.nn.Module:
        return SegResNet(3, 8, 1, 2, norm="BATCH", blocks_down=(1, 1), blocks_up=(1,))

    net = _pruned(make(), x)
    path = save_pruned(net, tmp_path / "seg.pt", extra={"method": "magnitude"})
    raw = torch.load(path, weights_only=True)  # SegResNet's UpsampleMode enum is stored as its plain value
    assert "module" not in raw
    assert raw["format"] == "monai_iaprune.pruned/2"
    loaded = load_network(make(), path)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_extra_that_a_safe_load_would_refuse_is_rejected_at_save(tmp_path: Path):
    net = _pruned(_tiny_densenet(), torch.randn(1, 1, 16, 16))
    with pytest.raises(TypeError, match=r"extra\['when'\]"):
        save_pruned(net, tmp_path / "p.pt", extra={"when": object()})
    assert not (tmp_path / "p.pt").exists()


def test_pruned_checkpoint_of_another_network_names_the_file(tmp_path: Path):
    from monai.networks.nets import resnet10

    x = torch.randn(1, 1, 16, 16)
    save_pruned(_pruned(_tiny_densenet(), x), tmp_path / "pruned.pt")
    other = resnet10(spatial_dims=2, n_input_channels=1, num_classes=2, widen_factor=0.25)
    with pytest.raises(
        ValueError, match=r"pruned checkpoint '.*pruned.pt' does not fit network_def: .*ResNet"
    ):
        load_pruned(tmp_path / "pruned.pt", network_def=other)
