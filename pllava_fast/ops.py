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
from typing import Sequence

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


def _pool_visual_tokens_torch(x, num_frames, frame_shape, pooling_shape, act):
    """act + AdaptiveAvgPool3d over each video's (T, H, W) grid; fp32 accumulation."""
    bt, _, c = x.shape
    b = bt // num_frames
    y = apply_activation(x.float(), act)
    norms = torch.linalg.vector_norm(y, dim=-1)
    grid = y.view(b, num_frames, frame_shape[0], frame_shape[1], c).permute(0, 4, 1, 2, 3)
    pooled = F.adaptive_avg_pool3d(grid, pooling_shape)
    pooled = pooled.permute(0, 2, 3, 4, 1).reshape(b, -1, c)
    return pooled.to(x.dtype).contiguous(), norms


@torch.library.custom_op("pllava_fast::pool_visual_tokens", mutates_args=())
def _pool_visual_tokens_op(
    x: Tensor, num_frames: int, frame_h: int, frame_w: int,
    pool_t: int, pool_h: int, pool_w: int, act: str, return_norms: bool,
) -> tuple[Tensor, Tensor]:
    pooled, norms = _pool_visual_tokens_torch(
        x, num_frames, (frame_h, frame_w), (pool_t, pool_h, pool_w), act)
    return pooled, norms if return_norms else norms.new_empty(0)


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
        pooled (B, t*h*w, C) in x's dtype, and, when ``return_norms``, norms (B*T, H*W) fp32.
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B*T, H*W, C), got rank {x.dim()} shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")
    if int(num_frames) <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    num_frames = int(num_frames)
    fh, fw = (int(v) for v in frame_shape)
    if fh <= 0 or fw <= 0:
        raise ValueError(f"frame_shape must be 2 positive ints, got {tuple(frame_shape)}")
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
        pooled, norms = _pool_visual_tokens_torch(x, num_frames, (fh, fw), (pt, ph, pw), act)
        return (pooled, norms.detach()) if return_norms else pooled
    pooled, norms = _pool_visual_tokens_op(
        x.contiguous(), num_frames, fh, fw, pt, ph, pw, act, bool(return_norms))
    return (pooled, norms) if return_norms else pooled


@torch.library.custom_op("pllava_fast::token_norms", mutates_args=())
def _token_norms_op(x: Tensor) -> Tensor:
    return torch.linalg.vector_norm(x.float(), dim=-1)


@_token_norms_op.register_fake
def _(x):
    return x.new_empty(x.shape[:-1], dtype=torch.float32)


def token_norms(x: Tensor) -> Tensor:
    """Per-token L2 norms. x: (N, L, C) floating -> (N, L) fp32."""
    if not isinstance(x, Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a tensor of shape (N, L, C), got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")
    return _token_norms_op(x.contiguous())


# ---------------------------------------------------------------------------------------------
# Frames -> model input (csrc/)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# KV-cache quantization and decode attention
# ---------------------------------------------------------------------------------------------
