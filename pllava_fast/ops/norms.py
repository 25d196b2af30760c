"""Per-token L2 norms and per-row norm summaries: ``pllava_fast::token_norms`` and
``pllava_fast::norm_row_stats`` (Triton on CUDA, ``kernels/norms.py``; torch on CPU).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..checks import finite_float
from ._common import TRITON_DTYPES, check_tokens


class TokenNormStats(NamedTuple):
    """Per-row norm summary; N rows (frames, videos or sequences) of L tokens."""
    norms: Tensor  # (N, L) fp32 per-token L2 norms
    mean: Tensor  # (N,) fp32
    max: Tensor  # (N,) fp32
    argmax: Tensor  # (N,) int64, first token with the row's max norm
    count_above: Tensor  # (N,) int64, tokens with norm strictly above the row's threshold
    threshold: Tensor  # (N,) fp32, the thresholds used


def norm_stats(norms: Tensor, threshold: float | Tensor = 0.0) -> TokenNormStats:
    """Summaries of precomputed norms (N, L) (e.g. ``pool_visual_tokens(..., return_norms=True)``).

    threshold: a number (not NaN; a bool is not a threshold), or a tensor on the norms' device,
    0-d or (N,) (one per row). +-inf are allowed: nothing / everything counts.
    """
    if not isinstance(norms, Tensor) or norms.dim() != 2:
        raise ValueError(f"norms must be a tensor of shape (N, L), got {getattr(norms, 'shape', type(norms))}")
    if not norms.is_floating_point():
        raise ValueError(f"norms must be floating point, got dtype {norms.dtype}")
    if norms.shape[1] == 0:
        raise ValueError(f"norms has no tokens per row, shape {tuple(norms.shape)}")
    n = norms.shape[0]
    if isinstance(threshold, Tensor):
        if threshold.device != norms.device:
            raise ValueError(
                f"threshold is on {threshold.device} but norms are on {norms.device}")
        if threshold.numel() not in (1, n) or threshold.dim() > 1:
            raise ValueError(
                f"threshold must be a scalar or have shape ({n},), got {tuple(threshold.shape)}")
        if threshold.is_complex() or threshold.dtype == torch.bool:
            raise ValueError(f"threshold must be a real tensor, got dtype {threshold.dtype}")
        thr = threshold.to(torch.float32).reshape(-1).expand(n).contiguous()
    else:
        if isinstance(threshold, float) and math.isinf(threshold):
            value = threshold
        else:
            value = finite_float("threshold", threshold)
        thr = torch.full((n,), value, dtype=torch.float32, device=norms.device)
    norms = norms.to(torch.float32).contiguous()
    return TokenNormStats(norms, *_norm_row_stats_op(norms, thr), thr)


def token_norm_stats(x: Tensor, threshold: float | Tensor = 0.0) -> TokenNormStats:
    """Per-token norms of x (N, L, C) and their per-row summaries (see ``norm_stats``)."""
    if isinstance(threshold, Tensor) and isinstance(x, Tensor) and threshold.device != x.device:
        raise ValueError(f"threshold is on {threshold.device} but x is on {x.device}")
    return norm_stats(token_norms(x), threshold)


def token_norms(x: Tensor) -> Tensor:
    """Per-token L2 norms. x: (N, L, C) floating -> (N, L) fp32 (fp32 accumulation)."""
    check_tokens(x, "(N, L, C)")
    # the kernel takes any N/L strides (e.g. hidden_states[:, 1:]); only C must be contiguous
    return _token_norms_op(x if x.stride(-1) == 1 else x.contiguous())


@torch.library.custom_op("pllava_fast::token_norms", mutates_args=())
def _token_norms_op(x: Tensor) -> Tensor:
    return _token_norms_torch(x)


@_token_norms_op.register_kernel("cuda")
def _token_norms_cuda(x):
    if x.dtype not in TRITON_DTYPES:
        return _token_norms_torch(x)
    from ..kernels.norms import _token_norms

    return _token_norms(x)


@_token_norms_op.register_fake
def _(x):
    return x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("pllava_fast::norm_row_stats", mutates_args=())
def _norm_row_stats_op(norms: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    maxv, argmax = norms.max(dim=1)
    count = (norms > threshold[:, None]).sum(dim=1)
    return norms.mean(dim=1), maxv, argmax, count


@_norm_row_stats_op.register_kernel("cuda")
def _norm_row_stats_cuda(norms, threshold):
    from ..kernels.norms import _norm_row_stats

    return _norm_row_stats(norms, threshold)


@_norm_row_stats_op.register_fake
def _(norms, threshold):
    n = norms.shape[0]
    mean = norms.new_empty(n)
    return mean, norms.new_empty(n), norms.new_empty(n, dtype=torch.int64), \
        norms.new_empty(n, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# CPU implementation
# ---------------------------------------------------------------------------------------------
def _token_norms_torch(x: Tensor) -> Tensor:
    if x.dtype in TRITON_DTYPES:  # low precision accumulates in fp32
        return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
    return torch.linalg.vector_norm(x, dim=-1).to(torch.float32)  # fp64: in fp64, then rounded
