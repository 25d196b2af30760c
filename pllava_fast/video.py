"""Frame sampling and video decoding: PLLaVA's frame-index rules and a PyAV reader that decodes
only the sampled frames and hands back raw YUV planes (colour conversion happens in the batched
preprocessing op, not here).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

__all__ = ["DecodedVideo", "VideoDecodeError", "sample_indices"]


class VideoDecodeError(ValueError):
    """A source could not be decoded as requested (not media, corrupt, no video frames, ...)."""


@dataclasses.dataclass
class DecodedVideo:
    """Sampled frames of one video.

    Exactly one representation is set: ``rgb`` for ``pixel_format == "rgb24"``, or the planes
    ``y``/``u``/``v`` for ``pixel_format == "yuv420p"`` (``color_matrix``/``color_range`` then say
    how to turn them into RGB; for rgb24 they describe the source and are informational).

    Shapes (T = sampled frames, all uint8 CPU tensors, contiguous):
      rgb: (T, H, W, 3);  y: (T, H, W);  u, v: (T, (H + 1) // 2, (W + 1) // 2)
    ``indices[t]`` is the position of frame t in the stream's presentation order (0-based),
    ``num_frames_total`` the number of frames of the stream, ``fps`` its average rate (None for
    a single image).
    """

    source: str
    indices: list[int]
    fps: float | None
    num_frames_total: int
    pixel_format: str  # "rgb24" | "yuv420p"
    rgb: torch.Tensor | None = None
    y: torch.Tensor | None = None
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    color_matrix: str = "bt601"  # "bt601" | "bt709"
    color_range: str = "limited"  # "limited" | "full"

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def height(self) -> int:
        return int((self.rgb if self.rgb is not None else self.y).shape[1])

    @property
    def width(self) -> int:
        return int((self.rgb if self.rgb is not None else self.y).shape[2])


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
    if start is None and end is None:
        seg = float(n - 1) / k
        first = int(seg / 2)
        return [first + int(np.round(seg * i)) for i in range(k)]

    if fps is None or not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"time bounds need a positive finite fps, got fps={fps!r}")
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
