"""``pllava_fast::frames_to_tensor``: decoded frames -> PLLaVA model input in one op.

Wrapper (validates) -> custom op -> the C++ / CUDA extension (``csrc/``) -> fake -> CPU fallback
in torch when the extension is not built (same integer arithmetic as ``csrc/pixel_math.h``).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .. import _ext
from ..checks import allocation, finite_float, flag, is_int

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
COLOR_MATRICES = ("bt601", "bt709")  # index = the op's ``matrix`` argument
FRAME_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PRECISION_BITS = 22  # Pillow: 32 bits - 8 for the pixel - 2 for the filter's overshoot


def frames_to_tensor(
    frames: Tensor,
    u: Tensor | None = None,
    v: Tensor | None = None,
    *,
    geometry: Sequence[int],
    matrix: str = "bt601",
    full_range: bool = False,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Decoded frames -> normalized model input, one batched op (csrc/; torch fallback).

    Args:
        frames: RGB (T, H, W, 3) uint8, or the Y plane (T, H, W) uint8 when ``u``/``v`` are given.
        u, v: 4:2:0 chroma planes (T, (H + 1) // 2, (W + 1) // 2) uint8, same device as frames.
        geometry: 11 ints (h1, w1, top1, left1, hc, wc, h2, w2, top2, left2, out): antialiased
            bicubic resize to (h1, w1), crop hc x wc at (top1, left1), resize to (h2, w2), crop
            out x out at (top2, left2); see ``pllava_fast.preprocess.pllava_geometry``.
        matrix / full_range: how to convert YUV ("bt601" | "bt709", limited or full range).
        mean, std: per-channel normalization after rescaling by 1/255.
        dtype: float32 | float16 | bfloat16.

    Returns:
        (T, 3, out, out) tensor of ``dtype`` on frames' device.
    """
    if not isinstance(frames, Tensor):
        raise ValueError(f"frames must be a torch.Tensor, got {type(frames).__name__}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got dtype {frames.dtype}")
    if (u is None) != (v is None):
        raise ValueError("u and v must both be given (YUV 4:2:0) or both be None (RGB frames)")
    if u is None:
        if frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"RGB frames must be (T, H, W, 3), got shape {tuple(frames.shape)}")
    else:
        if frames.dim() != 3:
            raise ValueError(f"the Y plane must be (T, H, W), got shape {tuple(frames.shape)}")
        t, h, w = frames.shape
        want = (t, (h + 1) // 2, (w + 1) // 2)
        for name, plane in (("u", u), ("v", v)):
            if not isinstance(plane, Tensor) or plane.dtype != torch.uint8:
                raise ValueError(f"{name} plane must be a uint8 tensor, got "
                                 f"{getattr(plane, 'dtype', type(plane).__name__)}")
            if tuple(plane.shape) != want:
                raise ValueError(f"{name} plane must be (T, (H+1)//2, (W+1)//2) = {want} for a Y "
                                 f"plane of {tuple(frames.shape)}, got {tuple(plane.shape)}")
            if plane.device != frames.device:
                raise ValueError(f"{name} plane is on {plane.device}, the Y plane on {frames.device}")
    if frames.numel() == 0:
        raise ValueError(f"frames must be non-empty, got shape {tuple(frames.shape)}")
    if matrix not in COLOR_MATRICES:
        raise ValueError(f"matrix must be one of {COLOR_MATRICES}, got {matrix!r}")
    geometry = check_geometry(geometry)
    mean = [finite_float(f"mean[{i}]", m) for i, m in enumerate(_numbers(mean, "mean"))]
    std = [finite_float(f"std[{i}]", s) for i, s in enumerate(_numbers(std, "std"))]
    if not all(std):
        raise ValueError(f"std must be non-zero, got {std}")
    if dtype not in FRAME_DTYPES:
        raise ValueError(f"dtype must be one of {FRAME_DTYPES}, got {dtype}")
    full_range = flag("full_range", full_range)
    out = geometry[10]
    allocation(f"frames_to_tensor of {frames.shape[0]} frame(s) to {out}x{out}",
               frames.shape[0] * 3 * out * out * (torch.finfo(dtype).bits // 8 + 4), frames.device)
    return _frames_to_tensor_op(
        frames, u, v, COLOR_MATRICES.index(matrix), full_range, geometry, mean, std, dtype)


_GEOMETRY = ("h1", "w1", "top1", "left1", "hc", "wc", "h2", "w2", "top2", "left2", "out")


def _numbers(values, name: str, n: int = 3) -> list:
    """``values`` as a list of ``n`` items (mean / std), or ValueError naming ``name``."""
    try:
        values = list(values)
    except TypeError:
        raise ValueError(f"{name} must be {n} numbers, got {values!r}") from None
    if len(values) != n:
        raise ValueError(f"{name} must be {n} numbers, got {len(values)}")
    return values


def check_geometry(geometry) -> list[int]:
    """The 11 ints of a geometry, sizes >= 1, offsets >= 0 and both crops inside their resized
    frames; a ValueError naming the field otherwise (a float is not truncated: 2.5 is refused)."""
    try:
        values = list(geometry) if not isinstance(geometry, (str, bytes)) else None
    except TypeError:
        values = None
    if values is None or len(values) != 11 or not all(is_int(g) for g in values):
        raise ValueError(f"geometry must be 11 ints {_GEOMETRY}, got {geometry!r}")
    g = dict(zip(_GEOMETRY, (int(v) for v in values)))
    for name in ("h1", "w1", "hc", "wc", "h2", "w2", "out"):
        if g[name] < 1:
            raise ValueError(f"geometry {name} must be >= 1, got {g[name]} in {values}")
    for name in ("top1", "left1", "top2", "left2"):
        if g[name] < 0:
            raise ValueError(f"geometry {name} must be >= 0, got {g[name]} in {values}")
    if g["top1"] + g["hc"] > g["h1"] or g["left1"] + g["wc"] > g["w1"]:
        raise ValueError(f"geometry: the first crop {g['hc']}x{g['wc']} at ({g['top1']}, "
                         f"{g['left1']}) is outside the resized {g['h1']}x{g['w1']} frame")
    if g["top2"] + g["out"] > g["h2"] or g["left2"] + g["out"] > g["w2"]:
        raise ValueError(f"geometry: the crop of {g['out']} at ({g['top2']}, {g['left2']}) is "
                         f"outside the resized {g['h2']}x{g['w2']} frame")
    return list(g.values())


@torch.library.custom_op("pllava_fast::frames_to_tensor", mutates_args=())
def _frames_to_tensor_op(
    frames: Tensor, u: Tensor | None, v: Tensor | None, matrix: int, full_range: bool,
    geometry: list[int], mean: list[float], std: list[float], dtype: torch.dtype,
) -> Tensor:
    ext = _ext.load()
    args = (frames, u, v, matrix, full_range, list(geometry), list(mean), list(std), dtype)
    if ext is not None and frames.device.type == "cpu":
        return ext.frames_to_tensor_cpu(*args)
    if ext is not None and frames.device.type == "cuda" and getattr(ext, "with_cuda", False):
        return ext.frames_to_tensor_cuda(*args)
    return frames_to_tensor_torch(*args)  # same math in torch (no _C, or no CUDA _C)


@_frames_to_tensor_op.register_fake
def _(frames, u, v, matrix, full_range, geometry, mean, std, dtype):
    out = geometry[10]
    return frames.new_empty((frames.shape[0], 3, out, out), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# CPU fallback: the op in torch (same integer arithmetic as csrc/pixel_math.h)
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
    if matrix not in COLOR_MATRICES:
        raise ValueError(f"matrix must be one of {COLOR_MATRICES}, got {matrix!r}")
    return _yuv_to_rgb(y, u, v, COLOR_MATRICES.index(matrix), full_range)


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
