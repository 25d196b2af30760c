"""Argument checks shared by every layer: one message style, no silent truncation.

A bool is not an int here (``True`` would pass ``isinstance(x, int)``), and a float is not an int
even when it looks like one (``2.5`` must not become ``2``). Messages name the argument and what
was expected, so the CLI can print them as they are.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence


def is_int(value) -> bool:
    """True for ints (Python, numpy, 0-d integer tensors' ``.item()``), False for bools and floats."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(name: str, value, *, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, or ValueError naming ``name``."""
    if not is_int(value):
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def int_tuple(name: str, value, n: int, *, minimum: int = 1) -> tuple[int, ...]:
    """``value`` as a tuple of ``n`` ints >= ``minimum`` (e.g. pooling_shape), or ValueError."""
    try:
        vals = () if isinstance(value, (str, bytes)) else tuple(value)
    except TypeError:
        vals = ()
    if len(vals) != n or not all(is_int(v) for v in vals) or any(int(v) < minimum for v in vals):
        raise ValueError(f"{name} must be {n} ints >= {minimum}, got {value!r}")
    return tuple(int(v) for v in vals)


def finite_float(name: str, value, *, minimum: float | None = None, positive: bool = False,
                 allow_none: bool = False) -> float | None:
    """``value`` as a finite float (optionally >= ``minimum`` or > 0), or ValueError."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value!r}")
    return v


def one_of(name: str, value, choices: Sequence) -> object:
    """``value`` if it is one of ``choices``, else ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
