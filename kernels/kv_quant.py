"""Triton kernels that quantize KV rows on append (format and plain-torch reference: ``kv_format.py``).

Input ``x`` (N, D) floating, one row per (sequence, head, token); outputs codes, scale and zero as
``kv_format`` defines them, token groups (``_quantize_groups``) or per-channel groups over blocks of
rows (``_quantize_channels``, KIVI-style keys).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kv_format import check_rows


@triton.jit
def _codes(x, mn, scale, QMAX: tl.constexpr):
    safe = tl.where(scale > 0, scale, 1.0)
    q = tl.floor((x - mn) / safe + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), QMAX)
    return tl.where(scale > 0, q, 0.0).to(tl.uint8)


@triton.jit
def _split_last(x):
    """(..., 2K) -> its even and odd entries along the last axis, each (..., K)."""
    shape: tl.constexpr = x.shape
    return tl.split(tl.reshape(x, shape[:-1] + [shape[-1] // 2, 2]))


@triton.jit
def _join_last(xe, xo):
    """Inverse of ``_split_last``: interleave along the last axis."""
    shape: tl.constexpr = xe.shape
    return tl.reshape(tl.join(xe, xo), shape[:-1] + [shape[-1] * 2])


@triton.jit
def _store_codes(codes_ptr, row_off, col, col_half, qe, qo, mask, half_mask,
                 D: tl.constexpr, BITS: tl.constexpr):
    if BITS == 4:
        tl.store(codes_ptr + row_off * (D // 2) + col_half, qe | (qo << 4), mask=half_mask)
    else:
        # interleave back in registers: one contiguous store instead of two stride-2 ones
        tl.store(codes_ptr + row_off * D + col, _join_last(qe, qo), mask=mask)


@triton.jit
def _quantize_groups_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr, N,
    D: tl.constexpr, G: tl.constexpr, NG: tl.constexpr, BITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_NG: tl.constexpr,
):
    # Tile (BLOCK_N rows, BLOCK_NG groups, G/2 channel pairs); even and odd channels are loaded
    # separately so int4 packing is a shift-or of two tiles, no interleave needed.
    pid = tl.program_id(0)
    # int64 offsets: a long batched prefill appends more than 2**31 elements
    rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    grp = tl.arange(0, BLOCK_NG)
    pair = tl.arange(0, G // 2)
    r3 = rows[:, None, None]
    col_half = grp[None, :, None] * (G // 2) + pair[None, None, :]
    mask = (r3 < N) & (col_half < D // 2)
    # whole rows are loaded contiguously (vectorised on GPU) and split into even / odd channels
    col = grp[None, :, None] * G + tl.arange(0, G)[None, None, :]
    full_mask = (r3 < N) & (col < D)
    xe, xo = _split_last(tl.load(x_ptr + r3 * D + col, mask=full_mask, other=0.0).to(tl.float32))
    inf = float("inf")
    mn = tl.minimum(tl.min(tl.where(mask, xe, inf), axis=2), tl.min(tl.where(mask, xo, inf), axis=2))
    mx = tl.maximum(tl.max(tl.where(mask, xe, -inf), axis=2), tl.max(tl.where(mask, xo, -inf), axis=2))
    gmask = (rows[:, None] < N) & (grp[None, :] < NG)
    mn = tl.where(gmask, mn, 0.0)
    scale = tl.where(gmask, (mx - mn) / (2 ** BITS - 1), 0.0)
    tl.store(scale_ptr + rows[:, None] * NG + grp[None, :], scale, mask=gmask)
    tl.store(zero_ptr + rows[:, None] * NG + grp[None, :], mn, mask=gmask)
    qe = _codes(xe, mn[:, :, None], scale[:, :, None], 2 ** BITS - 1)
    qo = _codes(xo, mn[:, :, None], scale[:, :, None], 2 ** BITS - 1)
    _store_codes(codes_ptr, r3, col, col_half, qe, qo, full_mask, mask, D, BITS)


@triton.jit
def _quantize_channels_kernel(
    x_ptr, codes_ptr, scale_ptr, zero_ptr,
    D: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    # One program per block of BLOCK tokens of one head: statistics per channel over the tokens.
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    col_half = tl.arange(0, BLOCK_HALF)
    mask = (col_half[None, :] < D // 2) & (rows[:, None] >= 0)
    r2 = rows[:, None]
    c2 = col_half[None, :]
    col = tl.arange(0, 2 * BLOCK_HALF)[None, :]
    full_mask = (col < D) & (r2 >= 0)
    xe, xo = _split_last(tl.load(x_ptr + r2 * D + col, mask=full_mask, other=0.0).to(tl.float32))
    cmask = col_half < D // 2
    mn_e, mx_e = tl.min(xe, axis=0), tl.max(xe, axis=0)
    mn_o, mx_o = tl.min(xo, axis=0), tl.max(xo, axis=0)
    qmax = 2 ** BITS - 1
    sc_e, sc_o = (mx_e - mn_e) / qmax, (mx_o - mn_o) / qmax
    srow = pid.to(tl.int64) * D
    tl.store(scale_ptr + srow + 2 * col_half, sc_e, mask=cmask)
    tl.store(scale_ptr + srow + 2 * col_half + 1, sc_o, mask=cmask)
    tl.store(zero_ptr + srow + 2 * col_half, mn_e, mask=cmask)
    tl.store(zero_ptr + srow + 2 * col_half + 1, mn_o, mask=cmask)
    qe = _codes(xe, mn_e[None, :], sc_e[None, :], qmax)
    qo = _codes(xo, mn_o[None, :], sc_o[None, :], qmax)
    _store_codes(codes_ptr, r2, col, c2, qe, qo, full_mask, mask, D, BITS)


def _code_width(d: int, bits: int) -> int:
    return d // 2 if bits == 4 else d


def _group_blocks(d: int, group_size: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_NG) of the token-group kernel (shared with the sm_90 AOT test)."""
    block_ng = triton.next_power_of_2(triton.cdiv(d, group_size))
    # ~4k elements per program keeps registers modest on GPU and programs few under the interpreter
    return max(1, min(64, 4096 // (block_ng * group_size))), block_ng


def _quantize_groups(x: Tensor, bits: int, group_size: int):
    """Triton launcher: token-group quantization of ``x`` (N, D) -> (codes, scale, zero)."""
    check_rows(x, bits)
    if group_size < 2 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 2, got {group_size}")
    x = x.contiguous()
    n, d = x.shape
    ng = triton.cdiv(d, group_size)
    codes = torch.empty(n, _code_width(d, bits), dtype=torch.uint8, device=x.device)
    scale = torch.empty(n, ng, dtype=torch.float32, device=x.device)
    zero = torch.empty_like(scale)
    block_n, block_ng = _group_blocks(d, group_size)
    if n:
        _quantize_groups_kernel[(triton.cdiv(n, block_n),)](
            x, codes, scale, zero, n, D=d, G=group_size, NG=ng, BITS=bits,
            BLOCK_N=block_n, BLOCK_NG=block_ng)
    return codes, scale, zero


def _quantize_channels(x: Tensor, bits: int, block: int):
    """Triton launcher: per-channel quantization over blocks of ``block`` rows."""
    check_rows(x, bits)
    n, d = x.shape
    if block < 1 or block & (block - 1) or n % block:
        raise ValueError(f"channel block must be a power of two dividing the rows ({n}), got {block}")
    x = x.contiguous()
    codes = torch.empty(n, _code_width(d, bits), dtype=torch.uint8, device=x.device)
    scale = torch.empty(n // block, d, dtype=torch.float32, device=x.device)
    zero = torch.empty_like(scale)
    if n:
        _quantize_channels_kernel[(n // block,)](
            x, codes, scale, zero, D=d, BLOCK=block, BITS=bits,
            BLOCK_HALF=triton.next_power_of_2(d // 2))
    return codes, scale, zero


def aot_specs():
    """The launches to compile ahead of time (``aot.py``): quantize-on-append in the model
    dtypes (fp32 for the exactness paths) over head dims, groups and bit widths, rows loaded
    whole (16-byte loads) and split even / odd in registers."""
    import itertools

    from .aot import AotSpec, aligned

    specs, seen = [], set()
    for act, d, g, bits in itertools.product(("bf16", "fp32"), (64, 80, 128), (32, 128), (4, 8)):
        block_n, block_ng = _group_blocks(d, g)
        c = dict(D=d, G=g, NG=triton.cdiv(d, g), BITS=bits, BLOCK_N=block_n, BLOCK_NG=block_ng)
        if (act, *c.values()) in seen or (act == "fp32" and d != 80):
            continue
        seen.add((act, *c.values()))
        sig = {"x_ptr": "*" + act, "codes_ptr": "*u8", "scale_ptr": "*fp32", "zero_ptr": "*fp32",
               "N": "i32", **{n: "constexpr" for n in c}}
        specs.append(AotSpec(f"quantize groups {act} {c}", _quantize_groups_kernel, sig, c,
                             aligned(0, 1, 2, 3), loads="vec16"))
    for d, block, bits in ((64, 32, 4), (80, 32, 8), (128, 16, 4), (128, 128, 8)):
        c = dict(D=d, BLOCK=block, BITS=bits, BLOCK_HALF=triton.next_power_of_2(d // 2))
        sig = {"x_ptr": "*fp16", "codes_ptr": "*u8", "scale_ptr": "*fp32", "zero_ptr": "*fp32",
               **{n: "constexpr" for n in c}}
        specs.append(AotSpec(f"quantize channels {c}", _quantize_channels_kernel, sig, c,
                             aligned(0, 1, 2, 3), loads="vec16"))
    return specs
