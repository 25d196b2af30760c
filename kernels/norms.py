"""Per-token L2 norms and per-row norm summaries, for profiling visual tokens.

``_token_norms``: x (N, L, C) floating (last dim contiguous; N, L strides free, so slices such as
hidden_states[:, 1:] need no copy) -> (N, L) fp32 norms, sum of squares accumulated in fp32.
``_norm_row_stats``: norms (N, L) fp32 and thresholds (N,) fp32 -> per row: mean (fp32), max
(fp32), argmax (int64, first maximal index, as torch), count of norms strictly above the row's
threshold (int64).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _token_norms_kernel(
    x_ptr, out_ptr, R, L, C, stride_n, stride_l,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(R, BLOCK_R),), R = N*L tokens; each program owns whole tokens (all of C)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_mask = r < R
    base = (r // L).to(tl.int64) * stride_n + (r % L).to(tl.int64) * stride_l
    # 2-D accumulator, reduced once at the end: one cross-lane reduction instead of one per block
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        v = tl.load(x_ptr + base[:, None] + cols[None, :],
                    mask=r_mask[:, None] & (cols < C)[None, :], other=0.0).to(tl.float32)
        acc += v * v
    tl.store(out_ptr + r, tl.sqrt(tl.sum(acc, axis=1)), mask=r_mask)


@triton.jit
def _norm_row_stats_kernel(
    norms_ptr, thr_ptr, mean_ptr, max_ptr, argmax_ptr, count_ptr, L, stride_n,
    BLOCK_L: tl.constexpr,
):
    """Grid (N,): one program per row, looping over L in BLOCK_L chunks."""
    row = tl.program_id(0)
    thr = tl.load(thr_ptr + row)
    base = norms_ptr + row.to(tl.int64) * stride_n
    lanes = tl.arange(0, BLOCK_L)
    total = tl.zeros((BLOCK_L,), dtype=tl.float32)
    count = tl.zeros((BLOCK_L,), dtype=tl.int32)
    # per-lane running max and its index; strict '>' keeps each lane's first maximum, and the
    # final min over tied lanes gives the first maximum of the row
    best = tl.full((BLOCK_L,), float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_L,), dtype=tl.int32) + L
    for l0 in range(0, L, BLOCK_L):
        idx = l0 + lanes
        mask = idx < L
        v = tl.load(base + idx, mask=mask, other=float("-inf"))
        total += tl.where(mask, v, 0.0)
        count += (mask & (v > thr)).to(tl.int32)
        better = v > best
        best_idx = tl.where(better, idx, best_idx)
        best = tl.where(better, v, best)
    row_max = tl.max(best, axis=0)
    row_argmax = tl.min(tl.where(best == row_max, best_idx, L), axis=0)
    tl.store(mean_ptr + row, tl.sum(total, axis=0) / L)
    tl.store(max_ptr + row, row_max)
    tl.store(argmax_ptr + row, row_argmax.to(tl.int64))
    tl.store(count_ptr + row, tl.sum(count, axis=0).to(tl.int64))


_token_norms_kernel_tuned = triton.autotune(
    configs=[
        triton.Config({"BLOCK_R": br, "BLOCK_C": bc}, num_warps=nw)
        for br, bc, nw in [(1, 1024, 4), (2, 1024, 4), (4, 512, 4), (4, 1024, 8), (8, 256, 4),
                           (16, 128, 4)]
    ],
    key=["R", "C"],
)(_token_norms_kernel)


def _token_norms(x: torch.Tensor, *, block_r: int | None = None, block_c: int | None = None):
    """Launch the norms kernel on a validated (N, L, C) tensor; returns (N, L) fp32."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    n, l, c = x.shape
    out = torch.empty((n, l), device=x.device, dtype=torch.float32)
    r = n * l
    if r == 0:
        return out
    if c == 0:
        return out.zero_()
    args = (x, out, r, l, c, x.stride(0), x.stride(1))
    if x.is_cuda and block_r is None and block_c is None:
        _token_norms_kernel_tuned[lambda meta: (triton.cdiv(r, meta["BLOCK_R"]),)](*args)
    else:
        # the interpreter: few, large programs
        block_c = block_c or min(triton.next_power_of_2(c), 1024)
        block_r = block_r or max(1, min(128, 16384 // block_c))
        _token_norms_kernel[(triton.cdiv(r, block_r),)](*args, BLOCK_R=block_r, BLOCK_C=block_c)
    return out


def _norm_row_stats(norms: torch.Tensor, threshold: torch.Tensor, *, block_l: int | None = None):
    """Launch the row-summary kernel: norms (N, L) fp32 with L >= 1, threshold (N,) fp32.

    Returns (mean (N,) fp32, max (N,) fp32, argmax (N,) int64, count_above (N,) int64).
    """
    if norms.stride(-1) != 1:
        norms = norms.contiguous()
    n, l = norms.shape
    threshold = threshold.to(torch.float32).contiguous()
    mean = torch.empty(n, device=norms.device, dtype=torch.float32)
    maxv = torch.empty_like(mean)
    argmax = torch.empty(n, device=norms.device, dtype=torch.int64)
    count = torch.empty_like(argmax)
    if n:
        block_l = block_l or min(triton.next_power_of_2(l), 4096)
        _norm_row_stats_kernel[(n,)](norms, threshold, mean, maxv, argmax, count, l,
                                     norms.stride(0), BLOCK_L=block_l,
                                     num_warps=4 if block_l <= 1024 else 8)
    return mean, maxv, argmax, count


def token_norms_ref(x: torch.Tensor) -> torch.Tensor:
    """(N, L, C) -> (N, L) fp32 L2 norms."""
    return torch.linalg.vector_norm(x.float(), dim=-1)


def norm_row_stats_ref(norms: torch.Tensor, threshold: torch.Tensor):
    """(mean, max, argmax, count strictly above threshold) per row of (N, L) norms."""
    norms = norms.float()
    maxv, argmax = norms.max(dim=1)
    count = (norms > threshold.reshape(-1, 1)).sum(dim=1)
    return norms.mean(dim=1), maxv, argmax, count


def aot_specs():
    """The launches to compile ahead of time (``aot.py``): every autotune candidate of the norms
    kernel, the interpreter's block choice, and the row-summary kernel."""
    from .aot import AotSpec, aligned

    sig = {"x_ptr": "*fp16", "out_ptr": "*fp32", "R": "i32", "L": "i32", "C": "i32",
           "stride_n": "i64", "stride_l": "i64", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
    specs = [AotSpec(f"norms config {cfg.kwargs}", _token_norms_kernel, sig, dict(cfg.kwargs),
                     aligned(0, 1, 4, 5, 6), cfg.num_warps)
             for cfg in _token_norms_kernel_tuned.configs]
    specs.append(AotSpec("norms fixed", _token_norms_kernel, sig, {"BLOCK_R": 4, "BLOCK_C": 512}))
    row = {n: "*fp32" for n in ("norms_ptr", "thr_ptr", "mean_ptr", "max_ptr")}
    row.update(argmax_ptr="*i64", count_ptr="*i64", L="i32", stride_n="i64", BLOCK_L="constexpr")
    specs.append(AotSpec("row stats", _norm_row_stats_kernel, row, {"BLOCK_L": 1024}))
    return specs
