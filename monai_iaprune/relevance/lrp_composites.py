"""LRP composites: which rule each layer of a network gets (the ``zennit.composites`` counterpart).

``LRP_COMPOSITES`` has the shape of zennit's ``COMPOSITES``: name -> ``Composite`` class, filled by the
``register_lrp_composite`` decorator; the classes take ``epsilon``, ``stabilizer`` and ``canonizers``. It is kept
apart from zennit's registry because two names (``"epsilon_plus_flat"``, ``"epsilon_alpha2beta1_flat"``) mean
zennit's composites with this package's rules prepended: rules for BatchNorm that could not be merged, for
LayerNorm / GroupNorm / InstanceNorm, and ``OutputRule`` versions of zennit's rules for linear / conv layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from monai.networks.blocks.activation import MemoryEfficientSwish, Mish, Swish
from torch import nn
from zennit.canonizers import Canonizer
from zennit.composites import (
    EpsilonAlpha2Beta1,
    EpsilonAlpha2Beta1Flat,
    LayerMapComposite,
    SpecialFirstLayerMapComposite,
    layer_map_base,
)
from zennit.core import Composite, Hook
from zennit.rules import Epsilon, Flat, ZPlus
from zennit.types import Activation, Convolution, ConvolutionStandard
from zennit.types import Linear as ZennitLinear

from monai_iaprune.relevance.lrp_rules import (
    NORM_TYPES,
    EpsilonRule,
    NormalizationEpsilon,
    PassRule,
    ZPlusRule,
)

__all__ = [
    "LRP_COMPOSITES",
    "AlphaBetaComposite",
    "EpsilonAlpha2Beta1FlatComposite",
    "EpsilonComposite",
    "EpsilonPlusFlatComposite",
    "ZPlusComposite",
    "make_composite",
    "register_lrp_composite",
]

LRP_COMPOSITES: dict[str, type[Composite]] = {}
"""Composite classes by name: ``"epsilon"`` (Epsilon on every conv / linear), ``"zplus"`` (ZPlus on every conv /
linear), ``"alpha_beta"`` (AlphaBeta(2, 1) on convs, Epsilon on dense layers), ``"epsilon_plus_flat"`` (Flat on
the first layer, ZPlus on convs, Epsilon on dense layers) and ``"epsilon_alpha2beta1_flat"``."""


def register_lrp_composite(name: str) -> Callable[[type[Composite]], type[Composite]]:
    """Class decorator registering a composite in ``LRP_COMPOSITES`` under ``name`` (as zennit's
    ``register_composite``); the class must take ``epsilon``, ``stabilizer`` and ``canonizers`` keywords."""

    def register(composite: type[Composite]) -> type[Composite]:
        LRP_COMPOSITES[name] = composite
        return composite

    return register


# element-wise activations zennit's ``Activation`` type does not list (MONAI's own, and torch's Mish)
EXTRA_ACTIVATIONS = (Swish, MemoryEfficientSwish, Mish, nn.Mish)


def _extra_layer_map(epsilon: float) -> list[tuple[Any, Hook]]:
    return [
        (nn.modules.batchnorm._BatchNorm, EpsilonRule(epsilon)),
        (NORM_TYPES, NormalizationEpsilon(epsilon)),
        ((Activation, *EXTRA_ACTIVATIONS), PassRule()),
    ]


def _layer_map(epsilon: float, stabilizer: float, rules: list[tuple[Any, Hook]]) -> list[tuple[Any, Hook]]:
    return _extra_layer_map(epsilon) + layer_map_base(stabilizer) + rules


# layers the output-rule versions of zennit's rules cover; transposed convolutions keep zennit's own rules
_OUTPUT_RULE_TYPES = (nn.Linear, ConvolutionStandard)


class _PackageComposite:
    """The constructor every composite here shares; ``_maps`` says what the zennit base class gets besides
    ``canonizers``. By default that is a zennit composite that takes ``epsilon`` / ``stabilizer`` and prepends
    ``layer_map`` (this package's rules) to its own map.

    Args:
        epsilon: epsilon of the Epsilon rule (and of the normalisation rules).
        stabilizer: stabiliser of the other rules (ZPlus, AlphaBeta, Flat, Norm on sums and average pools).
        canonizers: canonizers applied before the rules are registered.
    """

    def __init__(
        self, epsilon: float = 1e-6, stabilizer: float = 1e-6, canonizers: list[Canonizer] | None = None
    ):
        super().__init__(canonizers=canonizers, **self._maps(epsilon, stabilizer))

    @staticmethod
    def _maps(epsilon: float, stabilizer: float) -> dict[str, Any]:
        return {"epsilon": epsilon, "stabilizer": stabilizer, "layer_map": _extra_layer_map(epsilon)}


@register_lrp_composite("epsilon")
class EpsilonComposite(_PackageComposite, LayerMapComposite):
    """Epsilon on every linear / conv layer (``stabilizer``: only Norm on sums and average pools)."""

    @staticmethod
    def _maps(epsilon: float, stabilizer: float) -> dict[str, Any]:
        rules = [(_OUTPUT_RULE_TYPES, EpsilonRule(epsilon)), (ZennitLinear, Epsilon(epsilon=epsilon))]
        return {"layer_map": _layer_map(epsilon, stabilizer, rules)}


@register_lrp_composite("zplus")
class ZPlusComposite(_PackageComposite, LayerMapComposite):
    """ZPlus on every linear / conv layer (``epsilon``: only the normalisation rules)."""

    @staticmethod
    def _maps(epsilon: float, stabilizer: float) -> dict[str, Any]:
        rules = [(_OUTPUT_RULE_TYPES, ZPlusRule(stabilizer)), (ZennitLinear, ZPlus(stabilizer=stabilizer))]
        return {"layer_map": _layer_map(epsilon, stabilizer, rules)}


@register_lrp_composite("epsilon_plus_flat")
class EpsilonPlusFlatComposite(_PackageComposite, SpecialFirstLayerMapComposite):
    """zennit's ``EpsilonPlusFlat`` (Flat on the first layer, ZPlus on convs, Epsilon on dense layers) with its
    ZPlus / Epsilon as output rules (same values, see tests/test_lrp.py).
    """

    @staticmethod
    def _maps(epsilon: float, stabilizer: float) -> dict[str, Any]:
        rules = [
            (ConvolutionStandard, ZPlusRule(stabilizer)),
            (Convolution, ZPlus(stabilizer=stabilizer)),
            (nn.Linear, EpsilonRule(epsilon)),
        ]
        return {
            "layer_map": _layer_map(epsilon, stabilizer, rules),
            "first_map": [(ZennitLinear, Flat(stabilizer=stabilizer))],
        }


@register_lrp_composite("alpha_beta")
class AlphaBetaComposite(_PackageComposite, EpsilonAlpha2Beta1):
    """zennit's ``EpsilonAlpha2Beta1`` (AlphaBeta(2, 1) on convs, Epsilon on dense layers) with this package's
    rules for BatchNorm, normalisation layers and activations.
    """


@register_lrp_composite("epsilon_alpha2beta1_flat")
class EpsilonAlpha2Beta1FlatComposite(_PackageComposite, EpsilonAlpha2Beta1Flat):
    """zennit's ``EpsilonAlpha2Beta1Flat`` with this package's rules for BatchNorm, normalisation layers and
    activations.
    """


def make_composite(
    composite: str | Composite,
    epsilon: float = 1e-6,
    stabilizer: float = 1e-6,
    canonizers: Sequence[Canonizer] = (),
) -> Composite:
    """Build a named composite with the given canonizers (or return a given zennit ``Composite`` unchanged).

    Args:
        composite: a name in ``LRP_COMPOSITES`` or a zennit ``Composite`` instance.
        epsilon: epsilon of the Epsilon rule (and of the normalisation rules).
        stabilizer: stabiliser of the other rules (ZPlus, AlphaBeta, Flat, Norm on sums and average pools).
        canonizers: canonizers the composite applies before registering its rules.
    """
    if isinstance(composite, Composite):
        return composite
    if not isinstance(composite, str) or composite not in LRP_COMPOSITES:
        raise ValueError(
            f"unknown LRP composite {composite!r}; available: {sorted(LRP_COMPOSITES)} or a zennit Composite"
        )
    return LRP_COMPOSITES[composite](epsilon=epsilon, stabilizer=stabilizer, canonizers=list(canonizers))
