"""The registry of relevance methods: each method registers itself, with all its traits, in its own module."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

SelectionFn = Callable[[torch.Tensor], torch.Tensor]


class RelevanceMethod(Protocol):
    """Per-batch relevance: ``{layer name: [B, C] per-sample, per-channel relevance}``.

    ``select(output)`` gives the 0/1 selection of the output being explained (see ``targets``).
    Data-free methods are called once with ``inputs=None`` and return ``[C]`` per layer.
    """

    def __call__(
        self,
        model: nn.Module,
        inputs: torch.Tensor | None,
        select: SelectionFn | None,
        layers: dict[str, nn.Module],
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]: ...


InputMapsFn = Callable[..., torch.Tensor]
"""``(model, inputs, selection, **options) -> maps`` of the inputs' shape: per-voxel input attribution."""

SessionFn = Callable[..., AbstractContextManager[RelevanceMethod]]
"""``(model, layers, **kwargs) -> context manager`` yielding the per-batch function used over many batches."""


@dataclass(frozen=True)
class RelevanceMethodSpec:
    """A registered relevance method and its traits; calling it calls ``fn``.

    Attributes:
        name: the name ``channel_relevance(..., method=name)`` takes.
        fn: the per-batch method (see ``RelevanceMethod``).
        data_free: scores come from the weights alone; ``fn`` is called once with ``inputs=None``.
        shared_scale: per-channel scores of different layers share one scale (shares of one explained
            output), so ``prune(normalizer="auto")`` ranks them raw across layers instead of per-layer means.
        input_maps: ``(model, inputs, selection, **options) -> maps``: input attribution maps for the
            explanation report, or None when the method gives none.
        session: ``(model, layers, **kwargs) -> context manager`` entered at the first batch and left after
            the last, yielding the per-batch function to call instead of ``fn`` (e.g. LRP keeps its canonizers
            and hooks applied over all batches of one ``channel_relevance`` call); None: ``fn`` per batch.
    """

    name: str
    fn: RelevanceMethod
    data_free: bool = False
    shared_scale: bool = False
    input_maps: InputMapsFn | None = None
    session: SessionFn | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self.fn(*args, **kwargs)

    def settings(self) -> tuple[str, ...]:
        """The keyword settings the method takes: the named options of ``fn`` (after ``model, inputs, select,
        layers``) and of ``session`` (after ``model, layers``). A ``**kwargs`` catch-all adds none: a method
        names every setting it reads."""
        names: list[str] = []
        for func, skip in ((self.fn, 4), (self.session, 2)):
            if func is None:
                continue
            params = list(inspect.signature(func).parameters.values())[skip:]
            names += [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        return tuple(sorted(set(names)))

    def check_settings(self, kwargs: Mapping[str, Any]) -> None:
        """Raise ValueError naming every key of ``kwargs`` the method does not take (a misspelt setting would
        otherwise be ignored silently), with the accepted names."""
        accepted = self.settings()
        unknown = sorted(k for k in kwargs if k not in accepted)
        if unknown:
            raise ValueError(
                f"relevance method {self.name!r} takes no setting(s) {unknown}; it accepts {list(accepted)}"
            )


METHODS: dict[str, RelevanceMethodSpec] = {}
"""Registered methods by name; complete after ``import monai_iaprune``."""


def register_method(
    name: str,
    *,
    data_free: bool = False,
    shared_scale: bool = False,
    input_maps: InputMapsFn | None = None,
    session: SessionFn | None = None,
) -> Callable[[RelevanceMethod], RelevanceMethod]:
    """Decorator registering a relevance method under ``name``; the decorated function is returned unchanged.

    Args:
        name: the method's name; a second registration under the same name replaces the first.
        data_free: see ``RelevanceMethodSpec``.
        shared_scale: see ``RelevanceMethodSpec``.
        input_maps: see ``RelevanceMethodSpec``.
        session: see ``RelevanceMethodSpec``.
    """

    def register(fn: RelevanceMethod) -> RelevanceMethod:
        METHODS[name] = RelevanceMethodSpec(name, fn, data_free, shared_scale, input_maps, session)
        return fn

    return register


def unregister_method(name: str) -> None:
    """Remove the method registered under ``name`` (no error when there is none)."""
    METHODS.pop(name, None)


def get_method(name: str) -> RelevanceMethodSpec:
    """The method registered under ``name``.

    Raises:
        ValueError: no such method; the message lists the registered names.
    """
    if name not in METHODS:
        raise ValueError(f"unknown relevance method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


def input_map_methods() -> tuple[str, ...]:
    """Names of the registered methods that give input attribution maps, sorted."""
    return tuple(sorted(n for n, spec in METHODS.items() if spec.input_maps is not None))


__all__ = [
    "METHODS",
    "InputMapsFn",
    "RelevanceMethod",
    "RelevanceMethodSpec",
    "SelectionFn",
    "get_method",
    "input_map_methods",
    "register_method",
    "unregister_method",
]
