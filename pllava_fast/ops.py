"""The one op registry of pllava-fast.

Every public op is a ``torch.library`` custom op in the ``pllava_fast::`` namespace with a fake
(meta) implementation, so ``torch.compile`` and ``torch.export`` trace through it. Dispatch rule:
CUDA tensors run the Triton kernel (or the CUDA extension); CPU tensors run a vectorised torch or
C++ implementation, never the Triton interpreter. The thin Python wrappers below validate inputs
and raise ``ValueError`` naming the problem.

Sections: visual-token pooling and norms | frames -> model input | KV-cache quantization and
decode attention.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# ---------------------------------------------------------------------------------------------
# Activations shared by the projector, the references and the kernels (names as in transformers).
# ---------------------------------------------------------------------------------------------
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "quick_gelu", "identity")


def apply_activation(x: Tensor, act: str) -> Tensor:
    """Plain-torch activation by transformers' name (``gelu`` is the exact erf form)."""
    if act == "gelu":
        return F.gelu(x)
    if act == "gelu_pytorch_tanh":
        return F.gelu(x, approximate="tanh")
    if act == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if act == "identity":
        return x
    raise ValueError(f"unsupported activation {act!r}; expected one of {ACTIVATIONS}")


# ---------------------------------------------------------------------------------------------
# Visual-token pooling and norms
# ---------------------------------------------------------------------------------------------
def _as_triple(name: str, value: Sequence[int]) -> tuple[int, int, int]:
    try:
        vals = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of 3 positive ints, got {value!r}") from None
    if len(vals) != 3 or any(v <= 0 for v in vals):
        raise ValueError(f"{name} must be 3 positive ints, got {value!r}")
    return vals


def _as_pair(name: str, value: Sequence[int]) -> tuple[int, int]:
    try:
        vals = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of 2 positive ints, got {value!r}") from None
    if len(vals) != 2 or any(v <= 0 for v in vals):
        raise ValueError(f"{name} must be 2 positive ints, got {value!r}")
    return vals


# dtypes the Triton kernels take (fp32 accumulation); others (fp64) stay on the torch path
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _pooling_matrix(size_in: int, size_out: int, device) -> Tensor:
    """(size_out, size_in) fp32 averaging matrix of AdaptiveAvgPool's windows along one axis:
    row i is 1/n over [floor(i*In/Out), ceil((i+1)*In/Out))."""
    i = torch.arange(size_out, device=device)
    start = (i * size_in) // size_out
    end = ((i + 1) * size_in + size_out - 1) // size_out
    j = torch.arange(size_in, device=device)
    inside = (j >= start[:, None]) & (j < end[:, None])
    return inside.float() / (end - start).float()[:, None]


def _pool_visual_tokens_torch(x, num_frames, frame_shape, pooling_shape, act, return_norms):
    """act + AdaptiveAvgPool3d over each video's (T, H, W) grid, in fp32; differentiable.

    The 3-D window average is separable, so it runs as one small averaging-matrix product per
    axis on the (B, T, H, W, C) layout as stored: no permute copies, and BLAS instead of the
    strided channels-first pooling loop (4-6x faster on CPU). Returns (pooled, norms or None).
    """
    bt, _, c = x.shape
    b = bt // num_frames
    (fh, fw), (pt, ph, pw) = frame_shape, pooling_shape
    y = apply_activation(x.float(), act)
    norms = torch.linalg.vector_norm(y, dim=-1) if return_norms else None
    rows = b
    for size_in, size_out in ((num_frames, pt), (fh, ph), (fw, pw)):
        if size_in != size_out:
            y = torch.matmul(_pooling_matrix(size_in, size_out, x.device),
                             y.reshape(rows, size_in, -1))
        rows *= size_out
    return y.reshape(b, pt * ph * pw, c).to(x.dtype), norms


@torch.library.custom_op("pllava_fast::pool_visual_tokens", mutates_args=())
def _pool_visual_tokens_op(
    x: Tensor, num_frames: int, frame_h: int, frame_w: int,
    pool_t: int, pool_h: int, pool_w: int, act: str, return_norms: bool,
) -> tuple[Tensor, Tensor]:
    pooled, norms = _pool_visual_tokens_torch(
        x, num_frames, (frame_h, frame_w), (pool_t, pool_h, pool_w), act, return_norms)
    return pooled, norms if return_norms else x.new_empty(0, dtype=torch.float32)


@_pool_visual_tokens_op.register_kernel("cuda")
def _(x, num_frames, frame_h, frame_w, pool_t, pool_h, pool_w, act, return_norms):
    args = (x, num_frames, (frame_h, frame_w), (pool_t, pool_h, pool_w), act, return_norms)
    if x.dtype in _TRITON_DTYPES:
        from pllava_fast.kernels.pooling import _pool_visual_tokens

        pooled, norms = _pool_visual_tokens(*args)
    else:
        pooled, norms = _pool_visual_tokens_torch(*args)
    return pooled, norms if return_norms else x.new_empty(0, dtype=torch.float32)


@_pool_visual_tokens_op.register_fake
def _(x, num_frames, frame_h, frame_w, pool_t, pool_h, pool_w, act, return_norms):
    b = x.shape[0] // num_frames
    pooled = x.new_empty(b, pool_t * pool_h * pool_w, x.shape[-1])
    norms = x.new_empty((x.shape[0], x.shape[1]) if return_norms else (0,), dtype=torch.float32)
    return pooled, norms


def pool_visual_tokens(
    x: Tensor,
    num_frames: int,
    frame_shape: Sequence[int],
    pooling_shape: Sequence[int],
    act: str = "gelu",
    return_norms: bool = False,
):
    """Activation + PLLaVA's adaptive average pooling of visual tokens, in one pass.

    Args:
        x: (B*T, H*W, C) linear_1 outputs in PLLaVA's frame-major layout, floating point.
        num_frames: T, frames per video.
        frame_shape: (H, W) of each frame's token grid.
        pooling_shape: (t, h, w) output grid, any positive sizes (windows as AdaptiveAvgPool3d).
        act: "gelu" | "gelu_pytorch_tanh" | "quick_gelu" | "identity".
        return_norms: also return the fp32 L2 norm of every activated input token.

    Returns:
        pooled (B, t*h*w, C) in x's dtype, tokens in (t, h, w) order, and, when ``return_norms``,
        norms (B*T, H*W) fp32. CUDA runs the fused Triton kernel (fp32 accumulation); CPU runs
        torch. When x requires grad (training) the differentiable torch path is used.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B*T, H*W, C), got rank {x.dim()} shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x is empty, shape {tuple(x.shape)}")
    if int(num_frames) <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    num_frames = int(num_frames)
    fh, fw = _as_pair("frame_shape", frame_shape)
    pt, ph, pw = _as_triple("pooling_shape", pooling_shape)
    if x.shape[1] != fh * fw:
        raise ValueError(
            f"x has {x.shape[1]} tokens per frame but frame_shape {fh}x{fw} = {fh * fw}")
    if x.shape[0] % num_frames:
        raise ValueError(
            f"x has {x.shape[0]} frames (dim 0), not divisible by num_frames={num_frames}")
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {act!r}; expected one of {ACTIVATIONS}")
    if torch.is_grad_enabled() and x.requires_grad:
        # custom op has no autograd formula: training goes through the differentiable torch path
        pooled, norms = _pool_visual_tokens_torch(
            x, num_frames, (fh, fw), (pt, ph, pw), act, return_norms)
        return (pooled, norms.detach()) if return_norms else pooled
    pooled, norms = _pool_visual_tokens_op(
        x.contiguous(), num_frames, fh, fw, pt, ph, pw, act, bool(return_norms))
    return (pooled, norms) if return_norms else pooled


@torch.library.custom_op("pllava_fast::token_norms", mutates_args=())
def _token_norms_op(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)


@_token_norms_op.register_kernel("cuda")
def _(x):
    if x.dtype not in _TRITON_DTYPES:
        return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)
    from pllava_fast.kernels.norms import _token_norms

    return _token_norms(x)


@_token_norms_op.register_fake
def _(x):
    return x.new_empty(x.shape[:-1], dtype=torch.float32)


def _check_tokens(x) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (N, L, C), got rank {x.dim()} shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")


def token_norms(x: Tensor) -> Tensor:
    """Per-token L2 norms. x: (N, L, C) floating -> (N, L) fp32 (fp32 accumulation)."""
    _check_tokens(x)
    # the kernel takes any N/L strides (e.g. hidden_states[:, 1:]); only C must be contiguous
    return _token_norms_op(x if x.stride(-1) == 1 else x.contiguous())


@torch.library.custom_op("pllava_fast::norm_row_stats", mutates_args=())
def _norm_row_stats_op(norms: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    maxv, argmax = norms.max(dim=1)
    count = (norms > threshold[:, None]).sum(dim=1)
    return norms.mean(dim=1), maxv, argmax, count


@_norm_row_stats_op.register_kernel("cuda")
def _(norms, threshold):
    from pllava_fast.kernels.norms import _norm_row_stats

    return _norm_row_stats(norms, threshold)


@_norm_row_stats_op.register_fake
def _(norms, threshold):
    n = norms.shape[0]
    mean = norms.new_empty(n)
    return mean, norms.new_empty(n), norms.new_empty(n, dtype=torch.int64), \
        norms.new_empty(n, dtype=torch.int64)


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

    threshold: a float, or a tensor on the norms' device, 0-d or (N,) (one per row).
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
        thr = threshold.to(torch.float32).reshape(-1).expand(n).contiguous()
    else:
        thr = torch.full((n,), float(threshold), dtype=torch.float32, device=norms.device)
    norms = norms.to(torch.float32).contiguous()
    return TokenNormStats(norms, *_norm_row_stats_op(norms, thr), thr)


def token_norm_stats(x: Tensor, threshold: float | Tensor = 0.0) -> TokenNormStats:
    """Per-token norms of x (N, L, C) and their per-row summaries (see ``norm_stats``)."""
    if isinstance(threshold, Tensor) and isinstance(x, Tensor) and threshold.device != x.device:
        raise ValueError(f"threshold is on {threshold.device} but x is on {x.device}")
    return norm_stats(token_norms(x), threshold)


# ---------------------------------------------------------------------------------------------
# Frames -> model input (csrc/)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# KV-cache quantization and decode attention
# ---------------------------------------------------------------------------------------------
