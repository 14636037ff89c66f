"""Capture layer outputs and the gradients (or relevance) that flow back into them."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn

_Hooks = TypeVar("_Hooks", bound="LayerHooks")


class LayerHooks:
    """Context manager: the forward hook ``self._hook(name)`` on each of ``layers`` while inside ``with``.

    Args:
        layers: ``{name: module}`` to hook.
    """

    def __init__(self, layers: dict[str, nn.Module]):
        self.layers = layers
        self._handles: list = []

    def _hook(self, name: str) -> Callable:
        raise NotImplementedError

    def __enter__(self: _Hooks) -> _Hooks:
        for name, m in self.layers.items():
            self._handles.append(m.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class OutputRecorder(LayerHooks):
    """Forward hooks that keep each layer's output and, on backward, the gradient arriving at it.

    Under a zennit composite, that gradient *is* the layer's output relevance, because zennit's rule
    hooks return relevance in place of gradients.
    """

    def __init__(self, layers: dict[str, nn.Module], keep_grad: bool = True):
        super().__init__(layers)
        self.keep_grad = keep_grad
        self.outputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}

    def _hook(self, name: str) -> Callable:
        # the gradient hook lives in the autograd graph of ``output``, which ``self.outputs`` keeps: a
        # strong reference to ``self`` there would be a cycle through C++ that Python's garbage collector
        # cannot see, leaking every recorded activation (hundreds of MB per call on 3D networks)
        ref = weakref.ref(self)

        def fn(module, inputs, output):
            self.outputs[name] = output
            if self.keep_grad and output.requires_grad:

                def save(g, _name=name):
                    rec = ref()
                    if rec is not None:
                        rec.grads[_name] = g if _name not in rec.grads else rec.grads[_name] + g

                output.register_hook(save)

        return fn

    def clear(self) -> None:
        self.outputs.clear()
        self.grads.clear()


@contextmanager
def no_param_grad(model: nn.Module):
    """Temporarily stop gradients into parameters (relevance needs gradients to activations only)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
