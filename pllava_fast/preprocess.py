"""Decoded frames -> PLLaVA model input, in one batched op.

PLLaVA's preprocessing (PllavaProcessor + CLIPImageProcessor), reproduced exactly:

1. every frame of a video is resized (Pillow BICUBIC, antialiased) so that its short edge is a
   short edge shared by the batch, with the long edge capped at ``max_long_edge`` (640), then
   cropped along its long side to the shared aspect ratio; the crop starts at a quarter of the
   excess, ``((L - L_out) // 2) // 2``, not at the centre;
2. CLIP: bicubic resize of the shortest edge to ``image_size`` (336), center crop
   ``image_size``, rescale by 1/255, normalize with CLIP's mean/std.

Both resizes run on uint8 with Pillow's fixed-point arithmetic and its rounding to uint8 between
the horizontal and the vertical pass. The work is done by ``pllava_fast::frames_to_tensor``
(csrc/: C++ on CPU, CUDA on GPU, YUV planes converted inside the op); this module computes the
geometry PLLaVA derives per call and holds the pure-torch implementation of the same math, used
when the extension is not built.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from . import ops
from .checks import positive_int
from .devices import check_device
from .ops.frames import CLIP_MEAN, CLIP_STD

__all__ = ["frames_to_pixel_values", "pllava_geometry"]


# ---------------------------------------------------------------------------------------------
# Geometry (PllavaProcessor.resize_crop_longshort + CLIPImageProcessor's resize / center crop)
# ---------------------------------------------------------------------------------------------
def _short_edge_size(height: int, width: int, short: int, max_size: int | None = None):
    """transformers' get_resize_output_image_size(default_to_square=False) -> (h, w)."""
    lo, hi = (width, height) if width <= height else (height, width)
    new_short, new_long = short, int(short * hi / lo)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if width <= height else (new_short, new_long)


def pllava_geometry(sizes: Sequence[tuple[int, int]], image_size: int = 336,
                    max_long_edge: int = 640) -> list[tuple[int, ...]]:
    """The op's geometry for each video of one PllavaProcessor call.

    Args:
        sizes: (height, width) of each video's frames; videos processed together share the short
            edge and the aspect ratio of the least elongated one, as in PLLaVA.
        image_size: CLIP resolution (resize shortest edge, then center crop).
        max_long_edge: cap on the long edge of the shared first resize.

    Returns:
        One 11-tuple per video: (h1, w1, top1, left1, hc, wc, h2, w2, top2, left2, image_size).
    """
    image_size = positive_int("image_size", image_size)
    max_long_edge = positive_int("max_long_edge", max_long_edge)
    sizes = [(int(h), int(w)) for h, w in sizes]
    if not sizes or any(h <= 0 or w <= 0 for h, w in sizes):
        raise ValueError(f"sizes must be non-empty (height, width) pairs, got {sizes}")
    rates = [max(s) / min(s) for s in sizes]
    min_rate = min(rates)
    ref_size = sizes[rates.index(min_rate)]
    short = max(min(s) for s in sizes)
    long_cap = min(max_long_edge, max(max(s) for s in sizes))
    short = min(short, int(long_cap / min_rate))
    short = max(short, image_size)
    if ref_size[0] > ref_size[1]:
        out_size = (int(short * min_rate), short)
    else:
        out_size = (short, int(short * min_rate))
    out_long = max(out_size)
    geoms = []
    for h, w in sizes:
        h1, w1 = _short_edge_size(h, w, short, max_size=9999)
        if min(h1, w1) < image_size:  # PllavaProcessor.resize's retry without the cap
            h1, w1 = _short_edge_size(h, w, short)
        overhead = (max(h1, w1) - out_long) // 2
        start = overhead // 2
        # Python slice semantics on the long axis, exactly as the original's numpy slicing
        if h1 > w1:
            rows = range(h1)[start:start + out_long]
            top1, hc, left1, wc = rows.start, len(rows), 0, w1
        else:
            cols = range(w1)[start:start + out_long]
            top1, hc, left1, wc = 0, h1, cols.start, len(cols)
        if hc <= 0 or wc <= 0:
            raise ValueError(f"PLLaVA's crop of a {h}x{w} video to {out_size} is empty")
        h2, w2 = _short_edge_size(hc, wc, image_size)
        top2, left2 = (h2 - image_size) // 2, (w2 - image_size) // 2
        geoms.append((h1, w1, top1, left1, hc, wc, h2, w2, top2, left2, image_size))
    return geoms


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------
def _as_rgb_batch(frames) -> Tensor:
    """(T, H, W, 3) uint8 tensor from a tensor/ndarray or a list of PIL images / HxWx3 arrays."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if isinstance(frames, Tensor):
        # the message names the shape as given, before a single (H, W, 3) frame gets its T axis
        given = tuple(frames.shape)
        if frames.dim() == 3 and frames.shape[-1] == 3:
            frames = frames[None]
        if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"RGB frames must be a (T, H, W, 3) or (H, W, 3) uint8 tensor/array, "
                             f"got shape {given} dtype {frames.dtype}")
        return frames
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise ValueError("frames is an empty list")
        arrays = []
        for i, f in enumerate(frames):
            if hasattr(f, "convert") and hasattr(f, "size"):  # PIL image
                f = np.asarray(f.convert("RGB"))
            elif isinstance(f, Tensor):
                f = f.cpu().numpy()
            f = np.asarray(f)
            if f.ndim != 3 or f.shape[-1] != 3 or f.dtype != np.uint8:
                raise ValueError(f"frame {i} must be an HxWx3 uint8 image, got shape {f.shape} "
                                 f"dtype {f.dtype}")
            if arrays and f.shape != arrays[0].shape:
                raise ValueError(f"frame {i} is {f.shape[1]}x{f.shape[0]} but frame 0 is "
                                 f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; the frames of one "
                                 "video must share a size")
            arrays.append(f)
        return torch.from_numpy(np.stack(arrays))
    raise ValueError(f"unsupported frames type {type(frames).__name__}: expected a DecodedVideo, "
                     "a list of them, a (T, H, W, 3) uint8 tensor/array or a list of images")


def _is_decoded_video(x) -> bool:
    return hasattr(x, "pixel_format") and hasattr(x, "indices") and hasattr(x, "rgb")


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    if t.device == device:
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def frames_to_pixel_values(
    frames,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    image_size: int = 336,
    max_long_edge: int = 640,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    joint_geometry: bool = False,
) -> Tensor:
    """Decoded frames -> (sum T, 3, image_size, image_size) model input, PLLaVA's preprocessing.

    Args:
        frames: a ``DecodedVideo`` (YUV planes are converted inside the op; on CUDA the planes are
            uploaded, not float RGB), a list of them (videos concatenated frame-major), a
            (T, H, W, 3) uint8 tensor/ndarray, or a list of PIL images / HxWx3 uint8 arrays.
        device: where the op runs and the result lives.
        dtype: float32 | float16 | bfloat16.
        image_size: CLIP resolution (336 for ViT-L/14-336).
        max_long_edge: cap on the long edge of PLLaVA's first resize (640).
        mean, std: CLIP normalization.
        joint_geometry: for a list of videos, share one short edge and aspect ratio across all of
            them (one PllavaProcessor call on the list). The default processes each video as its
            own call, as PLLaVA's demo and evaluation do.

    A bad argument is a ValueError naming it (and, for frames, the shape and dtype as given).
    """
    device = check_device(device)
    image_size = positive_int("image_size", image_size)
    max_long_edge = positive_int("max_long_edge", max_long_edge)
    if _is_decoded_video(frames):
        videos = [frames]
    elif isinstance(frames, (list, tuple)) and frames and all(map(_is_decoded_video, frames)):
        videos = list(frames)
    else:
        videos = [_as_rgb_batch(frames)]
    batches = []
    for i, vid in enumerate(videos):
        if isinstance(vid, Tensor):
            batches.append((vid, None, None, "bt601", False))
            continue
        if len(vid) == 0:
            raise ValueError(f"video {i} ({vid.source}) has no frames")
        if vid.y is not None:
            batches.append((vid.y, vid.u, vid.v, vid.color_matrix, vid.color_range == "full"))
        elif vid.rgb is not None:
            batches.append((vid.rgb, None, None, "bt601", False))
        else:
            raise ValueError(f"video {i} ({vid.source}) holds neither RGB frames nor YUV planes")
    sizes = [(int(b[0].shape[1]), int(b[0].shape[2])) for b in batches]
    if joint_geometry:
        geoms = pllava_geometry(sizes, image_size, max_long_edge)
    else:
        geoms = [pllava_geometry([s], image_size, max_long_edge)[0] for s in sizes]
    outs = []
    for (x, u, v, matrix, full), geom in zip(batches, geoms):
        x = _to_device(x, device)
        if u is not None:
            u, v = _to_device(u, device), _to_device(v, device)
        outs.append(ops.frames_to_tensor(x, u, v, geometry=geom, matrix=matrix, full_range=full,
                                         mean=mean, std=std, dtype=dtype))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
