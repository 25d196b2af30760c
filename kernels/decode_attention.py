"""Split-sequence (flash-decoding) attention of one new query token over a quantized KV cache.

The cache of one layer is a quantized part followed by a full-precision window of recent tokens:

* ``q``: (B, Hq, D) the new token's queries; ``Hq`` is a multiple of ``Hkv`` (GQA / MQA).
* ``k_codes``, ``v_codes``: (B, Hkv, Tq, Dc) uint8 codes in the ``kernels.kv_format`` format
  (``Dc = D // 2`` for int4, ``D`` for int8), float8_e4m3fn codes at ``bits=8`` (``kv_format``'s
  fp8: the int8 formula once converted), or floating (B, Hkv, Tq, D) for ``bits=16``.
  Views with a larger allocated token capacity are fine: only strides are used.
* ``k_scale``, ``k_zero``: (B, Hkv, Tq, ceil(D / group)) per token group, or, with
  ``key_block > 0`` (KIVI-style per-channel keys), (B, Hkv, Tq // key_block, D).
  ``v_scale``, ``v_zero``: always per token group.
* ``k_win``, ``v_win``: (B, Hkv, W, D) floating, the window, logically after the quantized part.
* ``kv_mask``: optional (B, Tq + W) bool, False for keys a sequence must not see (left padding).

Each program handles one KV head and all its query heads (the GQA group is the M dimension of the
dots) over one split of the quantized tokens, dequantizing code tiles in registers; the last split
covers the window. Partial (max, sum, accumulator) triples are reduced by a second kernel.
Softmax statistics and accumulation are fp32; nothing is dequantized to memory.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kv_format import dequantize_kv_ref

_LOG2E = 1.4426950408889634


@triton.jit
def _attend(qe, qo, ke, ko, ve, vo, valid, m, l, acc_e, acc_o, IEEE: tl.constexpr):
    # scores are already in log2 units (q carries sm_scale * log2(e))
    dt = qe.dtype
    if IEEE:
        s = tl.dot(qe, tl.trans(ke.to(dt)), input_precision="ieee")
        s += tl.dot(qo, tl.trans(ko.to(dt)), input_precision="ieee")
    else:
        s = tl.dot(qe, tl.trans(ke.to(dt))) + tl.dot(qo, tl.trans(ko.to(dt)))
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc_e = acc_e * alpha[:, None] + tl.dot(p.to(dt), ve.to(dt), input_precision="ieee")
        acc_o = acc_o * alpha[:, None] + tl.dot(p.to(dt), vo.to(dt), input_precision="ieee")
    else:
        acc_e = acc_e * alpha[:, None] + tl.dot(p.to(dt), ve.to(dt))
        acc_o = acc_o * alpha[:, None] + tl.dot(p.to(dt), vo.to(dt))
    return m_new, l, acc_e, acc_o


@triton.jit
def _pairs(x):
    """A (T, 2H) tile -> its even and odd columns, each (T, H)."""
    return tl.split(tl.reshape(x, (x.shape[0], x.shape[1] // 2, 2)))


@triton.jit
def _load_fp(ptr, t, tmask, D: tl.constexpr, HALF: tl.constexpr):
    """Even and odd channels of a (BLOCK_T, HALF) tile of a floating (T, D) row-major slab."""
    # one contiguous (BLOCK_T, 2 * HALF) load split in registers: two stride-2 loads would be
    # scalar on GPU, this one is vectorised
    d = tl.arange(0, 2 * HALF)
    x = tl.load(ptr + t[:, None] + d[None, :], mask=tmask[:, None] & (d[None, :] < D), other=0.0)
    xe, xo = _pairs(x)
    return xe.to(tl.float32), xo.to(tl.float32)


@triton.jit
def _load_dequant(c_ptr, s_ptr, z_ptr, t, tmask, stride_ct, stride_st, D: tl.constexpr,
                  HALF: tl.constexpr, BITS: tl.constexpr, TG: tl.constexpr, DG: tl.constexpr,
                  FP8: tl.constexpr = False):
    """Dequantized even / odd channel tiles; scale of element (t, d) at [t // TG, d // DG];
    ``FP8``: the 8-bit codes are e4m3 bit patterns (read as bytes, so masked lanes are 0.0)."""
    if BITS == 16:
        xe, xo = _load_fp(c_ptr, t * stride_ct, tmask, D, HALF)
    else:
        srow = (t[:, None] // TG) * stride_st
        if BITS == 4:
            j = tl.arange(0, HALF)
            mask = tmask[:, None] & (j[None, :] < D // 2)
            c = tl.load(c_ptr + t[:, None] * stride_ct + j[None, :], mask=mask, other=0)
            qe = (c & 15).to(tl.float32)
            qo = (c >> 4).to(tl.float32)
            if DG > 1:
                # a group never splits an (even, odd) channel pair: one scale load serves both
                se = tl.load(s_ptr + srow + (2 * j[None, :]) // DG, mask=mask, other=0.0)
                ze = tl.load(z_ptr + srow + (2 * j[None, :]) // DG, mask=mask, other=0.0)
                so = se
                zo = ze
            else:
                d = tl.arange(0, 2 * HALF)
                mask2 = tmask[:, None] & (d[None, :] < D)
                se, so = _pairs(tl.load(s_ptr + srow + d[None, :], mask=mask2, other=0.0))
                ze, zo = _pairs(tl.load(z_ptr + srow + d[None, :], mask=mask2, other=0.0))
            xe = qe * se + ze
            xo = qo * so + zo
        else:
            d = tl.arange(0, 2 * HALF)
            mask2 = tmask[:, None] & (d[None, :] < D)
            q = tl.load(c_ptr + t[:, None] * stride_ct + d[None, :], mask=mask2, other=0)
            if FP8:
                q = q.to(tl.float8e4nv, bitcast=True)
            sc = tl.load(s_ptr + srow + d[None, :] // DG, mask=mask2, other=0.0)
            zr = tl.load(z_ptr + srow + d[None, :] // DG, mask=mask2, other=0.0)
            xe, xo = _pairs(q.to(tl.float32) * sc + zr)
    return xe, xo


@triton.jit
def _decode_split_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, kw_ptr, vw_ptr, mask_ptr,
    o_ptr, m_ptr, l_ptr,
    qk_scale, TQ, TW, CHUNK,
    sq_b, sq_h,
    skc_b, skc_h, skc_t, sks_b, sks_h, sks_t,
    svc_b, svc_h, svc_t, svs_b, svs_h, svs_t,
    skw_b, skw_h, skw_t, svw_b, svw_h, svw_t,
    smask_b,
    # a runtime value, not a constexpr: the split count follows the cache length (1..64 as a
    # sequence grows), and a constexpr would compile a new kernel for each count mid-generation
    NUM_SPLITS,
    HKV: tl.constexpr, R: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
    KTG: tl.constexpr, KDG: tl.constexpr, VDG: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr,
    HALF: tl.constexpr, IEEE: tl.constexpr, FP8: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    # int64 offsets: batch x capacity strides exceed 2**31 at 32 x 32k tokens
    b = (pid_bh // HKV).to(tl.int64)
    hk = (pid_bh % HKV).to(tl.int64)
    r = tl.arange(0, BLOCK_R)
    j = tl.arange(0, HALF)
    # the lanes of `2 * j < D` (D is even) in a form whose constancy along j the compiler sees
    dmask = j < D // 2
    qmask = (r[:, None] < R) & dmask[None, :]
    q_row = q_ptr + b * sq_b + (hk * R + r[:, None]) * sq_h + 2 * j[None, :]
    qe = (tl.load(q_row, mask=qmask, other=0.0).to(tl.float32) * qk_scale).to(q_ptr.dtype.element_ty)
    qo = (tl.load(q_row + 1, mask=qmask, other=0.0).to(tl.float32) * qk_scale).to(q_ptr.dtype.element_ty)

    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_R,), tl.float32)
    acc_e = tl.zeros((BLOCK_R, HALF), tl.float32)
    acc_o = tl.zeros((BLOCK_R, HALF), tl.float32)
    tt = tl.arange(0, BLOCK_T)
    if pid_s < NUM_SPLITS:
        kc = kc_ptr + b * skc_b + hk * skc_h
        ks = ks_ptr + b * sks_b + hk * sks_h
        kz = kz_ptr + b * sks_b + hk * sks_h
        vc = vc_ptr + b * svc_b + hk * svc_h
        vs = vs_ptr + b * svs_b + hk * svs_h
        vz = vz_ptr + b * svs_b + hk * svs_h
        start = pid_s * CHUNK
        end = tl.minimum(start + CHUNK, TQ)
        for t0 in range(start, end, BLOCK_T):
            t = t0 + tt
            tmask = t < end
            ke, ko = _load_dequant(kc, ks, kz, t, tmask, skc_t, sks_t, D, HALF, BITS, KTG, KDG,
                                   FP8)
            ve, vo = _load_dequant(vc, vs, vz, t, tmask, svc_t, svs_t, D, HALF, BITS, 1, VDG,
                                   FP8)
            valid = tmask
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + b * smask_b + t, mask=tmask, other=0) != 0)
            m, l, acc_e, acc_o = _attend(qe, qo, ke, ko, ve, vo, valid, m, l, acc_e, acc_o, IEEE)
    else:
        kw = kw_ptr + b * skw_b + hk * skw_h
        vw = vw_ptr + b * svw_b + hk * svw_h
        for t0 in range(0, TW, BLOCK_T):
            t = t0 + tt
            tmask = t < TW
            ke, ko = _load_fp(kw, t * skw_t, tmask, D, HALF)
            ve, vo = _load_fp(vw, t * svw_t, tmask, D, HALF)
            valid = tmask
            if HAS_MASK:
                valid = valid & (tl.load(mask_ptr + b * smask_b + TQ + t, mask=tmask, other=0) != 0)
            m, l, acc_e, acc_o = _attend(qe, qo, ke, ko, ve, vo, valid, m, l, acc_e, acc_o, IEEE)

    # partials laid out (B * Hq, NUM_SPLITS + 1[, D]); query head hk * R + r of sequence b
    row = (pid_bh * R + r) * (NUM_SPLITS + 1) + pid_s
    rmask = r < R
    tl.store(m_ptr + row, m, mask=rmask)
    tl.store(l_ptr + row, l, mask=rmask)
    o_row = o_ptr + row[:, None] * D + 2 * j[None, :]
    tl.store(o_row, acc_e, mask=qmask)
    tl.store(o_row + 1, acc_o, mask=qmask)


@triton.jit
def _reduce_splits_kernel(o_ptr, m_ptr, l_ptr, out_ptr, S, D: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # S (splits + 1) is a runtime value for the same reason as NUM_SPLITS above
    pid = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < S
    m = tl.load(m_ptr + pid * S + s, mask=smask, other=float("-inf"))
    l = tl.load(l_ptr + pid * S + s, mask=smask, other=0.0)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)
    acc = tl.load(o_ptr + (pid * S + s[:, None]) * D + d[None, :],
                  mask=smask[:, None] & (d[None, :] < D), other=0.0)
    num = tl.sum(acc * w[:, None], axis=0)
    den = tl.sum(l * w, axis=0)
    # a sequence that sees no key at all (fully padded) gets zeros, not NaN
    out = num / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + pid * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def _split_blocks(d: int, r: int, fp32: bool = False) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_T, HALF) of the split kernel for head dim ``d`` and GQA group ``r``.

    Every dot dim is kept >= 16, the smallest MMA tile on NVIDIA GPUs: a group of 1 or 7 query
    heads is padded to 16 masked rows. fp32 queries (the exactness path) take half the token
    tile: at 64 the fp32 dot operands spill 0.7-1.4 KB per thread on sm_90, at 32 none at
    d=128. Shared with the sm_90 AOT test.
    """
    block_t = 64 if d <= 128 and not fp32 else 32
    half = max(16, triton.next_power_of_2(d) // 2)
    return max(16, triton.next_power_of_2(r)), block_t, half


def _num_splits(device: torch.device, programs: int, blocks: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        target = triton.cdiv(4 * sms, max(programs, 1))
    else:  # interpreter: every program costs, keep a couple of splits to exercise the reduction
        target = 2
    return max(1, min(target, blocks, 64))


def _decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win,
                      kv_mask, bits: int, group_size: int, key_block: int, sm_scale: float,
                      num_splits: int | None = None) -> Tensor:
    """Launcher (shapes as in the module docstring; inputs validated by ``pllava_fast.ops``)."""
    b, hq, d = q.shape
    hkv, tq = k_codes.shape[1], k_codes.shape[2]
    tw = k_win.shape[2]
    r = hq // hkv
    block_r, block_t, half = _split_blocks(d, r, q.dtype == torch.float32)
    blocks = triton.cdiv(tq, block_t)
    splits = num_splits or _num_splits(q.device, b * hkv, blocks)
    splits = max(1, min(splits, max(blocks, 1)))
    chunk = triton.cdiv(triton.cdiv(max(tq, 1), splits), block_t) * block_t
    s_total = splits + 1
    o = torch.empty(b * hq, s_total, d, dtype=torch.float32, device=q.device)
    m = torch.empty(b * hq, s_total, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    if bits == 16:
        k_scale = k_zero = v_scale = v_zero = k_codes  # unused
    fp8 = k_codes.dtype == torch.float8_e4m3fn
    if fp8:  # bytes: a masked load's 0 is then the e4m3 bit pattern of 0.0
        k_codes, v_codes = k_codes.view(torch.uint8), v_codes.view(torch.uint8)
    key_tg, key_dg = (key_block, 1) if key_block else (1, group_size)
    mask = kv_mask.view(torch.uint8) if kv_mask is not None else q
    stride = lambda t: (t.stride(0), t.stride(1), t.stride(2))  # noqa: E731
    for t in (k_codes, k_scale, v_codes, v_scale, k_win, v_win):
        if t.stride(-1) != 1:
            raise ValueError(f"decode attention needs a contiguous last dim, got strides {t.stride()}")
    _decode_split_kernel[(b * hkv, s_total)](
        q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win, mask,
        o, m, l,
        sm_scale * _LOG2E, tq, tw, chunk,
        q.stride(0), q.stride(1),
        *stride(k_codes), *stride(k_scale), *stride(v_codes), *stride(v_scale),
        *stride(k_win), *stride(v_win),
        kv_mask.stride(0) if kv_mask is not None else 0, splits,
        HKV=hkv, R=r, D=d, BITS=bits, KTG=key_tg, KDG=key_dg, VDG=group_size,
        HAS_MASK=kv_mask is not None, BLOCK_R=block_r, BLOCK_T=block_t,
        HALF=half, IEEE=q.dtype == torch.float32, FP8=fp8,
        num_warps=4)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    _reduce_splits_kernel[(b * hq,)](o, m, l, out, s_total, D=d,
                                     BLOCK_S=triton.next_power_of_2(s_total),
                                     BLOCK_D=triton.next_power_of_2(d))
    return out


# ---------------------------------------------------------------------------------------------
# Plain-torch references
# ---------------------------------------------------------------------------------------------
def decode_attention_ref(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, k_win, v_win,
                         kv_mask, bits: int, group_size: int, key_block: int, sm_scale: float):
    """fp32 SDPA over the fully dequantized cache: (B, Hq, D) in q's dtype."""
    d = q.shape[-1]
    k = torch.cat([dequantize_kv_ref(k_codes, k_scale, k_zero, bits, d, group_size, key_block),
                   k_win.float()], dim=2)
    v = torch.cat([dequantize_kv_ref(v_codes, v_scale, v_zero, bits, d, group_size),
                   v_win.float()], dim=2)
    r = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
    mask = None if kv_mask is None else kv_mask[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.float()[:, :, None], k, v, attn_mask=mask, scale=sm_scale)[:, :, 0]
    if kv_mask is not None:
        out = torch.where(kv_mask.any(-1)[:, None, None], out, torch.zeros_like(out))
    return out.to(q.dtype)


_SPLIT_POINTERS = ["q_ptr", "kc_ptr", "ks_ptr", "kz_ptr", "vc_ptr", "vs_ptr", "vz_ptr", "kw_ptr",
                   "vw_ptr", "mask_ptr", "o_ptr", "m_ptr", "l_ptr"]
_SPLIT_INTS = ["TQ", "TW", "CHUNK", "sq_b", "sq_h", "skc_b", "skc_h", "skc_t", "sks_b", "sks_h",
               "sks_t", "svc_b", "svc_h", "svc_t", "svs_b", "svs_h", "svs_t", "skw_b", "skw_h",
               "skw_t", "svw_b", "svw_h", "svw_t", "smask_b", "NUM_SPLITS"]
# act, head dim, GQA group, bits, key_block, group, mask, splits: GQA 1 / 7 (Yi-34B 56:8) / 8,
# head dims 64 / 80 / 128, int4 / int8 / unquantized codes, token-group or per-channel keys
_SPLIT_CASES = [
    ("bf16", 128, 7, 4, 0, 128, True, 33), ("bf16", 128, 7, 8, 32, 64, False, 1),
    ("bf16", 128, 1, 4, 32, 64, True, 64), ("bf16", 128, 8, 16, 0, 64, True, 2),
    ("fp16", 80, 7, 4, 0, 64, False, 4), ("fp16", 80, 4, 8, 16, 32, True, 4),
    ("bf16", 64, 1, 8, 0, 64, False, 4), ("fp16", 64, 8, 4, 32, 64, True, 4),
    ("fp32", 80, 7, 4, 0, 64, False, 2), ("fp32", 128, 1, 16, 0, 64, False, 2),
]
# fp8 (e4m3) codes, 8 bits with token groups: bytes bitcast to e4m3, converted in registers
_FP8_CASES = [("bf16", 128, 7, 8, 0, 128, True, 33), ("fp16", 64, 8, 8, 0, 64, False, 4)]


def aot_specs():
    """The launches to compile ahead of time (``aot.py``): the split kernel as the JIT
    specialises a launch (batch 2, 8 KV heads, capacity 4096, window 100: a 1 becomes a
    constant, a multiple of 16 gets the divisibility hint), code and window tiles loaded as
    whole rows (16-byte loads), and the reduction."""
    from .aot import AotSpec, aligned

    specs = []
    cases = [(*c, False) for c in _SPLIT_CASES] + [(*c, True) for c in _FP8_CASES]
    for act, d, r, bits, kb, g, has_mask, splits, fp8 in cases:
        block_r, block_t, half = _split_blocks(d, r, act == "fp32")
        ktg, kdg = (kb, 1) if kb else (1, g)
        c = dict(HKV=8, R=r, D=d, BITS=bits, KTG=ktg, KDG=kdg, VDG=g, HAS_MASK=has_mask,
                 BLOCK_R=block_r, BLOCK_T=block_t, HALF=half, IEEE=act == "fp32", FP8=fp8)
        cd = "u8" if bits != 16 else act
        types = [act, cd, "fp32", "fp32", cd, "fp32", "fp32", act, act,
                 "u8" if has_mask else act, "fp32", "fp32", "fp32"]
        sig = {n: "*" + t for n, t in zip(_SPLIT_POINTERS, types)}
        sig["qk_scale"] = "fp32"
        dc, ng = (d // 2 if bits == 4 else d), triton.cdiv(d, g)
        st = d if kb else ng
        vals = dict(TQ=1024, TW=100, CHUNK=256, sq_b=8 * r * d, sq_h=d, skc_b=8 * 4096 * dc,
                    skc_h=4096 * dc, skc_t=dc, sks_b=8 * 4096 * st, sks_h=4096 * st, sks_t=st,
                    svc_b=8 * 4096 * dc, svc_h=4096 * dc, svc_t=dc, svs_b=8 * 4096 * ng,
                    svs_h=4096 * ng, svs_t=ng, skw_b=800 * d, skw_h=100 * d, skw_t=d,
                    svw_b=800 * d, svw_h=100 * d, svw_t=d, smask_b=1124, NUM_SPLITS=splits)
        attrs = aligned(*range(len(_SPLIT_POINTERS)))
        for i, n in enumerate(_SPLIT_INTS, start=len(_SPLIT_POINTERS) + 1):
            if vals[n] == 1:
                sig[n], c[n] = "constexpr", 1
            else:
                sig[n] = "i32"
                if vals[n] % 16 == 0:
                    attrs.update(aligned(i))
        sig.update({n: "constexpr" for n in c if n not in _SPLIT_INTS})
        specs.append(AotSpec(f"decode split {act} d{d} r{r} bits{bits} kb{kb}{' fp8' * fp8}",
                             _decode_split_kernel, sig, c, attrs, loads="vec16"))
    for s, d, out in ((2, 128, "bf16"), (34, 80, "fp16"), (65, 64, "fp32")):
        c = dict(D=d, BLOCK_S=triton.next_power_of_2(s), BLOCK_D=triton.next_power_of_2(d))
        sig = {"o_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "out_ptr": "*" + out,
               "S": "i32", **{n: "constexpr" for n in c}}
        specs.append(AotSpec(f"reduce splits {s} d{d} {out}", _reduce_splits_kernel, sig, c))
    return specs
