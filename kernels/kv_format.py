"""The KV-cache code format, in plain torch: the definition the Triton kernels are tested against.

Imports without Triton: the CPU implementations of ``pllava_fast::quantize_kv`` and the cache's
dequantization use these functions, and ``kv_quant.py`` / ``decode_attention.py`` hold the GPU
kernels that must agree with them bit for bit (codes) or to rounding (dequantized values).

Format (shared by the cache, the decode-attention kernel and the references):

* ``x`` is a ``(N, D)`` floating matrix: one row per (sequence, head, token).
* ``D`` is even (all LLM head dims are): the kernels work on (even, odd) channel pairs.
* ``bits=8``: ``codes`` is ``(N, D)`` uint8. ``bits=4``: ``codes`` is ``(N, D // 2)`` uint8 with two
  codes per byte, ``byte[j] = code[2j] | code[2j + 1] << 4``.
* ``scale`` and ``zero`` are float32; ``x ~= code * scale + zero`` with ``code`` in ``[0, 2**bits - 1]``
  and ``code = floor((x - zero) / scale + 0.5)``, ``zero = min``, ``scale = (max - min) / (2**bits - 1)``
  over the group (``scale = 0`` for a constant group, whose codes are then 0).
* Token groups (``quantize_groups``): ``group_size`` consecutive channels of one row; the last group
  of a head dim that ``group_size`` does not divide is partial. ``scale``: ``(N, ceil(D / group_size))``.
* Channel groups (``quantize_channels``, KIVI-style keys): each channel over ``block`` consecutive
  rows (tokens of one head). ``scale``: ``(N // block, D)``.
* fp8 (``quantize_fp8_ref``): ``codes`` is ``(N, D)`` float8_e4m3fn, symmetric per token group:
  ``scale = absmax / 448`` (e4m3's largest finite value), ``zero = 0``, ``x ~= code * scale + zero``
  (the int8 formula, so every reader of int8 codes reads fp8 codes by converting them to float).
"""
from __future__ import annotations

import torch
from torch import Tensor


def check_rows(x: Tensor, bits: int) -> None:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (N, D) matrix, got {x.dtype} {tuple(x.shape)}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if x.shape[1] % 2:
        # the kernels work on (even, odd) channel pairs; int4 packs each pair into one byte
        raise ValueError(f"KV quantization needs an even head dim, got {x.shape[1]}")


# ---------------------------------------------------------------------------------------------
def _codes_ref(x: Tensor, mn: Tensor, scale: Tensor, bits: int) -> Tensor:
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.floor((x - mn) / safe + 0.5).clamp_(0, 2 ** bits - 1)
    return torch.where(scale > 0, q, torch.zeros_like(q)).to(torch.uint8)


def pack_ref(q: Tensor, bits: int) -> Tensor:
    """Codes (..., D) uint8 -> stored bytes (two per byte for int4, low nibble first)."""
    if bits == 8:
        return q.contiguous()
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def unpack_ref(codes: Tensor, bits: int) -> Tensor:
    """Stored bytes -> codes (..., D) uint8."""
    if bits == 8:
        return codes
    lo, hi = codes & 15, codes >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def _group_of(d: int, group_size: int, device) -> Tensor:
    """(D,) the token group of each channel. Groups expand to channels by this gather: torch
    2.13's CPU inductor miscomputed repeat_interleave + slice feeding 8-bit codes when the last
    group is short (head dim 80, groups of 64: codes 64-79 wrong, 40 rows)."""
    return torch.arange(d, device=device) // group_size


def quantize_groups_ref(x: Tensor, bits: int, group_size: int):
    """Token-group quantization in plain torch; same contract as ``_quantize_groups``."""
    check_rows(x, bits)
    n, d = x.shape
    ng = -(-d // group_size)
    xf = x.float()
    pad = ng * group_size - d
    xp = torch.nn.functional.pad(xf, (0, pad), value=float("nan")).view(n, ng, group_size)
    mn = torch.where(torch.isnan(xp), torch.full_like(xp, float("inf")), xp).amin(-1)
    mx = torch.where(torch.isnan(xp), torch.full_like(xp, float("-inf")), xp).amax(-1)
    scale = (mx - mn) / (2 ** bits - 1)
    group = _group_of(d, group_size, x.device)
    q = _codes_ref(xf, mn[:, group], scale[:, group], bits)
    return pack_ref(q, bits), scale, mn


def quantize_channels_ref(x: Tensor, bits: int, block: int):
    """Per-channel quantization over blocks of ``block`` rows in plain torch."""
    check_rows(x, bits)
    n, d = x.shape
    xb = x.float().view(n // block, block, d)
    mn, mx = xb.amin(1), xb.amax(1)
    scale = (mx - mn) / (2 ** bits - 1)
    q = _codes_ref(xb, mn[:, None], scale[:, None], bits).view(n, d)
    return pack_ref(q, bits), scale, mn


def dequantize_ref(codes: Tensor, scale: Tensor, zero: Tensor, bits: int, d: int,
                   group_size: int | None = None, block: int | None = None) -> Tensor:
    """Codes + scales -> float32 (N, D). Token groups: pass ``group_size``; channel groups: ``block``."""
    q = unpack_ref(codes, bits).float()[:, :d]
    if block is not None:
        n = q.shape[0]
        return (q.view(n // block, block, d) * scale[:, None] + zero[:, None]).view(n, d)
    exp = lambda t: t.repeat_interleave(group_size, dim=1)[:, :d]  # noqa: E731
    return q * exp(scale) + exp(zero)


def dequantize_kv_ref(codes: Tensor, scale: Tensor, zero: Tensor, bits: int, d: int,
                      group_size: int, key_block: int = 0) -> Tensor:
    """(B, H, T, Dc) codes + scales -> (B, H, T, D) float32 (``bits=16``: floating codes pass
    through; fp8 codes at ``bits=8`` convert to float and take the int8 formula)."""
    if bits == 16:
        return codes.float()
    q = unpack_ref(codes, bits).float()[..., :d]
    if key_block:
        return q * scale.repeat_interleave(key_block, dim=2) + zero.repeat_interleave(key_block, dim=2)
    exp = lambda s: s.repeat_interleave(group_size, dim=-1)[..., :d]  # noqa: E731
    return q * exp(scale) + exp(zero)


FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def quantize_fp8_ref(x: Tensor, group_size: int):
    """Symmetric fp8 (e4m3) codes per token group: (codes (N, D) float8_e4m3fn, scale, zero
    (N, ceil(D / group_size)) float32, zero all 0). A group of zeros gets scale 0 and codes 0."""
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (N, D) matrix, got {x.dtype} {tuple(x.shape)}")
    n, d = x.shape
    ng = -(-d // group_size)
    xf = x.float()
    xp = torch.nn.functional.pad(xf, (0, ng * group_size - d)).view(n, ng, group_size)
    scale = xp.abs().amax(-1) / FP8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    if d % group_size == 0:  # whole groups: the scale broadcasts over a view (no gather)
        q = (xf.reshape(n, ng, group_size) / safe[..., None]).view(n, d)
    else:
        q = xf / safe[:, _group_of(d, group_size, x.device)]
    q = q.clamp_(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), scale, torch.zeros_like(scale)
