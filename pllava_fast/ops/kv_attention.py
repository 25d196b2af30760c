"""``pllava_fast::decode_attention``: one new query token over a quantized KV cache.

Wrapper (validates) -> custom op (CUDA: the split-sequence Triton kernel of
``kernels/decode_attention.py``; CPU: chunked batched matmuls below) -> fake.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..checks import finite_float, is_int, power_of_two
from ._common import TRITON_DTYPES, in_cpu_graph
from .kv_quant import KV_BITS


def decode_attention(q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, v_codes: Tensor,
                     v_scale: Tensor, v_zero: Tensor, k_win: Tensor, v_win: Tensor,
                     kv_mask: Tensor | None = None, *, bits: int, group_size: int,
                     key_block: int = 0, sm_scale: float | None = None) -> Tensor:
    """Attention of one new token per sequence over a quantized cache + full-precision window.

    Shapes (see ``kernels/decode_attention.py``): q (B, Hq, D); codes (B, Hkv, Tq, Dc) uint8 (or
    floating for ``bits=16``); scales per token group (B, Hkv, Tq, G) or, for keys with
    ``key_block``, per channel (B, Hkv, Tq // key_block, D); window (B, Hkv, W, D); kv_mask
    (B, Tq + W) bool, True where a key is visible. Scales and zeros are float32; ``group_size``
    must match the scales' G = ceil(D / group_size); ``sm_scale`` is finite and > 0 (default
    1 / sqrt(D)). Returns (B, Hq, D) in q's dtype. Every mismatch is a ValueError naming the
    argument (before any kernel runs).
    """
    tensors = dict(q=q, k_codes=k_codes, k_scale=k_scale, k_zero=k_zero, v_codes=v_codes,
                   v_scale=v_scale, v_zero=v_zero, k_win=k_win, v_win=v_win)
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3 or not q.is_floating_point():
        raise ValueError(f"q must be a floating (B, Hq, D) tensor, got {q.dtype} {tuple(q.shape)}")
    b, hq, d = q.shape
    if d == 0 or d % 2:
        raise ValueError(f"decode attention needs an even head dim >= 2, got {d}")
    # bool and float are refused, not truncated: bits=8.0 or group_size=16.5 are mistakes
    if not is_int(bits) or bits not in KV_BITS:
        raise ValueError(f"bits must be one of {KV_BITS}, got {bits!r}")
    if not is_int(key_block) or key_block < 0 or key_block & (key_block - 1):
        raise ValueError(f"key_block must be 0 or a power of two, got {key_block!r}")
    for name, t in (("k_codes", k_codes), ("v_codes", v_codes), ("k_win", k_win), ("v_win", v_win)):
        if t.dim() != 4 or t.shape[0] != b:
            raise ValueError(f"{name} must be (B={b}, Hkv, T, *), got shape {tuple(t.shape)}")
    for name, t in tensors.items():
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    hkv, tq = k_codes.shape[1], k_codes.shape[2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv}), and "
                         "there must be at least one KV head")
    dc = d // 2 if bits == 4 else d
    if k_codes.shape[-1] != dc or v_codes.shape[-1] != dc or k_win.shape[-1] != d:
        raise ValueError(f"code width must be {dc} and window width {d} for head dim {d} at "
                         f"{bits} bits, got {k_codes.shape[-1]}, {v_codes.shape[-1]}, {k_win.shape[-1]}")
    if v_codes.shape != k_codes.shape:
        raise ValueError(f"v_codes {tuple(v_codes.shape)} must have k_codes' shape "
                         f"{tuple(k_codes.shape)}")
    if v_win.shape != k_win.shape or not (k_win.is_floating_point() and v_win.is_floating_point()):
        raise ValueError(f"k_win and v_win must be floating tensors of one shape, got {k_win.dtype} "
                         f"{tuple(k_win.shape)} and {v_win.dtype} {tuple(v_win.shape)}")
    if bits != 16:
        # fp8 (e4m3) codes read as int8 ones: converted to float, then code * scale + zero
        allowed = (torch.uint8, torch.float8_e4m3fn) if bits == 8 else (torch.uint8,)
        if k_codes.dtype not in allowed or v_codes.dtype != k_codes.dtype:
            raise ValueError(f"codes must be one dtype of {allowed} at {bits} bits, got "
                             f"{k_codes.dtype}, {v_codes.dtype}")
        group_size = power_of_two("group_size", group_size, minimum=2)
        groups = -(-d // group_size)
        key_shape = (b, hkv, tq // key_block, d) if key_block else (b, hkv, tq, groups)
        for name, t, want in (("k_scale", k_scale, key_shape), ("k_zero", k_zero, key_shape),
                              ("v_scale", v_scale, (b, hkv, tq, groups)),
                              ("v_zero", v_zero, (b, hkv, tq, groups))):
            if tuple(t.shape) != want or t.dtype != torch.float32:
                raise ValueError(f"{name} must be float32 {want} for group_size {group_size}"
                                 f"{f', key_block {key_block}' if key_block else ''}, got "
                                 f"{t.dtype} {tuple(t.shape)}")
    elif not (k_codes.is_floating_point() and v_codes.is_floating_point()):
        raise ValueError(f"codes must be floating at 16 bits, got {k_codes.dtype}, {v_codes.dtype}")
    elif not is_int(group_size):
        raise ValueError(f"group_size must be an int, got {group_size!r}")
    if kv_mask is not None and (not isinstance(kv_mask, Tensor) or kv_mask.dtype != torch.bool or
                                tuple(kv_mask.shape) != (b, tq + k_win.shape[2])):
        raise ValueError(f"kv_mask must be bool (B, Tq + W) = ({b}, {tq + k_win.shape[2]}), got "
                         f"{getattr(kv_mask, 'dtype', type(kv_mask).__name__)} "
                         f"{tuple(getattr(kv_mask, 'shape', ()))}")
    if key_block and tq % key_block:
        raise ValueError(f"per-channel keys cover whole blocks: Tq={tq} is not a multiple of "
                         f"key_block={key_block}")
    if bits == 16:
        k_scale = k_zero = v_scale = v_zero = q.new_empty(0, dtype=torch.float32)
    if sm_scale is None:
        scale = 1.0 / math.sqrt(d)
    else:
        scale = finite_float("sm_scale", sm_scale, positive=True)
    args = (q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win, kv_mask,
            int(bits), int(group_size), int(key_block), scale)
    if in_cpu_graph(q) and k_codes.numel() * (2 if bits == 4 else 1) <= _TRACED_ELEMENTS:
        # a small cache: the same implementation, traced (its conversions fuse into the step)
        return _decode_attention_torch(*args)
    return _decode_attention_op(*args)


@torch.library.custom_op("pllava_fast::decode_attention", mutates_args=())
def _decode_attention_op(
    q: Tensor, k_codes: Tensor, k_scale: Tensor, k_zero: Tensor, v_codes: Tensor, v_scale: Tensor,
    v_zero: Tensor, k_win: Tensor, v_win: Tensor, kv_mask: Tensor | None, bits: int,
    group_size: int, key_block: int, sm_scale: float,
) -> Tensor:
    args = (q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win, kv_mask,
            bits, group_size, key_block, sm_scale)
    return _decode_attention_torch(*args)


@_decode_attention_op.register_kernel("cuda")
def _decode_attention_cuda(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win,
                           kv_mask, bits, group_size, key_block, sm_scale):
    if q.dtype not in TRITON_DTYPES or k_win.dtype not in TRITON_DTYPES:
        # fp64: the torch implementation, on the GPU (the kernels take fp32 / bf16 / fp16)
        return _decode_attention_torch(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero,
                                       k_win, v_win, kv_mask, bits, group_size, key_block, sm_scale)
    from ..kernels.decode_attention import _decode_attention

    return _decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win,
                             kv_mask, bits, group_size, key_block, sm_scale)


@_decode_attention_op.register_fake
def _(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win, kv_mask, bits,
      group_size, key_block, sm_scale):
    return torch.empty_like(q)


# ---------------------------------------------------------------------------------------------
# CPU implementation
# ---------------------------------------------------------------------------------------------
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


def _fp8_to_fp16(codes: Tensor, scratch: Tensor) -> Tensor:
    """e4m3 codes -> the same values in fp16, through ``scratch`` (int16, codes' shape). CPU
    torch converts float8 one element at a time (an L2-sized chunk: 900 us against 22 us for
    uint8); as bits, e4m3's sign, exponent and mantissa move to fp16's places and a factor
    2**(15 - 7) fixes the exponent bias, subnormals included (5x faster, same values)."""
    scratch.copy_(codes.view(torch.uint8))
    low = scratch & 0x7F
    scratch.bitwise_and_(0x80).bitwise_left_shift_(1).bitwise_or_(low).bitwise_left_shift_(7)
    return scratch.view(torch.float16).mul_(256.0)


def _converted_chunks(codes: Tensor, buf: Tensor, bits: int):
    """Yield each token chunk of ``codes`` converted into ``buf`` (see ``_unpack_into``), as a
    (B * H * G, n, P * w) matrix view; full chunks reuse one prebuilt view (fewer Python ops)."""
    b, h, g, chunk, npl, w = buf.shape
    full = buf.view(b * h * g, chunk, npl * w)
    scratch = None
    if codes.dtype == torch.float8_e4m3fn:
        scratch = torch.empty(*codes.shape[:2], min(chunk, codes.shape[2]), codes.shape[3],
                              dtype=torch.int16, device=codes.device)
    for c in codes.split(chunk, dim=2):
        n = c.shape[2]
        if scratch is not None:
            c = _fp8_to_fp16(c, scratch[:, :, :n])
        dst = buf if n == chunk else buf[:, :, :, :n]
        _unpack_into(dst, c, bits)
        yield full if n == chunk else dst.reshape(b * h * g, n, npl * w)


# K/V elements (B * Hkv * Tq * D) up to which a CPU graph traces the implementation rather than
# calling the op: beyond about 4M, inductor's single-graph form fell to 0.5-0.9x of the op's
# chunked one at 4 sequences (8 KV heads x 128, int4 / int8, 2 threads); below, 1.5-3.2x
_TRACED_ELEMENTS = 1 << 21

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
