"""Evaluator-side collection of per-channel relevance over the batches an evaluator runs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import CommonKeys, IgniteInfo, convert_to_tensor, min_version, optional_import
from torch import nn

from monai_iaprune.relevance.collect import ChannelRelevance, channel_relevance
from monai_iaprune.relevance.distributed import all_reduce_sums
from monai_iaprune.relevance.registry import get_method
from monai_iaprune.utils.ddp import is_distributed, unwrap_network
from monai_iaprune.utils.settings import as_bool, check_int

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:  # annotations only
    from ignite.engine import Engine

__all__ = ["RelevanceCollector", "model_fingerprint"]


@torch.no_grad()
def model_fingerprint(model: nn.Module) -> tuple:
    """Cheap identity of a model's current architecture and weights (changes with any training step or pruning)."""
    params = list(model.parameters())
    shapes = tuple(tuple(p.shape) for p in params)
    total = float(sum(p.detach().double().abs().sum() for p in params)) if params else 0.0
    return shapes, total


def _image_label(output: Any) -> tuple[Any, Any]:
    """Default ``output_transform``: the evaluator's prepared ``image`` and ``label`` from ``engine.state.output``."""
    if isinstance(output, dict):
        return output[CommonKeys.IMAGE], output.get(CommonKeys.LABEL)
    if isinstance(output, list) and output and isinstance(output[0], dict):  # decollated by postprocessing
        image = torch.stack([convert_to_tensor(o[CommonKeys.IMAGE], track_meta=False) for o in output])
        labels = [o.get(CommonKeys.LABEL) for o in output]
        label = None if any(v is None for v in labels) else torch.stack([torch.as_tensor(v) for v in labels])
        return image, label
    raise TypeError(
        f"cannot read image / label from engine.state.output of type {type(output).__name__}; pass output_transform"
    )


class RelevanceCollector:
    """Accumulate per-channel relevance of the evaluator's network over the batches the evaluator runs.

    On each iteration the batch's (prepared) inputs are explained again with the evaluator's network, in a
    separate forward/backward pass under ``torch.enable_grad()`` (evaluators run without gradients). The
    sums are reset when an evaluation epoch starts, so ``relevance`` always describes the latest run.

    Args:
        method: relevance method, one of ``monai_iaprune.relevance.METHODS`` (``"lrp"``, ``"ig"``, ``"dlb"``,
            ``"taylor"``, ...); data-free methods (``"magnitude"``, ``"random"``) are refused: they need no evaluator.
        target: what is explained (see ``monai_iaprune.relevance.targets``): ``"label"``, ``"pred"``, a class
            index or a callable.
        layers: qualified layer names to score; default every conv / linear layer.
        relevance_kwargs: passed to the method (e.g. ``composite`` for LRP, ``n_steps`` for IG).
        absolute: accumulate ``|per-sample relevance|`` (default), as ``channel_relevance`` does.
        max_batches: explain at most this many batches per evaluation epoch (None: all).
        image_key, label_key: keys of the ``(image, label)`` pair handed to ``channel_relevance``.
        output_transform: ``engine.state.output -> (image, label)``; default reads the evaluator's
            ``"image"`` and ``"label"`` entries (also after decollating postprocessing).
        name: identifier of logging.logger to use, if None, defaulting to ``engine.logger``.

    Note:
        ``sums`` (``{layer: float64 tensor}``) and ``count`` are kept separately so that distributed runs can
        all-reduce them: under ``torch.distributed`` each rank explains its shard of the evaluator's data (a
        ``DistributedSampler``), and when the evaluation epoch completes the sums and counts are summed over
        ranks, so every rank's ``relevance`` equals one process's over the union of the shards. The evaluator
        must therefore run on every rank (as ignite's metric synchronisation needs anyway). ``example_input``
        stays the rank's own first batch (None on a rank that saw none).
    """

    def __init__(
        self,
        method: str = "lrp",
        target: Any = "label",
        layers: Sequence[str] | None = None,
        relevance_kwargs: dict | None = None,
        absolute: bool = True,
        max_batches: int | None = None,
        image_key: str = "image",
        label_key: str = "label",
        output_transform: Callable[[Any], tuple[Any, Any]] = _image_label,
        name: str | None = None,
    ) -> None:
        if get_method(method).data_free:
            raise ValueError(
                f"method {method!r} needs no data, so there is nothing to collect on an evaluator"
            )
        if relevance_kwargs is not None and not isinstance(relevance_kwargs, dict):
            raise TypeError(f"relevance_kwargs must be a dict, got {type(relevance_kwargs).__name__}")
        get_method(method).check_settings(relevance_kwargs or {})
        if not callable(output_transform):
            raise TypeError(f"output_transform must be callable but is {type(output_transform).__name__}.")
        self.method = method
        self.target = target
        self.layers = list(layers) if layers is not None else None
        self.relevance_kwargs = dict(relevance_kwargs or {})
        self.absolute = as_bool(absolute, "absolute")
        self.max_batches = check_int(max_batches, "max_batches", allow_none=True)
        self.batches = 0
        self.image_key = image_key
        self.label_key = label_key
        self.output_transform = output_transform
        self.logger = logging.getLogger(name)
        self._name = name
        self.engine: Engine | None = None
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.example_input: torch.Tensor | None = None
        self.fingerprint: tuple | None = None

    def attach(self, engine: Engine) -> None:
        """Attach to a MONAI ``SupervisedEvaluator`` (anything with ``network`` and ``state.output``)."""
        if self.engine is not None and self.engine is not engine:
            raise RuntimeError("this RelevanceCollector is already attached to another engine")
        if self._name is None:
            self.logger = engine.logger
        if not engine.has_event_handler(self.reset, Events.EPOCH_STARTED):
            engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        if not engine.has_event_handler(self, Events.ITERATION_COMPLETED):
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        if not engine.has_event_handler(self._completed, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._completed)
        self.engine = engine

    def reset(self, engine: Engine | None = None) -> None:
        """Forget everything collected (called when an evaluation epoch starts)."""
        self.sums = {}
        self.count = 0
        self.batches = 0
        self.example_input = None
        self.fingerprint = None

    def update(self, network: nn.Module, image: Any, label: Any = None) -> None:
        """Add the relevance of one batch ``image`` (with ``label``) under ``network`` to the sums."""
        # a normal tensor, even from inference mode
        image = convert_to_tensor(image, track_meta=False).detach().clone()
        if label is not None:
            label = convert_to_tensor(label, track_meta=False).detach().clone()
        with torch.enable_grad():
            rel = channel_relevance(
                network,
                [(image, label)],
                self.method,
                layers=self.layers,
                target=self.target,
                absolute=self.absolute,
                progress=False,
                **self.relevance_kwargs,
            )
        n = rel.num_samples
        for layer, mean in rel.items():
            s = mean.double() * n
            self.sums[layer] = s if layer not in self.sums else self.sums[layer] + s
        self.count += n
        if self.example_input is None:
            self.example_input = rel.example_input

    def __call__(self, engine: Engine) -> None:
        """Explain the evaluator's current ``state.output`` batch."""
        if self.max_batches is not None and self.batches >= self.max_batches:
            return
        self.batches += 1
        image, label = self.output_transform(engine.state.output)
        self.update(unwrap_network(engine.network), image, label)

    def _completed(self, engine: Engine) -> None:
        if is_distributed():
            own = self.count
            self.sums, self.count = all_reduce_sums(self.sums, self.count)
            self.logger.info(
                f"all-reduced relevance sums over ranks: {own} samples here, {self.count} in all"
            )
        self.fingerprint = model_fingerprint(unwrap_network(engine.network))
        self.logger.info(f"collected {self.method} channel relevance on {self.count} samples")

    def is_current(self, network: nn.Module) -> bool:
        """Whether a finished collection exists for ``network`` exactly as it is now (same shapes and weights)."""
        return (
            self.count > 0 and self.fingerprint is not None and self.fingerprint == model_fingerprint(network)
        )

    @property
    def relevance(self) -> ChannelRelevance:
        """Mean per-channel relevance over the collected samples (``sums / count``)."""
        if self.count == 0:
            raise RuntimeError(
                "no relevance collected yet: run the evaluator this RelevanceCollector is attached to"
            )
        values = {k: (v / self.count).float() for k, v in self.sums.items()}
        return ChannelRelevance(values, self.method, self.count, self.example_input)
