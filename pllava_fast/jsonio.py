"""JSON that is always valid JSON: NaN and infinities (which ``json.dumps`` writes as bare
``NaN`` / ``Infinity``, rejected by strict parsers) become null, tensors and paths plain values."""
from __future__ import annotations

import json
import math
import os


def finite(obj):
    """``obj`` with every non-finite float replaced by None (dicts, lists and tuples walked)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _default(obj):
    if hasattr(obj, "tolist"):  # tensors and numpy values
        return finite(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def dumps(obj, **kwargs) -> str:
    """``json.dumps`` of ``finite(obj)``, strict (``allow_nan=False``), UTF-8 kept as text.

    A path with bytes that are not UTF-8 (Python holds them as lone surrogates) cannot be
    written as UTF-8 text: such a line is written with ASCII escapes instead (``"\\udcff"``), which
    reads back as the same str, so the row still matches its input path."""
    kwargs.setdefault("ensure_ascii", False)
    text = json.dumps(finite(obj), allow_nan=False, default=_default, **kwargs)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        kwargs["ensure_ascii"] = True
        text = json.dumps(finite(obj), allow_nan=False, default=_default, **kwargs)
    return text
