"""Fused activation + PLLaVA adaptive average pooling of visual tokens (one memory-bound pass).

Input  x: (B*T, H*W, C) linear_1 outputs, PLLaVA's frame-major layout, contiguous, fp32/bf16/fp16.
Output pooled: (B, t*h*w, C) in x's dtype, tokens in PLLaVA's (t, h, w) order; optionally the fp32
L2 norm of every activated input token, (B*T, H*W).

Windows are those of ``torch.nn.AdaptiveAvgPool3d`` on every axis: cell i of an axis of length In
pooled to Out covers [floor(i*In/Out), ceil((i+1)*In/Out)), so windows may overlap (In % Out != 0)
and cells repeat (Out > In).

Work split: a program owns BLOCK_M consecutive output cells x BLOCK_C channels and reads their
windows straight from x (rows of C contiguous values, so every load is coalesced along C). With
non-overlapping windows each input element is read exactly once; overlapping windows re-read the
shared rows, which keeps every program independent (no atomics, deterministic). The norm of a token
needs all of C: each program writes the partial sum of squares of its C block for the tokens it
*owns* (the unique cell floor(j*Out/In) per axis, which always contains token j), and a tiny
reduction over the C blocks finishes the norms.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .adaptive import ACTIVATIONS, apply_activation, max_window

# constexpr codes of the activations, in ACTIVATIONS order
ACT_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}
# largest window (product of per-axis maxima) whose loop is fully unrolled, so its loads issue at once
_MAX_UNROLLED_WINDOW = 16


@triton.jit
def _activate(x, ACT: tl.constexpr):
    """x in fp32; ACT indexes ACTIVATIONS: gelu (erf), gelu_pytorch_tanh, quick_gelu, identity."""
    if ACT == 0:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 1:
        # 0.5 * (1 + tanh(z)) == sigmoid(2z): no tanh intrinsic needed, no cancellation near 0
        z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        y = x * tl.sigmoid(2.0 * z)
    elif ACT == 2:
        y = x * tl.sigmoid(1.702 * x)
    else:
        y = x
    return y


@triton.jit
def _accumulate_window_token(
    x_ptr, scratch_ptr, acc, k, base, t0, h0, w0, nt, nh, nw, ti, hi, wi, row_mask, cols, c_mask,
    pid_c, n_tokens, T, H, W, C, PT, PH, PW,
    KH: tl.constexpr, KW: tl.constexpr, ACT: tl.constexpr, NORMS: tl.constexpr,
):
    """Add the activated token k (flat index into the KT x KH x KW max window) of every row's
    window to acc (BLOCK_M, BLOCK_C); when NORMS, store its partial sum of squares if owned."""
    dt = k // (KH * KW)
    dh = (k // KW) % KH
    dw = k % KW
    valid = row_mask & (dt < nt) & (dh < nh) & (dw < nw)
    token = base + (dt * (H * W) + dh * W + dw)
    v = tl.load(x_ptr + token[:, None] * C + cols[None, :],
                mask=valid[:, None] & c_mask[None, :], other=0.0).to(tl.float32)
    y = _activate(v, ACT)
    acc += y
    if NORMS:
        owner = (((t0 + dt) * PT) // T == ti) & (((h0 + dh) * PH) // H == hi) \
            & (((w0 + dw) * PW) // W == wi)
        tl.store(scratch_ptr + pid_c * n_tokens + token, tl.sum(y * y, axis=1), mask=valid & owner)
    return acc


@triton.jit
def _pool_visual_tokens_kernel(
    x_ptr, out_ptr, scratch_ptr, M, n_tokens,
    T, H, W, C, PT, PH, PW,
    KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, UNROLL: tl.constexpr,
    ACT: tl.constexpr, NORMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M), cdiv(C, BLOCK_C)); M = B*PT*PH*PW output cells; K* = max window sizes."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = m < M
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = cols < C

    cells = PT * PH * PW
    b = m // cells
    r = m % cells
    ti = r // (PH * PW)
    hi = (r // PW) % PH
    wi = r % PW
    t0 = (ti * T) // PT
    h0 = (hi * H) // PH
    w0 = (wi * W) // PW
    nt = ((ti + 1) * T + PT - 1) // PT - t0
    nh = ((hi + 1) * H + PH - 1) // PH - h0
    nw = ((wi + 1) * W + PW - 1) // PW - w0
    base = ((b * T + t0) * (H * W) + h0 * W + w0).to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    # small windows unroll fully so all their loads are in flight at once; large ones loop
    if UNROLL:
        for k in tl.static_range(KT * KH * KW):
            acc = _accumulate_window_token(
                x_ptr, scratch_ptr, acc, k, base, t0, h0, w0, nt, nh, nw, ti, hi, wi, row_mask,
                cols, c_mask, pid_c, n_tokens, T, H, W, C, PT, PH, PW, KH, KW, ACT, NORMS)
    else:
        for k in range(KT * KH * KW):
            acc = _accumulate_window_token(
                x_ptr, scratch_ptr, acc, k, base, t0, h0, w0, nt, nh, nw, ti, hi, wi, row_mask,
                cols, c_mask, pid_c, n_tokens, T, H, W, C, PT, PH, PW, KH, KW, ACT, NORMS)

    count = (nt * nh * nw).to(tl.float32)
    pooled = acc / count[:, None]
    out_offs = m.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(out_ptr + out_offs, pooled.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & c_mask[None, :])


def _cuda_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_C": bc}, num_warps=nw)
        for bm, bc, nw in [
            (1, 1024, 4), (1, 2048, 8), (2, 512, 4), (2, 1024, 4),
            (4, 256, 4), (4, 512, 4), (4, 1024, 8), (8, 256, 4),
        ]
    ]


# the smallest BLOCK_C among the configs: sizes the per-C-block norm scratch before tuning picks one
_MIN_BLOCK_C = min(cfg.kwargs["BLOCK_C"] for cfg in _cuda_configs())
_pool_visual_tokens_kernel_tuned = triton.autotune(
    configs=_cuda_configs(), key=["M", "C", "KT", "KH", "KW", "ACT", "NORMS"],
)(_pool_visual_tokens_kernel)


def _pool_visual_tokens(
    x: torch.Tensor,
    num_frames: int,
    frame_shape: Sequence[int],
    pooling_shape: Sequence[int],
    act: str = "gelu",
    return_norms: bool = False,
    *,
    block_m: int | None = None,
    block_c: int | None = None,
):
    """Launch the fused kernel; arguments are assumed validated (see ``pllava_fast.ops``).

    Returns (pooled (B, t*h*w, C) in x.dtype, norms (B*T, H*W) fp32 or None). On CUDA, block sizes
    are autotuned unless given; elsewhere (the interpreter) large blocks keep the program count low.
    """
    x = x.contiguous()
    bt, hw, c = x.shape
    fh, fw = (int(v) for v in frame_shape)
    pt, ph, pw = (int(v) for v in pooling_shape)
    b = bt // num_frames
    m = b * pt * ph * pw
    kt, kh, kw = max_window(num_frames, pt), max_window(fh, ph), max_window(fw, pw)
    unroll = kt * kh * kw <= _MAX_UNROLLED_WINDOW
    out = torch.empty((b, pt * ph * pw, c), device=x.device, dtype=x.dtype)
    n_tokens = bt * hw
    tuned = x.is_cuda and block_m is None and block_c is None
    if not tuned:
        # the interpreter's cost is per op, not per element: few programs with large tiles
        block_c = block_c or min(triton.next_power_of_2(c), 1024)
        block_m = block_m or min(triton.next_power_of_2(m), max(1, 32768 // block_c))
    # partial sums of squares, one row per C block: every token has exactly one owner cell, so
    # the rows of the blocks the launch uses are fully written (the rest are never read)
    n_parts = triton.cdiv(c, _MIN_BLOCK_C if tuned else block_c)
    scratch = (torch.empty((n_parts, n_tokens), device=x.device, dtype=torch.float32)
               if return_norms else out)
    args = (x, out, scratch, m, n_tokens, num_frames, fh, fw, c, pt, ph, pw)
    consts = dict(KT=kt, KH=kh, KW=kw, UNROLL=unroll, ACT=ACT_CODES[act], NORMS=bool(return_norms))
    if tuned:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"]))  # noqa: E731
        _pool_visual_tokens_kernel_tuned[grid](*args, **consts)
        # configs tried while tuning wrote other rows; keep those of the config that ran last
        n_parts = triton.cdiv(c, _pool_visual_tokens_kernel_tuned.best_config.kwargs["BLOCK_C"])
    else:
        grid = (triton.cdiv(m, block_m), triton.cdiv(c, block_c))
        _pool_visual_tokens_kernel[grid](*args, **consts, BLOCK_M=block_m, BLOCK_C=block_c,
                                         num_warps=4)
    if not return_norms:
        return out, None
    norms = scratch[0] if n_parts == 1 else scratch[:n_parts].sum(0)
    return out, norms.sqrt_().view(bt, hw)


def pool_visual_tokens_ref(
    x: torch.Tensor,
    num_frames: int,
    frame_shape: Sequence[int],
    pooling_shape: Sequence[int],
    act: str = "gelu",
) -> torch.Tensor:
    """PLLaVA's projector tail as written originally: act, rearrange to (B, C, T, H, W),
    ``nn.AdaptiveAvgPool3d``, rearrange to (B, t*h*w, C). Computed in x's dtype."""
    bt, hw, c = x.shape
    fh, fw = frame_shape
    b = bt // num_frames
    y = apply_activation(x, act)
    video = y.reshape(b, num_frames, fh, fw, c).permute(0, 4, 1, 2, 3)
    pooled = torch.nn.AdaptiveAvgPool3d(tuple(pooling_shape))(video)
    return pooled.permute(0, 2, 3, 4, 1).reshape(b, -1, c)



def aot_specs():
    """The launches to compile ahead of time (``aot.py``): every autotune candidate, and the
    unrolled / looped window paths with the loads they must compile to."""
    from .aot import AotSpec, aligned

    ints = ["M", "n_tokens", "T", "H", "W", "C", "PT", "PH", "PW"]
    consts = ["KT", "KH", "KW", "UNROLL", "ACT", "NORMS", "BLOCK_M", "BLOCK_C"]
    sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "scratch_ptr": "*fp32",
           **{n: "i32" for n in ints}, **{n: "constexpr" for n in consts}}
    # what the JIT infers at launch for 16-aligned pointers and C % 16 == 0
    attrs = aligned(0, 1, 2, 4, 8)
    specs = [AotSpec(f"pool config {cfg.kwargs}", _pool_visual_tokens_kernel, sig,
                     dict(zip(consts, (1, 2, 2, True, 0, True, cfg.kwargs["BLOCK_M"],
                                       cfg.kwargs["BLOCK_C"]))), attrs, cfg.num_warps)
             for cfg in _cuda_configs()]
    # a small window unrolls: its loads are whole 16-byte rows; a large one loops
    specs.append(AotSpec("pool unrolled", _pool_visual_tokens_kernel, sig,
                         dict(zip(consts, (1, 2, 2, True, 0, True, 2, 1024))), attrs,
                         loads="only_vec16"))
    specs.append(AotSpec("pool looped", _pool_visual_tokens_kernel, sig,
                         dict(zip(consts, (4, 5, 4, False, 0, False, 2, 1024))), attrs))
    return specs
