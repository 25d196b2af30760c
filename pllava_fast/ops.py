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
def _positive_ints(name: str, value: Sequence[int], n: int) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of {n} positive ints, got {value!r}") from None
    if len(vals) != n or any(v <= 0 for v in vals):
        raise ValueError(f"{name} must be {n} positive ints, got {value!r}")
    return vals


def _as_triple(name: str, value: Sequence[int]) -> tuple[int, int, int]:
    return _positive_ints(name, value, 3)


def _as_pair(name: str, value: Sequence[int]) -> tuple[int, int]:
    return _positive_ints(name, value, 2)


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
    pooled = y.reshape(b, pt * ph * pw, c).to(x.dtype)
    if y is x:
        # fp32, identity act and no pooled axis: a view of x, but an op's output must not alias
        pooled = pooled.clone()
    return pooled, norms


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
def _token_norms_cuda(x):
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
def _norm_row_stats_cuda(norms, threshold):
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
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
COLOR_MATRICES = ("bt601", "bt709")  # index = the op's ``matrix`` argument
FRAME_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("pllava_fast::frames_to_tensor", mutates_args=())
def _frames_to_tensor_op(
    frames: Tensor, u: Tensor | None, v: Tensor | None, matrix: int, full_range: bool,
    geometry: list[int], mean: list[float], std: list[float], dtype: torch.dtype,
) -> Tensor:
    from . import _ext
    ext = _ext.load()
    args = (frames, u, v, matrix, full_range, list(geometry), list(mean), list(std), dtype)
    if ext is not None and frames.device.type == "cpu":
        return ext.frames_to_tensor_cpu(*args)
    if ext is not None and frames.device.type == "cuda" and getattr(ext, "with_cuda", False):
        return ext.frames_to_tensor_cuda(*args)
    from .preprocess import frames_to_tensor_torch  # same math in torch (no _C, or no CUDA _C)
    return frames_to_tensor_torch(*args)


@_frames_to_tensor_op.register_fake
def _(frames, u, v, matrix, full_range, geometry, mean, std, dtype):
    out = geometry[10]
    return frames.new_empty((frames.shape[0], 3, out, out), dtype=dtype)


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
    geometry = [int(g) for g in geometry]
    if len(geometry) != 11:
        raise ValueError(f"geometry must be 11 ints, got {len(geometry)}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std must have 3 values, got {len(mean)} and {len(std)}")
    if dtype not in FRAME_DTYPES:
        raise ValueError(f"dtype must be one of {FRAME_DTYPES}, got {dtype}")
    return _frames_to_tensor_op(
        frames, u, v, COLOR_MATRICES.index(matrix), bool(full_range), geometry,
        [float(m) for m in mean], [float(s) for s in std], dtype)



# ---------------------------------------------------------------------------------------------
# KV-cache quantization and decode attention
# ---------------------------------------------------------------------------------------------
KV_BITS = (4, 8, 16)


def _kv_kernels():
    # imported lazily: Triton (and its interpreter flag) only matters once a kernel is used
    from .kernels import decode_attention as da, kv_quant as kq
    return kq, da


@torch.library.custom_op("pllava_fast::quantize_kv", mutates_args=())
def _quantize_kv_op(x: Tensor, bits: int, group_size: int, key_block: int) -> tuple[Tensor, Tensor, Tensor]:
    kq, _ = _kv_kernels()
    if x.is_cuda:
        if key_block:
            return kq._quantize_channels(x, bits, key_block)
        return kq._quantize_groups(x, bits, group_size)
    if key_block:
        return kq.quantize_channels_ref(x, bits, key_block)
    return kq.quantize_groups_ref(x, bits, group_size)


@_quantize_kv_op.register_fake
def _(x, bits, group_size, key_block):
    n, d = x.shape
    codes = x.new_empty(n, d // 2 if bits == 4 else d, dtype=torch.uint8)
    shape = (n // key_block, d) if key_block else (n, -(-d // group_size))
    return codes, x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


def quantize_kv(x: Tensor, bits: int = 4, group_size: int = 64, key_block: int = 0):
    """Asymmetric int8 / int4 quantization of KV rows (format in ``kernels/kv_quant.py``).

    Args:
        x: (N, D) floating, one row per (sequence, head, token).
        bits: 8 or 4 (int4 packs two codes per byte). D must be even.
        group_size: channels per scale group (power of two), for token groups.
        key_block: 0 for token groups; else KIVI-style per-channel groups over ``key_block``
            consecutive rows (a power of two dividing N).

    Returns:
        codes (N, D or D // 2) uint8, scale and zero float32: (N, ceil(D / group_size)) for token
        groups, (N // key_block, D) for channel groups.
    """
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (N, D) tensor, got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if x.shape[1] % 2:
        raise ValueError(f"KV quantization needs an even head dim, got {x.shape[1]}")
    if group_size < 2 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 2, got {group_size}")
    if key_block < 0 or (key_block and (key_block & (key_block - 1) or x.shape[0] % key_block)):
        raise ValueError(f"key_block must be 0 or a power of two dividing N={x.shape[0]}, got {key_block}")
    return _quantize_kv_op(x.contiguous(), int(bits), int(group_size), int(key_block))


def _planes(x: Tensor, bits: int) -> Tensor:
    """(..., D) -> (..., P, D // P) in the order the code planes are unpacked: int4 bytes hold a
    channel pair (low nibble even, high nibble odd), so int4 works on an even and an odd plane
    (P = 2) and unpacking is two vectorised bit ops per byte, no interleave; int8 has one plane."""
    if bits == 4:
        return torch.stack((x[..., 0::2], x[..., 1::2]), dim=-2)
    return x.unsqueeze(-2)


def _unpack_into(buf: Tensor, codes: Tensor, bits: int) -> None:
    """Convert a (B, H, n, Dc) code chunk into ``buf`` (B, H, G, n, P, w) of the compute dtype:
    planes split, channel groups moved next to the batch dims so that each group's dot products
    are one batched matmul (BLAS), and a partial last group zero-padded."""
    groups, width = buf.shape[2], buf.shape[-1]
    planes = (codes & 15, codes >> 4) if bits == 4 else (codes,)
    for i, c in enumerate(planes):
        if groups == 1 and width == c.shape[-1]:
            buf[:, :, 0, :, i].copy_(c)  # the common case (group >= head dim): a plain 4-d copy
            continue
        pad = groups * width - c.shape[-1]
        if pad:
            c = F.pad(c, (0, pad))
        buf[..., i, :].copy_(c.unflatten(-1, (groups, width)).transpose(2, 3))


def _converted_chunks(codes: Tensor, buf: Tensor, bits: int):
    """Yield each token chunk of ``codes`` converted into ``buf`` (see ``_unpack_into``), as a
    (B * H * G, n, P * w) matrix view; full chunks reuse one prebuilt view (fewer Python ops)."""
    b, h, g, chunk, npl, w = buf.shape
    full = buf.view(b * h * g, chunk, npl * w)
    for c in codes.split(chunk, dim=2):
        n = c.shape[2]
        dst = buf if n == chunk else buf[:, :, :, :n]
        _unpack_into(dst, c, bits)
        yield full if n == chunk else dst.reshape(b * h * g, n, npl * w)


# elements of one converted code chunk (all sequences and heads): 2 MiB of fp32, about one
# core's L2. Smaller chunks pay the per-op overhead more often; larger ones spill to L3 and the
# conversion copy slows down (measured at 32 heads x 128, 1 and 8 sequences).
_DECODE_CHUNK_ELEMENTS = 1 << 19


def _decode_attention_torch(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win,
                            kv_mask, bits, group_size, key_block, sm_scale, chunk=None):
    """CPU path, two passes over the codes in token chunks. Each chunk is converted once to fp32
    (int4 unpacked with bit ops) into a reused buffer and fed to batched matmuls (BLAS). Per-group
    scale/zero are folded in on the small side: q . (s c + z) = s (q . c) + z sum(q) for the
    scores, sum_t p (s c + z) = (p s) . c + p . z for the values, so no dequantized K/V is formed.
    The scores of the whole context, (B, Hq, T) fp32, are small, so the softmax is exact over one
    row (no per-chunk online rescaling), which leaves only the conversion and one matmul per chunk
    and pass. Query heads are laid out as (KV head, GQA group), so K/V are never repeated."""
    b, hq, d = q.shape
    hkv, tq = k_codes.shape[1], k_codes.shape[2]
    r, bh, f32 = hq // hkv, b * hkv, torch.float32
    qg = q.to(f32).view(b, hkv, r, d) * sm_scale
    if chunk is None:
        chunk = max(16, _DECODE_CHUNK_ELEMENTS // max(1, bh * d) // 16 * 16)
    if key_block:
        chunk = max(key_block, chunk // key_block * key_block)
    chunk = max(1, min(chunk, tq))
    spans = [(t0, min(t0 + chunk, tq)) for t0 in range(0, tq, chunk)]
    npl = 2 if bits == 4 else 1
    dp = d // npl
    # token groups: G groups of w channels per plane (a single group spans the whole row)
    ng = 1 if bits == 16 else -(-d // group_size)
    w = dp if ng == 1 else group_size // npl

    # -- pass 1: scores of the quantized part
    if bits == 16:
        s_q = torch.cat([torch.matmul(qg, k_codes[:, :, t0:t1].to(f32).transpose(-1, -2))
                         for t0, t1 in spans] or [qg.new_empty(b, hkv, r, 0)], -1)
    else:
        qp = _planes(qg, bits)  # (B, H, R, P, Dp)
        if key_block:
            # per-channel key scales, constant over a block of tokens: folded into q per block
            qk = qp.flatten(-2)  # (B, H, R, P * Dp)
            qks = qk[:, :, None] * _planes(k_scale, bits).flatten(-2)[:, :, :, None]  # (B, H, NB, R, PD)
            zdot = torch.matmul(_planes(k_zero, bits).flatten(-2), qk.transpose(-1, -2))  # (B, H, NB, R)
            kbuf = torch.empty(b, hkv, 1, chunk, npl, dp, dtype=f32, device=q.device)
            parts, b0 = [], 0
            for kc in _converted_chunks(k_codes, kbuf, bits):
                nb = kc.shape[1] // key_block
                kc = kc.view(b, hkv, nb, key_block, npl * dp)
                parts.append(torch.matmul(qks[:, :, b0:b0 + nb], kc.transpose(-1, -2)))
                b0 += nb
            dots = torch.cat(parts, 2) if parts else qks.new_empty(b, hkv, 0, r, key_block)
            s_q = (dots + zdot[..., None]).permute(0, 1, 3, 2, 4).reshape(b, hkv, r, tq)
        else:
            if ng * w != dp:
                qp = F.pad(qp, (0, ng * w - dp))
            qv = qp.unflatten(-1, (ng, w)).permute(0, 1, 4, 2, 3, 5)  # (B, H, G, R, P, w)
            qsum = qv.sum((-2, -1))[..., None]  # (B, H, G, R, 1)
            qv = qv.reshape(bh * ng, r, npl * w)
            kbuf = torch.empty(b, hkv, ng, chunk, npl, w, dtype=f32, device=q.device)
            parts = [torch.bmm(qv, kc.transpose(1, 2)) for kc in _converted_chunks(k_codes, kbuf, bits)]
            dots = torch.cat(parts, -1) if parts else qv.new_empty(bh * ng, r, 0)
            ks = k_scale.transpose(2, 3)[:, :, :, None]  # (B, H, G, 1, Tq)
            kz = k_zero.transpose(2, 3)[:, :, :, None]
            s_q = torch.addcmul(qsum * kz, dots.view(b, hkv, ng, r, tq), ks).sum(2)

    # -- exact softmax over the whole row (quantized part, then the window)
    s = torch.cat([s_q, torch.matmul(qg, k_win.to(f32).transpose(-1, -2))], -1)
    if kv_mask is not None:
        s = s.masked_fill(~kv_mask[:, None, None], float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(m), torch.zeros_like(m), m))  # masked rows: p = 0
    l = p.sum(-1, keepdim=True)
    pq = p[..., :tq]

    # -- pass 2: values
    acc = torch.matmul(p[..., tq:], v_win.to(f32))  # (B, H, R, D)
    if bits == 16:
        for t0, t1 in spans:
            acc = acc + torch.matmul(pq[..., t0:t1], v_codes[:, :, t0:t1].to(f32))
    elif tq:
        ps = (pq[:, :, None] * v_scale.transpose(2, 3)[:, :, :, None]).reshape(bh * ng, r, tq)
        accq = qg.new_zeros(bh * ng, r, npl * w)
        vbuf = kbuf if kbuf.shape == (b, hkv, ng, chunk, npl, w) else \
            torch.empty(b, hkv, ng, chunk, npl, w, dtype=f32, device=q.device)
        t0 = 0
        for vc in _converted_chunks(v_codes, vbuf, bits):
            accq.baddbmm_(ps[:, :, t0:t0 + vc.shape[1]], vc)
            t0 += vc.shape[1]
        zsum = torch.matmul(pq, v_zero).transpose(2, 3)[..., None]  # (B, H, G, R, 1)
        accq = (accq.view(b, hkv, ng, r, npl * w) + zsum).unflatten(-1, (npl, w))
        # (B, H, G, R, P, w) -> (B, H, R, D) in channel order
        accq = accq.permute(0, 1, 3, 4, 2, 5).reshape(b, hkv, r, npl, ng * w)[..., :dp]
        acc = acc + accq.transpose(-1, -2).reshape(b, hkv, r, d)
    out = acc / torch.where(l > 0, l, torch.ones_like(l))
    return out.view(b, hq, d).to(q.dtype)


@torch.library.custom_op("pllava_fast::decode_attention", mutates_args=())
def _decode_attention_op(
    q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, v_codes: Tensor, v_scale: Tensor,
    v_zero: Tensor, k_win: Tensor, v_win: Tensor, kv_mask: Tensor | None, bits: int,
    group_size: int, key_block: int, sm_scale: float,
) -> Tensor:
    args = (q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win, kv_mask,
            bits, group_size, key_block, sm_scale)
    if q.is_cuda:
        return _kv_kernels()[1]._decode_attention(*args)
    return _decode_attention_torch(*args)


@_decode_attention_op.register_fake
def _(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win, kv_mask, bits,
      group_size, key_block, sm_scale):
    return torch.empty_like(q)


def decode_attention(q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, v_codes: Tensor,
                     v_scale: Tensor, v_zero: Tensor, k_win: Tensor, v_win: Tensor,
                     kv_mask: Tensor | None = None, *, bits: int, group_size: int,
                     key_block: int = 0, sm_scale: float | None = None) -> Tensor:
    """Attention of one new token per sequence over a quantized cache + full-precision window.

    Shapes (see ``kernels/decode_attention.py``): q (B, Hq, D); codes (B, Hkv, Tq, Dc) uint8 (or
    floating for ``bits=16``); scales per token group (B, Hkv, Tq, G) or, for keys with
    ``key_block``, per channel (B, Hkv, Tq // key_block, D); window (B, Hkv, W, D); kv_mask
    (B, Tq + W) bool, True where a key is visible. Returns (B, Hq, D) in q's dtype.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be (B, Hq, D), got shape {tuple(q.shape)}")
    b, hq, d = q.shape
    if d % 2:
        raise ValueError(f"decode attention needs an even head dim, got {d}")
    if bits not in KV_BITS:
        raise ValueError(f"bits must be one of {KV_BITS}, got {bits}")
    for name, t in (("k_codes", k_codes), ("v_codes", v_codes), ("k_win", k_win), ("v_win", v_win)):
        if t.dim() != 4 or t.shape[0] != b:
            raise ValueError(f"{name} must be (B={b}, Hkv, T, *), got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    hkv, tq = k_codes.shape[1], k_codes.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    dc = d if bits != 4 else d // 2
    if k_codes.shape[-1] != dc or v_codes.shape[-1] != dc or k_win.shape[-1] != d:
        raise ValueError(f"code width must be {dc} and window width {d} for head dim {d} at "
                         f"{bits} bits, got {k_codes.shape[-1]}, {v_codes.shape[-1]}, {k_win.shape[-1]}")
    if bits != 16 and (k_codes.dtype != torch.uint8 or v_codes.dtype != torch.uint8):
        raise ValueError(f"codes must be uint8 at {bits} bits, got {k_codes.dtype}, {v_codes.dtype}")
    if kv_mask is not None and (kv_mask.dtype != torch.bool or
                                tuple(kv_mask.shape) != (b, tq + k_win.shape[2])):
        raise ValueError(f"kv_mask must be bool (B, Tq + W) = ({b}, {tq + k_win.shape[2]}), "
                         f"got {kv_mask.dtype} {tuple(kv_mask.shape)}")
    if key_block and tq % key_block:
        raise ValueError(f"per-channel keys cover whole blocks: Tq={tq} is not a multiple of "
                         f"key_block={key_block}")
    if bits == 16:
        k_scale = k_zero = v_scale = v_zero = q.new_empty(0, dtype=torch.float32)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / math.sqrt(d)
    return _decode_attention_op(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win,
                                v_win, kv_mask, int(bits), int(group_size), int(key_block), scale)
