"""The kernels' GPU path without a GPU: Triton compiles them ahead of time for sm_90 (bundled
ptxas) with the constexprs their CUDA launchers choose.

The CPU tests run the kernels under TRITON_INTERPRET=1, which accepts what real compilation
rejects (dot dims < 16, non-power-of-two blocks, operand dtype mismatches, constexpr misuse), so
this is the only check of the compiled path on a machine without a GPU.
"""
import os
import subprocess
import sys
import textwrap

import pytest


def _compile_for_sm90(script):
    """Run ``script`` in a fresh interpreter without TRITON_INTERPRET (the CPU tests set it; this
    compiles for real) and return its stdout; skip where this Triton has no ptxas."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas available to this Triton")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


_COMPILE_KV = textwrap.dedent(r"""
    import itertools
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pllava_fast.kernels import decode_attention as da, kv_quant as kq

    target = GPUTarget("cuda", 90, 32)
    ptrs16 = lambda idx: {(i,): [["tt.divisibility", 16]] for i in idx}  # noqa: E731

    def build(fn, sig, consts, attrs, num_warps=4):
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=target,
                           options={"num_warps": num_warps})
        assert k.asm["cubin"], fn
        return k

    # 16-byte global loads, direct or as pipelined async copies
    vec16 = re.compile(r"ld\.global[.a-z0-9:_]*\.v4\.b32|cp\.async\.c[ag]\.shared\.global "
                       r"\[[^]]*\], \[[^]]*\], 0x10")

    # quantize on append: activations in the model dtypes (fp32 for the exactness paths)
    seen = set()
    for act, d, g, bits in itertools.product(("bf16", "fp32"), (64, 80, 128), (32, 128), (4, 8)):
        block_n, block_ng = kq._group_blocks(d, g)
        c = dict(D=d, G=g, NG=triton.cdiv(d, g), BITS=bits, BLOCK_N=block_n, BLOCK_NG=block_ng)
        if (act, *c.values()) in seen or (act == "fp32" and d != 80):
            continue
        seen.add((act, *c.values()))
        sig = {"x_ptr": "*" + act, "codes_ptr": "*u8", "scale_ptr": "*fp32", "zero_ptr": "*fp32",
               "N": "i32", **{n: "constexpr" for n in c}}
        k = build(kq._quantize_groups_kernel, sig, c, ptrs16(range(4)))
        assert vec16.search(k.asm["ptx"]), c  # rows loaded whole, then split even / odd
    for d, block, bits in ((64, 32, 4), (80, 32, 8), (128, 16, 4), (128, 128, 8)):
        c = dict(D=d, BLOCK=block, BITS=bits, BLOCK_HALF=triton.next_power_of_2(d // 2))
        sig = {"x_ptr": "*fp16", "codes_ptr": "*u8", "scale_ptr": "*fp32", "zero_ptr": "*fp32",
               **{n: "constexpr" for n in c}}
        k = build(kq._quantize_channels_kernel, sig, c, ptrs16(range(4)))
        assert vec16.search(k.asm["ptx"]), c
    print("quant ok", len(seen) + 4, flush=True)

    # split kernel: GQA groups 1 / 7 (Yi-34B 56:8) / 8, head dims 64 / 80 / 128, int4 / int8 /
    # unquantized codes, token-group or per-channel keys, with and without a padding mask
    names = ["q_ptr", "kc_ptr", "ks_ptr", "kz_ptr", "vc_ptr", "vs_ptr", "vz_ptr", "kw_ptr",
             "vw_ptr", "mask_ptr", "o_ptr", "m_ptr", "l_ptr"]
    ints = ["TQ", "TW", "CHUNK", "sq_b", "sq_h", "skc_b", "skc_h", "skc_t", "sks_b", "sks_h",
            "sks_t", "svc_b", "svc_h", "svc_t", "svs_b", "svs_h", "svs_t", "skw_b", "skw_h",
            "skw_t", "svw_b", "svw_h", "svw_t", "smask_b", "NUM_SPLITS"]
    cases = [  # act, d, r, bits, key_block, group, mask, splits
        ("bf16", 128, 7, 4, 0, 128, True, 33), ("bf16", 128, 7, 8, 32, 64, False, 1),
        ("bf16", 128, 1, 4, 32, 64, True, 64), ("bf16", 128, 8, 16, 0, 64, True, 2),
        ("fp16", 80, 7, 4, 0, 64, False, 4), ("fp16", 80, 4, 8, 16, 32, True, 4),
        ("bf16", 64, 1, 8, 0, 64, False, 4), ("fp16", 64, 8, 4, 32, 64, True, 4),
        ("fp32", 80, 7, 4, 0, 64, False, 2), ("fp32", 128, 1, 16, 0, 64, False, 2),
    ]
    for act, d, r, bits, kb, g, has_mask, splits in cases:
        block_r, block_t, half = da._split_blocks(d, r, act == "fp32")
        ktg, kdg = (kb, 1) if kb else (1, g)
        c = dict(HKV=8, R=r, D=d, BITS=bits, KTG=ktg, KDG=kdg, VDG=g, HAS_MASK=has_mask,
                 BLOCK_R=block_r, BLOCK_T=block_t, HALF=half,
                 IEEE=act == "fp32")
        cd = "u8" if bits != 16 else act
        types = [act, cd, "fp32", "fp32", cd, "fp32", "fp32", act, act,
                 "u8" if has_mask else act, "fp32", "fp32", "fp32"]
        sig = {n: "*" + t for n, t in zip(names, types)}
        sig["qk_scale"] = "fp32"
        # as the JIT specialises a launch (batch 2, 8 KV heads, capacity 4096, window 100):
        # a 1 becomes a constant, a multiple of 16 gets the divisibility hint
        dc, ng = (d // 2 if bits == 4 else d), triton.cdiv(d, g)
        st = d if kb else ng
        vals = dict(TQ=1024, TW=100, CHUNK=256, sq_b=8 * r * d, sq_h=d, skc_b=8 * 4096 * dc,
                    skc_h=4096 * dc, skc_t=dc, sks_b=8 * 4096 * st, sks_h=4096 * st, sks_t=st,
                    svc_b=8 * 4096 * dc, svc_h=4096 * dc, svc_t=dc, svs_b=8 * 4096 * ng,
                    svs_h=4096 * ng, svs_t=ng, skw_b=800 * d, skw_h=100 * d, skw_t=d,
                    svw_b=800 * d, svw_h=100 * d, svw_t=d, smask_b=1124,
                    NUM_SPLITS=splits)
        attrs = ptrs16(range(13))
        for i, n in enumerate(ints, start=len(names) + 1):
            if vals[n] == 1:
                sig[n] = "constexpr"
                c[n] = 1
            else:
                sig[n] = "i32"
                if vals[n] % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        sig.update({n: "constexpr" for n in c if n not in ints})
        k = build(da._decode_split_kernel, sig, c, attrs)
        # code and window tiles are loaded as whole rows, not as stride-2 scalar gathers
        assert vec16.search(k.asm["ptx"]), (act, d, r, bits)
    print("decode ok", len(cases), flush=True)

    for s, d, out in ((2, 128, "bf16"), (34, 80, "fp16"), (65, 64, "fp32")):
        c = dict(D=d, BLOCK_S=triton.next_power_of_2(s), BLOCK_D=triton.next_power_of_2(d))
        sig = {"o_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "out_ptr": "*" + out,
               "S": "i32", **{n: "constexpr" for n in c}}
        build(da._reduce_splits_kernel, sig, c, {})
    print("reduce ok", flush=True)
""")


def test_kv_kernels_compile_for_sm90():
    stdout = _compile_for_sm90(_COMPILE_KV)
    for line in ("quant ok", "decode ok", "reduce ok"):
        assert line in stdout, stdout


# the pooling kernel's bf16 signature, shared by the two pooling scripts below
_POOLING_PRELUDE = textwrap.dedent("""
    import re
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from pllava_fast.kernels import norms, pooling

    target = GPUTarget("cuda", 90, 32)
    ints = ["M", "n_tokens", "T", "H", "W", "C", "PT", "PH", "PW"]
    consts = ["KT", "KH", "KW", "UNROLL", "ACT", "NORMS", "BLOCK_M", "BLOCK_C"]
    sig = {"x_ptr": "*bf16", "out_ptr": "*bf16", "scratch_ptr": "*fp32",
           **{n: "i32" for n in ints}, **{n: "constexpr" for n in consts}}
    # what the JIT infers at launch for 16-aligned pointers and C % 16 == 0
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 4, 8)}
""")

_COMPILE_POOLING_CONFIGS = _POOLING_PRELUDE + textwrap.dedent("""
    # every autotune candidate must compile: one that fails aborts tuning on the GPU
    for cfg in pooling._cuda_configs():
        values = dict(zip(consts, (1, 2, 2, True, 0, True, cfg.kwargs["BLOCK_M"],
                                   cfg.kwargs["BLOCK_C"])))
        triton.compile(ASTSource(pooling._pool_visual_tokens_kernel, sig, values, aligned),
                       target=target, options={"num_warps": cfg.num_warps})
    sig = {"x_ptr": "*fp16", "out_ptr": "*fp32", "R": "i32", "L": "i32", "C": "i32",
           "stride_n": "i64", "stride_l": "i64", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
    aligned = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 4, 5, 6)}
    for cfg in norms._token_norms_kernel_tuned.configs:
        triton.compile(ASTSource(norms._token_norms_kernel, sig, dict(cfg.kwargs), aligned),
                       target=target, options={"num_warps": cfg.num_warps})
    print("configs ok")
""")


def test_pooling_autotune_configs_compile_for_sm90():
    assert "configs ok" in _compile_for_sm90(_COMPILE_POOLING_CONFIGS)


_COMPILE_POOLING = _POOLING_PRELUDE + textwrap.dedent("""
    for unroll, window, nrm in ((True, (1, 2, 2), True), (False, (4, 5, 4), False)):
        values = dict(zip(consts, (*window, unroll, 0, nrm, 2, 1024)))
        k = triton.compile(ASTSource(pooling._pool_visual_tokens_kernel, sig, values, aligned),
                           target=target, options={"num_warps": 4})
        print("pool", unroll, sorted(set(re.findall(r"ld\\.global[.a-z0-9]*", k.asm["ptx"]))))
    sig = {"x_ptr": "*fp16", "out_ptr": "*fp32", "R": "i32", "L": "i32", "C": "i32",
           "stride_n": "i64", "stride_l": "i64", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}
    triton.compile(ASTSource(norms._token_norms_kernel, sig, {"BLOCK_R": 4, "BLOCK_C": 512}),
                   target=target)
    sig = {n: "*fp32" for n in ("norms_ptr", "thr_ptr", "mean_ptr", "max_ptr")}
    sig.update(argmax_ptr="*i64", count_ptr="*i64", L="i32", stride_n="i64", BLOCK_L="constexpr")
    triton.compile(ASTSource(norms._norm_row_stats_kernel, sig, {"BLOCK_L": 1024}), target=target)
    print("norms ok")
""")


def test_kernels_compile_for_sm90():
    """The GPU path without a GPU: Triton compiles the kernels down to sm_90 cubins (bundled
    ptxas), and the hot loads of the unrolled pooling kernel are 128-bit vector loads."""
    stdout = _compile_for_sm90(_COMPILE_POOLING)
    assert "pool True ['ld.global.v4.b32']" in stdout, stdout
    assert "pool False" in stdout and "norms ok" in stdout
