"""Decoded frames as tensors: ``DecodedVideo``, the YUV / RGB conversions of one PyAV frame,
and the assembly of kept frames (rotation applied)."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

# AVColorSpace values swscale treats as BT.601 (unspecified, BT470BG, SMPTE170M) and BT.709.
# 8-bit 4:2:0 streams tagged with any other matrix (BT.2020, FCC, ...) go to rgb24 via swscale.
_BT601_SPACES = frozenset({2, 5, 6})
_BT709_SPACES = frozenset({1})
_YUV420_FORMATS = frozenset({"yuv420p", "yuvj420p", "nv12"})
_JPEG_RANGE = 2  # AVCOL_RANGE_JPEG


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
    ``indices[t]`` is frame t's index in the stream's numbering and ``num_frames_total`` the
    stream's frame count in it: ``numbering="decord"`` (the original PLLaVA's: decord 0.6.0's
    ``len(vr)`` and the pictures its ``get_batch`` returns, see ``decord_order``) or
    ``"presentation"`` (the i-th frame of a full sequential decode). ``frames[t]`` is the
    presentation position of the picture frame t holds (equal to ``indices`` in presentation
    numbering). ``fps``: the average rate (None for a single image).
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
    numbering: str = "presentation"  # "decord" | "presentation"
    frames: list[int] | None = None  # presentation positions of the pictures (None: = indices)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def height(self) -> int:
        return int((self.rgb if self.rgb is not None else self.y).shape[1])

    @property
    def width(self) -> int:
        return int((self.rgb if self.rgb is not None else self.y).shape[2])


def _quarter_turns(rotation) -> int:
    """Counterclockwise quarter turns that display a frame whose display matrix rotates by
    ``rotation`` degrees counterclockwise (PyAV's ``VideoFrame.rotation``; FFmpeg's autorotate
    applies the same turn). Rotations that are not multiples of 90 degrees round to the nearest."""
    return int(round((rotation or 0) / 90.0)) % 4


def _plane_array(plane) -> np.ndarray:
    """One frame plane as an (h, w) uint8 copy, without the line padding."""
    arr = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
    return arr[:, :plane.width].copy()


def _yuv_tags(frame) -> tuple[str, str] | None:
    """(color_matrix, color_range) when the frame can stay 8-bit YUV 4:2:0, else None."""
    fmt = frame.format.name
    if fmt not in _YUV420_FORMATS:
        return None
    space = int(frame.colorspace)
    if space in _BT601_SPACES:
        matrix = "bt601"
    elif space in _BT709_SPACES:
        matrix = "bt709"
    else:
        return None
    full = fmt == "yuvj420p" or int(frame.color_range) == _JPEG_RANGE
    return matrix, ("full" if full else "limited")


def frame_to_rgb(frame) -> np.ndarray:
    """swscale's rgb24 (H, W, 3) of a decoded frame, honouring its matrix and range tags
    (untagged YUV is BT.601 limited range, yuvj* full range, as FFmpeg assumes)."""
    rng = int(frame.color_range)
    return frame.to_ndarray(format="rgb24", src_color_range=rng if rng else None)


def frame_to_yuv420(frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y (H, W), U and V ((H+1)//2, (W+1)//2) of an 8-bit 4:2:0 frame; nv12 is deinterleaved by
    swscale's unscaled copy (lossless)."""
    if frame.format.name == "nv12":
        frame = frame.reformat(format="yuv420p")
    y, u, v = (_plane_array(p) for p in frame.planes[:3])
    return y, u, v


def assemble(name, reader, indices, positions, fps, total, rotate: bool,
             numbering: str = "presentation") -> DecodedVideo:
    """The kept frames of ``reader`` at presentation ``positions`` (one per sampled index) as a
    DecodedVideo (quarter turns applied)."""
    turns = _quarter_turns(reader.rotation) if rotate else 0

    def stack(channel):
        t = torch.from_numpy(np.stack([reader.kept[i][channel] for i in positions]))
        return torch.rot90(t, turns, dims=(1, 2)).contiguous() if turns else t

    common = dict(source=name, indices=list(indices), fps=fps, num_frames_total=total,
                  numbering=numbering, frames=list(positions))
    if reader.tags is None:
        return DecodedVideo(**common, pixel_format="rgb24", rgb=stack(0), color_matrix="bt601",
                            color_range="full")
    matrix, rng = reader.tags
    return DecodedVideo(**common, pixel_format="yuv420p", y=stack(0), u=stack(1), v=stack(2),
                        color_matrix=matrix, color_range=rng)
