"""PLLaVA's frame-index rules (``get_index``): which frames of a clip the model sees."""
from __future__ import annotations

import math

import numpy as np

# frames one video may ask for: far above any model's (PLLaVA: 16), far below a list that
# would fill memory (10**9 indices are ~30 GB of Python ints)
MAX_SEGMENTS = 1 << 16


def sample_indices(num_frames_total: int, num_segments: int, *, fps: float | None = None,
                   start: float | None = None, end: float | None = None) -> list[int]:
    """PLLaVA's frame indices: the midpoints of ``num_segments`` equal segments.

    Without time bounds (the chat/demo rule): ``seg = (n - 1) / k`` and frame
    ``i -> int(seg / 2) + int(round(seg * i))``.
    With ``start``/``end`` in seconds (the evaluation rule, needs ``fps``):
    ``s = max(0, round(start * fps))``, ``e = min(round(end * fps), n - 1)``,
    ``seg = (e - s) / k`` and ``i -> int(s + seg / 2 + round(seg * i))``. A missing bound means
    the clip's start or end. Every ``round`` rounds half to even (numpy's and Python's).
    Without bounds both rules give the same indices, so ``fps`` alone changes nothing.

    Returns ``num_segments`` non-decreasing indices in ``[0, n - 1]`` (repeats when k > n).
    """
    n, k = num_frames_total, num_segments
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_frames_total must be an int >= 1, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"num_segments must be an int >= 1, got {k!r}")
    n, k = int(n), int(k)
    if k > MAX_SEGMENTS:
        raise ValueError(f"num_segments={k} is more frames than any model samples (at most "
                         f"{MAX_SEGMENTS})")
    for name, t in (("start", start), ("end", end)):
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float, np.number))):
            raise ValueError(f"{name} must be a time in seconds, got {t!r}")
    if start is None and end is None:
        seg = float(n - 1) / k
        first = int(seg / 2)
        return [first + int(np.round(seg * i)) for i in range(k)]

    try:
        rate = float(fps)
    except (TypeError, ValueError):
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"time bounds need a positive finite fps, got fps={fps!r}")
    fps = rate
    for name, t in (("start", start), ("end", end)):
        if t is not None and not (math.isfinite(t) and t >= 0):
            raise ValueError(f"{name} must be a finite time >= 0 seconds, got {t!r}")
    if start is not None and end is not None and end < start:
        raise ValueError(f"end ({end} s) is before start ({start} s)")
    duration = n / fps
    s = 0 if start is None else max(0, int(np.round(start * fps)))
    e = n - 1 if end is None else min(int(np.round(end * fps)), n - 1)
    if s > n - 1:
        raise ValueError(f"start={start} s is outside the clip ({n} frames, {duration:.3f} s at "
                         f"{fps:g} fps)")
    if e < s:
        raise ValueError(f"the interval [{start}, {end}] s holds no frame of the clip ({n} "
                         f"frames at {fps:g} fps)")
    seg = float(e - s) / k
    return [int(s + seg / 2 + np.round(seg * i)) for i in range(k)]
