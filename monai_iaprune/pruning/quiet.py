"""Silence one known, harmless message of torch-pruning's MACs counter.

``torch_pruning.utils.op_counter`` (a copy of ptflops) prints "Warning: variables __flops__ or __params__
are already defined for the module<Type> ptflops can affect your code!" to stdout each time ``nn.Module.apply``
reaches a module a second time. MONAI nets share module instances between parents (DynUNet's
``skip_layers`` re-reference its encoder / decoder blocks, SegResNet reuses one activation), so every
``count_macs`` call prints one line per shared module, and ``prune()`` counts MACs many times.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Iterator

from torch_pruning.utils import op_counter

PTFLOPS_REDEFINED = "Warning: variables __flops__ or __params__ are already defined"


@contextlib.contextmanager
def quiet_op_counter() -> Iterator[None]:
    """Drop the "__flops__ or __params__ are already defined" lines of torch-pruning's op counter.

    Only ``print`` calls made from ``torch_pruning.utils.op_counter`` whose text starts with that message
    are dropped; its other messages and all other output pass through. Nesting is safe.

    Example:
        ``with quiet_op_counter(): macs, params = tp.utils.count_ops_and_params(model, x)``
    """
    had = "print" in vars(op_counter)
    previous = vars(op_counter).get("print", builtins.print)

    def _print(*args, **kwargs) -> None:
        if args and isinstance(args[0], str) and args[0].startswith(PTFLOPS_REDEFINED):
            return
        previous(*args, **kwargs)

    op_counter.print = _print  # module global shadows the builtin inside op_counter only
    try:
        yield
    finally:
        if had:
            op_counter.print = previous
        else:
            del op_counter.print


__all__ = ["PTFLOPS_REDEFINED", "quiet_op_counter"]
