"""Argument checks shared by every layer: one message style, no silent truncation.

A bool is not an int here (``True`` would pass ``isinstance(x, int)``), and a float is not an int
even when it looks like one (``2.5`` must not become ``2``). Messages name the argument and what
was expected, so the CLI can print them as they are.
"""
from __future__ import annotations

import errno
import math
import numbers
import os
import stat
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


def power_of_two(name: str, value, *, minimum: int = 1) -> int:
    """``value`` as an int that is a power of two >= ``minimum``, or ValueError naming ``name``."""
    if not is_int(value) or int(value) < minimum or int(value) & (int(value) - 1):
        raise ValueError(f"{name} must be a power of two >= {minimum}, got {value!r}")
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


def time_span(start, end, where: str = "") -> tuple[float | None, float | None]:
    """(start, end) in seconds as finite floats >= 0 (None: the video's own start / end), end
    after start, or ValueError prefixed with ``where`` (a list line, say)."""
    prefix = f"{where}: " if where else ""
    try:
        start = finite_float("start", start, minimum=0, allow_none=True)
        end = finite_float("end", end, minimum=0, allow_none=True)
    except ValueError as exc:
        raise ValueError(f"{prefix}{exc}") from None
    if start is not None and end is not None and end <= start:
        raise ValueError(f"{prefix}end ({end:g} s) must be after start ({start:g} s)")
    return start, end


def one_of(name: str, value, choices: Sequence) -> object:
    """``value`` if it is one of ``choices``, else ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def flag(name: str, value) -> bool:
    """``value`` if it is a bool (numpy's too), else ValueError: ``"no"`` or ``2`` are not flags."""
    if isinstance(value, bool) or type(value).__name__ in ("bool_", "bool"):  # numpy 1 / 2
        return bool(value)
    raise ValueError(f"{name} must be True or False, got {value!r}")


def host_memory_available() -> int | None:
    """Bytes of host memory available now (Linux MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# below this many bytes an allocation is not checked: the check itself would cost more than the
# few calls that could fail
_CHECKED_BYTES = 1 << 28


def allocation(what: str, nbytes: int, device=None) -> None:
    """ValueError when an op is about to allocate ``nbytes`` on ``device`` (a torch.device or
    None for the host) and they are not there: e.g. a pooling_shape of (1000, 1000, 1000) asks for
    tens of GiB, which must be a message naming the argument, not an allocator failure after a
    minute of swapping. Small allocations pass unchecked."""
    if nbytes < _CHECKED_BYTES:
        return
    available = None
    if device is not None and getattr(device, "type", "cpu") == "cuda":
        import torch

        available = torch.cuda.mem_get_info(device)[0]
    elif device is None or getattr(device, "type", "cpu") == "cpu":
        available = host_memory_available()
    if available is not None and nbytes > available:
        raise ValueError(f"{what} would allocate {nbytes / 2**30:.1f} GiB, but only "
                         f"{available / 2**30:.1f} GiB of memory is available")


def check_path(path: str, what: str, *, folder: bool = True) -> os.stat_result:
    """``path``'s stat: FileNotFoundError when it does not exist, ValueError for a symbolic link
    loop, an unreadable entry, or anything that is neither a regular file nor (when ``folder``) a
    directory: a FIFO or a device would block the reader or never end."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{what} {path}: a symbolic link loop (too many levels of links)") from None
        raise ValueError(f"{what} {path}: cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode) and not folder:
        raise ValueError(f"{what} {path} is a folder: expected a file")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise ValueError(f"{what} {path} is not a regular file (a device, FIFO or socket)")
    return st
