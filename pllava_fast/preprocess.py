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

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from . import ops
from .ops import CLIP_MEAN, CLIP_STD

__all__ = ["frames_to_pixel_values", "pllava_geometry", "yuv_to_rgb", "frames_to_tensor_torch"]

_PRECISION_BITS = 22  # Pillow: 32 bits - 8 for the pixel - 2 for the filter's overshoot


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
# Pure-torch implementation of the op (same integer arithmetic as csrc/pixel_math.h)
# ---------------------------------------------------------------------------------------------
def _bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _axis_plan(in_size: int, out_size: int, out_start: int, n: int):
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for outputs [out_start, out_start+n).

    Returns (in_start, in_len, index (n, K) int64 relative to in_start, weights (n, K) int64).
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_start, out_start + n, dtype=np.float64) + 0.5) * scale
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    w = _bicubic((taps[None, :] + xmin[:, None] - center[:, None] + 0.5) * (1.0 / filterscale))
    valid = taps[None, :] < xmax[:, None]
    w = np.where(valid, w, 0.0)
    ww = np.zeros(n)
    for j in range(ksize):  # sequential sum, as the C loop (numpy's sum is pairwise)
        ww = ww + w[:, j]
    w = np.where(ww[:, None] != 0.0, w / np.where(ww == 0.0, 1.0, ww)[:, None], w)
    k = np.trunc(np.where(w < 0, -0.5 + w * (1 << _PRECISION_BITS),
                          0.5 + w * (1 << _PRECISION_BITS))).astype(np.int64)
    k = np.where(valid, k, 0)
    lo, hi = int(xmin.min()), int((xmin + xmax).max())
    index = np.minimum(xmin[:, None] + taps[None, :], hi - 1) - lo
    return lo, hi - lo, torch.from_numpy(index), torch.from_numpy(k)


def _resample(x: Tensor, plan, dim: int) -> Tensor:
    """One Pillow pass along ``dim`` of a uint8 (N, H, W, 3) tensor -> uint8."""
    _, _, index, k = plan
    index, k = index.to(x.device), k.to(device=x.device, dtype=torch.int32)
    xs = x.movedim(dim, -2).to(torch.int32)                       # (..., L, 3)
    acc = None
    for j in range(index.shape[1]):  # one tap at a time: (..., n, 3) live, not (..., n, K, 3)
        term = torch.index_select(xs, -2, index[:, j]) * k[:, j, None]
        acc = term if acc is None else acc.add_(term)
    acc += 1 << (_PRECISION_BITS - 1)
    return torch.clamp(acc >> _PRECISION_BITS, 0, 255).to(torch.uint8).movedim(-2, dim)


def _yuv_coeffs(matrix: int, full_range: bool):
    """swscale's 2^13 fixed-point coefficients (see csrc/pixel_math.h)."""
    kr, kb = (0.2126, 0.0722) if matrix == 1 else (0.299, 0.114)
    kg = 1.0 - kr - kb
    ys, cs = (1.0, 1.0) if full_range else (255.0 / 219.0, 255.0 / 224.0)

    def fx(x):
        return math.floor(x * 8192.0 + 0.5)

    return (0 if full_range else 16, fx(ys), fx(2.0 * (1.0 - kr) * cs),
            fx(-2.0 * kb * (1.0 - kb) / kg * cs), fx(-2.0 * kr * (1.0 - kr) / kg * cs),
            fx(2.0 * (1.0 - kb) * cs))


def yuv_to_rgb(y: Tensor, u: Tensor, v: Tensor, matrix: str = "bt601",
               full_range: bool = False) -> Tensor:
    """YUV 4:2:0 planes -> RGB uint8, the op's conversion (chroma nearest, swscale's fixed point).

    y: (T, H, W) uint8; u, v: (T, (H+1)//2, (W+1)//2) uint8 -> (T, H, W, 3) uint8.
    """
    if matrix not in ops.COLOR_MATRICES:
        raise ValueError(f"matrix must be one of {ops.COLOR_MATRICES}, got {matrix!r}")
    return _yuv_to_rgb(y, u, v, ops.COLOR_MATRICES.index(matrix), full_range)


def _yuv_to_rgb(y, u, v, matrix, full_range):
    yoff, cy, crv, cgu, cgv, cbu = _yuv_coeffs(matrix, full_range)
    h, w = y.shape[-2:]
    u8 = (u.to(torch.int32).repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :h, :w] - 128) * 8
    v8 = (v.to(torch.int32).repeat_interleave(2, -2).repeat_interleave(2, -1)[..., :h, :w] - 128) * 8
    yp = ((y.to(torch.int32) - yoff) * 8 * cy) >> 16  # each product floored, as pmulhw
    rgb = torch.stack([yp + ((v8 * crv) >> 16),
                       yp + ((u8 * cgu) >> 16) + ((v8 * cgv) >> 16),
                       yp + ((u8 * cbu) >> 16)], -1)
    return torch.clamp(rgb, 0, 255).to(torch.uint8)


def _normalize_lut(mean, std, device) -> Tensor:
    x = (torch.arange(256, dtype=torch.float64) * (1.0 / 255.0)).to(torch.float32)
    m = torch.tensor(mean, dtype=torch.float32)[:, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None]
    return ((x[None, :] - m) / s).to(device)  # (3, 256)


def frames_to_tensor_torch(frames, u, v, matrix, full_range, geometry, mean, std, dtype,
                           chunk: int = 4) -> Tensor:
    """Pure-torch ``pllava_fast::frames_to_tensor`` (same arguments as the op)."""
    h1, w1, top1, left1, hc, wc, h2, w2, top2, left2, out = (int(g) for g in geometry)
    H, W = int(frames.shape[1]), int(frames.shape[2])
    if not (0 <= top1 and top1 + hc <= h1 and 0 <= left1 and left1 + wc <= w1
            and 0 <= top2 and top2 + out <= h2 and 0 <= left2 and left2 + out <= w2):
        raise ValueError(f"frames_to_tensor: geometry {list(geometry)} crops outside the frame")
    v2 = _axis_plan(hc, h2, top2, out)
    h2p = _axis_plan(wc, w2, left2, out)
    v1 = _axis_plan(H, h1, top1 + v2[0], v2[1])
    h1p = _axis_plan(W, w1, left1 + h2p[0], h2p[1])
    lut = _normalize_lut(mean, std, frames.device)
    outs = []
    r0, r1 = v1[0], v1[0] + v1[1]      # source rows / columns the crops need
    c0, c1 = h1p[0], h1p[0] + h1p[1]
    for t0 in range(0, frames.shape[0], chunk):  # bounded memory for the int32 intermediates
        if u is None:
            x = frames[t0:t0 + chunk, r0:r1, c0:c1]
        else:
            x = _yuv_to_rgb(frames[t0:t0 + chunk], u[t0:t0 + chunk], v[t0:t0 + chunk],
                            matrix, full_range)[:, r0:r1, c0:c1]
        x = _resample(x, h1p, 2)
        x = _resample(x, v1, 1)
        x = _resample(x, h2p, 2)
        x = _resample(x, v2, 1)                                  # (n, out, out, 3) uint8
        idx = x.permute(0, 3, 1, 2).long()                        # (n, 3, out, out)
        channel = torch.arange(3, device=idx.device)[None, :, None, None]
        outs.append(lut[channel, idx])
    return torch.cat(outs).to(dtype)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------
def _as_rgb_batch(frames) -> Tensor:
    """(T, H, W, 3) uint8 tensor from a tensor/ndarray or a list of PIL images / HxWx3 arrays."""
    if isinstance(frames, np.ndarray):
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    if isinstance(frames, Tensor):
        if frames.dim() == 3:
            frames = frames[None]
        if frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
            raise ValueError(f"RGB frames must be a (T, H, W, 3) uint8 tensor/array, got "
                             f"shape {tuple(frames.shape)} dtype {frames.dtype}")
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
    """
    device = torch.device(device)
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
