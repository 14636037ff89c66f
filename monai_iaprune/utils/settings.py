"""Strict checks of user settings (config values, command-line overrides), each error naming the setting.

MONAI's command line hands ``--overwrite false`` to a config as the *string* ``"false"``, which Python treats as
true; every boolean setting goes through ``as_bool``.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["as_bool", "check_int", "check_number", "check_ratio"]

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


def as_bool(value: Any, name: str = "setting") -> bool:
    """``value`` as a bool: a bool, 0 / 1, or ``true/false/1/0/yes/no`` in any case; anything else raises.

    Args:
        value: the setting's value (from a config or the command line).
        name: the setting's name, for the error message.

    Raises:
        ValueError: ``value`` is none of the accepted spellings.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"bad {name} {value!r}: use true or false (also 1/0, yes/no)")


def check_ratio(value: Any, name: str = "ratio") -> float:
    """``value`` as a float strictly between 0 and 1 (the fraction of parameters to remove)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ValueError(
            f"bad {name} {value!r}: the fraction of parameters to remove must lie strictly between 0 and 1"
        )
    return float(value)


def check_int(value: Any, name: str, minimum: int = 1, allow_none: bool = False) -> int | None:
    """``value`` as an integer >= ``minimum`` (or None when ``allow_none``)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"bad {name} {value!r}: need an integer >= {minimum}" + (" or null" if allow_none else "")
        )
    return value


def _range_text(minimum: float | None, maximum: float | None, min_open: bool, max_open: bool) -> str:
    if minimum is not None and maximum is not None:
        return f"{'(' if min_open else '['}{minimum:g}, {maximum:g}{')' if max_open else ']'}"
    if minimum is not None:
        return f"{'>' if min_open else '>='} {minimum:g}"
    return f"{'<' if max_open else '<='} {maximum:g}" if maximum is not None else "any finite number"


def check_number(
    value: Any,
    name: str,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    min_open: bool = False,
    max_open: bool = False,
    allow_none: bool = False,
) -> float | None:
    """``value`` as a finite float within ``[minimum, maximum]`` (``min_open`` / ``max_open`` exclude the ends).

    Raises:
        ValueError: a bool, a non-number, NaN / Inf or a value out of range; the message names the setting and the
            accepted range.
    """
    if value is None and allow_none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
    if ok and minimum is not None:
        ok = value > minimum if min_open else value >= minimum
    if ok and maximum is not None:
        ok = value < maximum if max_open else value <= maximum
    if not ok:
        accepted = _range_text(minimum, maximum, min_open, max_open)
        raise ValueError(
            f"bad {name} {value!r}: need a number {accepted}" + (" or null" if allow_none else "")
        )
    return float(value)
