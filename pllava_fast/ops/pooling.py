"""``pllava_fast::pool_visual_tokens``: activation + PLLaVA's adaptive 3-D average pool.

Wrapper (validates) -> custom op -> CUDA: the fused Triton kernel (``kernels/pooling.py``) -> fake
-> CPU: separable averaging-matrix products in torch (fp32 accumulation).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..checks import allocation, flag, int_tuple, positive_int
from ..kernels.adaptive import ACTIVATIONS, apply_activation, pool_windows, pooling_matrix
from ._common import TRITON_DTYPES, check_tokens



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
    check_tokens(x, "(B*T, H*W, C)")
    if x.numel() == 0:
        raise ValueError(f"x is empty, shape {tuple(x.shape)}")
    num_frames = positive_int("num_frames", num_frames)
    fh, fw = int_tuple("frame_shape", frame_shape, 2)
    pt, ph, pw = int_tuple("pooling_shape", pooling_shape, 3)
    if x.shape[1] != fh * fw:
        raise ValueError(
            f"x has {x.shape[1]} tokens per frame but frame_shape {fh}x{fw} = {fh * fw}")
    if x.shape[0] % num_frames:
        raise ValueError(
            f"x has {x.shape[0]} frames (dim 0), not divisible by num_frames={num_frames}")
    if act not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {act!r}; expected one of {ACTIVATIONS}")
    return_norms = flag("return_norms", return_norms)
    _check_allocation(x, num_frames, (fh, fw), (pt, ph, pw))
    if torch.is_grad_enabled() and x.requires_grad:
        # custom op has no autograd formula: training goes through the differentiable torch path
        pooled, norms = _pool_visual_tokens_torch(
            x, num_frames, (fh, fw), (pt, ph, pw), act, return_norms)
        return (pooled, norms.detach()) if return_norms else pooled
    pooled, norms = _pool_visual_tokens_op(
        x.contiguous(), num_frames, fh, fw, pt, ph, pw, act, bool(return_norms))
    return (pooled, norms) if return_norms else pooled


def _check_allocation(x: Tensor, num_frames: int, frame_shape, pooling_shape) -> None:
    """An upsampling pooling_shape (AdaptiveAvgPool3d allows one) can ask for far more memory
    than x holds: (1000, 1000, 1000) is tens of GiB. Refused with the shape named, before the
    allocator fails (or the machine swaps). CPU counts its fp32 per-axis intermediates."""
    (fh, fw), (pt, ph, pw) = frame_shape, pooling_shape
    b, c = x.shape[0] // num_frames, x.shape[-1]
    if x.device.type == "cpu":
        nbytes = b * c * max(pt * fh * fw, pt * ph * fw, pt * ph * pw) * 4
    else:
        nbytes = b * c * pt * ph * pw * x.element_size()
    allocation(f"pooling_shape {(pt, ph, pw)} for {b} video(s) of {c} channels", nbytes, x.device)


@torch.library.custom_op("pllava_fast::pool_visual_tokens", mutates_args=())
def _pool_visual_tokens_op(
    x: Tensor, num_frames: int, frame_h: int, frame_w: int,
    pool_t: int, pool_h: int, pool_w: int, act: str, return_norms: bool,
) -> tuple[Tensor, Tensor]:
    pooled, norms = _pool_visual_tokens_torch(
        x, num_frames, (frame_h, frame_w), (pool_t, pool_h, pool_w), act, return_norms)
    return pooled, norms if return_norms else x.new_empty(0, dtype=torch.float32)


@_pool_visual_tokens_op.register_kernel("cuda")
def _pool_visual_tokens_cuda(x, num_frames, frame_h, frame_w, pool_t, pool_h, pool_w, act, return_norms):
    args = (x, num_frames, (frame_h, frame_w), (pool_t, pool_h, pool_w), act, return_norms)
    if x.dtype in TRITON_DTYPES:
        from ..kernels.pooling import _pool_visual_tokens

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


# ---------------------------------------------------------------------------------------------
# CPU implementation
# ---------------------------------------------------------------------------------------------
def _pool_axis(y: Tensor, rows: int, size_in: int, size_out: int, finite: bool) -> Tensor:
    """Average (rows, size_in, rest) over each window of the middle axis -> (rows, size_out, rest).

    Finite inputs: one averaging-matrix product (BLAS). With NaN / Inf present a matrix product
    would spread them into every cell (0 * NaN = NaN), so each window is averaged on its own,
    which keeps them inside their windows as ``nn.AdaptiveAvgPool3d`` does.
    """
    y = y.reshape(rows, size_in, -1)
    if finite:
        return torch.matmul(pooling_matrix(size_in, size_out, y.device), y)
    return torch.stack([y[:, s:e].mean(1) for s, e in pool_windows(size_in, size_out)], 1)


def _pool_axes(y: Tensor, b: int, axes, finite: bool) -> Tensor:
    """``_pool_axis`` over the (size_in, size_out) of T, H and W in turn."""
    rows = b
    for size_in, size_out in axes:
        if size_in != size_out:
            y = _pool_axis(y, rows, size_in, size_out, finite)
        rows *= size_out
    return y


def _pool_visual_tokens_torch(x, num_frames, frame_shape, pooling_shape, act, return_norms):
    """act + AdaptiveAvgPool3d over each video's (T, H, W) grid, in fp32; differentiable.

    The 3-D window average is separable, so it runs as one small averaging-matrix product per
    axis on the (B, T, H, W, C) layout as stored: no permute copies, and BLAS instead of the
    strided channels-first pooling loop (4-6x faster on CPU). Returns (pooled, norms or None).
    """
    bt, _, c = x.shape
    b = bt // num_frames
    (fh, fw), (pt, ph, pw) = frame_shape, pooling_shape
    act_out = apply_activation(x.float(), act)
    norms = torch.linalg.vector_norm(act_out, dim=-1) if return_norms else None
    axes = ((num_frames, pt), (fh, ph), (fw, pw))
    y = _pool_axes(act_out, b, axes, finite=True)
    # every input is in some window with a positive weight, so a NaN / Inf anywhere makes the
    # output's sum non-finite (as does an overflowing sum: then the exact path runs for nothing).
    # One sum of the pooled output costs 2 ms at the 7B shape; isfinite(input).all() took 125
    if not bool(torch.isfinite(y.sum())):
        y = _pool_axes(act_out, b, axes, finite=False)
    pooled = y.reshape(b, pt * ph * pw, c).to(x.dtype)
    if y is x:
        # fp32, identity act and no pooled axis: a view of x, but an op's output must not alias
        pooled = pooled.clone()
    return pooled, norms
