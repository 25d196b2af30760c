"""Decode attention over a quantized cache: Triton kernel (interpreter) and CPU op vs fp32 SDPA."""
import pytest
import torch
import torch.nn.functional as F

from pllava_fast import ops
from pllava_fast.kernels import decode_attention as da
from pllava_fast.kernels import kv_format as kf


def sqnr_db(x, y):
    x, y = x.float(), y.float()
    return (10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum())).item()


def make_inputs(b=1, hq=4, hkv=1, d=64, tq=64, tw=4, bits=4, group=32, key_block=0,
                pads=None, dtype=torch.float32, fp8=False):
    """Random K/V split into a quantized part (Tq) and a window (W); ``pads[i]`` left-pads
    sequence i. Returns (decode_attention args dict, q, original K, original V)."""
    q = torch.randn(b, hq, d).to(dtype)
    k = torch.randn(b, hkv, tq + tw, d)
    k[..., :3] += 4.0  # a few biased channels: keys are not zero-mean in real models
    v = torch.randn(b, hkv, tq + tw, d)

    def quant(x, block):
        if bits == 16:
            return x.to(dtype), None, None
        if fp8:
            codes, scale, zero = kf.quantize_fp8_ref(x.reshape(-1, d), group)
        elif block:
            codes, scale, zero = kf.quantize_channels_ref(x.reshape(-1, d), bits, block)
        else:
            codes, scale, zero = kf.quantize_groups_ref(x.reshape(-1, d), bits, group)
        rows, width = (tq // block, d) if block else (tq, -(-d // group))
        return (codes.view(b, hkv, tq, codes.shape[-1]), scale.view(b, hkv, rows, width),
                zero.view(b, hkv, rows, width))

    kc, ks, kz = quant(k[:, :, :tq], key_block)
    vc, vs, vz = quant(v[:, :, :tq], 0)
    mask = None
    if pads is not None:
        mask = torch.ones(b, tq + tw, dtype=torch.bool)
        for i, p in enumerate(pads):
            mask[i, :p] = False
    args = dict(q=q, k_codes=kc, k_scale=ks, k_zero=kz, v_codes=vc, v_scale=vs, v_zero=vz,
                k_win=k[:, :, tq:].to(dtype), v_win=v[:, :, tq:].to(dtype), kv_mask=mask,
                bits=bits, group_size=group, key_block=key_block, sm_scale=d ** -0.5)
    if bits == 16:
        args.update(k_scale=torch.empty(0), k_zero=torch.empty(0), v_scale=torch.empty(0),
                    v_zero=torch.empty(0))
    return args, q, k.to(dtype), v.to(dtype)


def sdpa_fp32(q, k, v, mask, scale):
    r = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(r, 1), v.float().repeat_interleave(r, 1)
    m = None if mask is None else mask[:, None, None, :]
    return F.scaled_dot_product_attention(q.float()[:, :, None], k, v, attn_mask=m, scale=scale)[:, :, 0]


def launch(args):
    return da._decode_attention(**args)


# (name, make_inputs kwargs): contexts 1 / 127 / 128 / 129 / 1000, head dims 80 / 128 / 16,
# GQA ratios 1 / 4 / 7, unequal lengths by left padding, per-channel keys, fp format, bf16
KERNEL_CASES = {
    "ctx1": dict(tq=0, tw=1, hq=4, hkv=1),
    "ctx127_d80_gqa7_pad": dict(b=2, tq=120, tw=7, hq=7, hkv=1, d=80, bits=8, pads=[0, 50]),
    "ctx128_d128_mha": dict(tq=128, tw=0, hq=2, hkv=2, d=128, group=128),
    "ctx129_channel_keys_pad": dict(b=2, tq=96, tw=33, hq=8, hkv=2, key_block=32, pads=[17, 0]),
    "ctx1000_pad": dict(b=2, tq=992, tw=8, hq=4, hkv=1, d=32, pads=[0, 333]),
    "fp_format": dict(b=2, tq=100, tw=5, hq=4, hkv=2, d=16, bits=16),
    "yi34b_heads_56_8": dict(tq=64, tw=3, hq=56, hkv=8, d=128, group=128),
    "fp16": dict(tq=200, tw=16, hq=4, hkv=1, bits=8, dtype=torch.float16),
    "fp8_d80_gqa7_pad": dict(b=2, tq=100, tw=5, hq=7, hkv=1, d=80, bits=8, fp8=True, pads=[0, 30]),
}


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_matches_sdpa_over_dequantized(case):
    args, *_ = make_inputs(**KERNEL_CASES[case])
    out = launch(args)
    ref = da.decode_attention_ref(**args)
    assert out.shape == args["q"].shape and out.dtype == args["q"].dtype
    if args["q"].dtype != torch.float32:
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_cpu_op_matches_sdpa_over_dequantized(case):
    args, *_ = make_inputs(**KERNEL_CASES[case])
    ref = da.decode_attention_ref(**args)
    tol = dict(rtol=2e-2, atol=2e-2) if args["q"].dtype != torch.float32 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ops.decode_attention(**args).float(), ref.float(), **tol)
    # small chunks: the online softmax across chunk boundaries (and partial key blocks)
    torch.testing.assert_close(ops.kv_attention._decode_attention_torch(*args.values(), chunk=48).float(),
                               ref.float(), **tol)


@pytest.mark.parametrize("case", [
    dict(b=2, tq=150, tw=5, hq=8, hkv=2, d=80, bits=4, group=32, pads=[0, 40]),  # int4, partial group
    dict(b=2, tq=128, tw=0, hq=6, hkv=3, d=48, bits=4, key_block=32, pads=[9, 0]),  # no window
    dict(b=1, tq=96, tw=2, hq=4, hkv=1, d=64, bits=8, group=128),  # group wider than the head
    dict(b=2, tq=200, tw=3, hq=4, hkv=2, d=32, bits=16, pads=[0, 150]),
])
@pytest.mark.parametrize("chunk", [None, 16, 32, 1000])
def test_cpu_op_chunking(case, chunk):
    # the CPU path's chunk loop (full and partial chunks, one chunk, reused buffers) and layouts
    args, *_ = make_inputs(**case)
    out = ops.kv_attention._decode_attention_torch(*args.values(), chunk=chunk)
    torch.testing.assert_close(out, da.decode_attention_ref(**args), rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_kernel_bf16_cuda(bits):
    # the Triton interpreter's bf16 tl.dot is broken (numpy has no bf16): GPU only
    args, *_ = make_inputs(b=3, hq=32, hkv=8, d=128, tq=2400, tw=100, bits=bits, group=128,
                           pads=[0, 7, 1000], dtype=torch.bfloat16)
    args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    out = ops.decode_attention(**args)
    torch.testing.assert_close(out.float(), da.decode_attention_ref(**args).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bits,group,key_block,fp8,floor", [
    (8, 64, 0, False, 35), (8, 64, 0, True, 25), (4, 32, 0, False, 15), (4, 64, 32, False, 15)])
def test_quantized_attention_vs_original_kv(bits, group, key_block, fp8, floor):
    # fp8 keeps 3 mantissa bits (~-30 dB per element) where int8 keeps ~8 bits over the group range
    args, q, k, v = make_inputs(b=2, hq=8, hkv=2, d=64, tq=480, tw=16, bits=bits, group=group,
                                key_block=key_block, pads=[0, 100], fp8=fp8)
    exact = sdpa_fp32(q, k, v, args["kv_mask"], args["sm_scale"])
    assert sqnr_db(exact, ops.decode_attention(**args)) >= floor


def test_kernel_quantized_vs_original_kv():
    args, q, k, v = make_inputs(b=1, hq=4, hkv=1, d=64, tq=256, tw=8, bits=4, group=32)
    exact = sdpa_fp32(q, k, v, None, args["sm_scale"])
    assert sqnr_db(exact, launch(args)) >= 15


def test_fully_masked_sequence_gives_zeros():
    args, *_ = make_inputs(b=2, tq=64, tw=2, pads=[66, 0])
    for out in (launch(args), ops.decode_attention(**args)):
        assert torch.isfinite(out).all()
        assert (out[0] == 0).all() and (out[1] != 0).any()


def test_strided_capacity_views():
    # the cache hands over views into buffers with spare capacity
    args, *_ = make_inputs(b=1, tq=64, tw=3, hq=4, hkv=2)
    for key in ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero"):
        t = args[key]
        big = torch.zeros(*t.shape[:2], t.shape[2] + 40, t.shape[3], dtype=t.dtype)
        big[:, :, : t.shape[2]] = t
        args[key] = big[:, :, : t.shape[2]]
    torch.testing.assert_close(launch(args), da.decode_attention_ref(**args), rtol=1e-4, atol=1e-5)


def test_opcheck():
    args, *_ = make_inputs(b=2, tq=32, tw=3, hq=4, hkv=2, d=16, group=16, pads=[0, 5])
    torch.library.opcheck(ops.kv_attention._decode_attention_op, tuple(args.values()))


@pytest.mark.parametrize("change,match", [
    (dict(q=torch.randn(1, 4, 64, 1)), "q must be"),
    (dict(q=torch.randn(1, 4, 63)), "even head dim"),
    (dict(q=torch.randn(1, 3, 64)), "multiple"),
    (dict(bits=3), "bits"),
    (dict(kv_mask=torch.ones(1, 5, dtype=torch.bool)), "kv_mask"),
    (dict(k_codes=torch.zeros(1, 1, 64, 64, dtype=torch.uint8)), "code width"),
])
def test_bad_input(change, match):
    args, *_ = make_inputs(hq=4, hkv=2)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ops.decode_attention(**args)


def test_traces_under_torch_compile():
    args, *_ = make_inputs(b=2, tq=32, tw=3, hq=4, hkv=2, d=16, group=16, pads=[0, 5])
    q = args.pop("q")
    fn = torch.compile(lambda q: ops.decode_attention(q, **args), fullgraph=True, backend="eager")
    torch.testing.assert_close(fn(q), ops.decode_attention(q, **args))


def _graph_ops(fn, *inputs) -> set:
    """The call targets of the FX graph dynamo captures for ``fn`` (one graph: fullgraph)."""
    seen = set()

    def backend(gm, _):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, fullgraph=True, backend=backend)(*inputs)
    return seen


@pytest.mark.parametrize("traced", [True, False])
def test_cpu_graph_traces_a_small_cache_and_calls_the_op_for_a_large_one(traced, monkeypatch):
    """In a CPU graph a small cache's attention is traced (inductor fuses it into the step); a
    large one stays the chunked op, which inductor's one-graph form is slower than."""
    if not traced:
        monkeypatch.setattr(ops.kv_attention, "_TRACED_ELEMENTS", 0)
    args, *_ = make_inputs(b=2, tq=32, tw=3, hq=4, hkv=2, d=16, group=16, pads=[0, 5])
    q = args.pop("q")
    targets = _graph_ops(lambda q: ops.decode_attention(q, **args), q)
    assert any("pllava_fast.decode_attention" in t for t in targets) is not traced, targets


@pytest.mark.parametrize("case", ["ctx127_d80_gqa7_pad", "ctx129_channel_keys_pad",
                                  "fp8_d80_gqa7_pad", "fp_format"])
def test_inductor_cpu_graph_matches_sdpa_over_dequantized(case):
    args, *_ = make_inputs(**KERNEL_CASES[case])
    q = args.pop("q")
    torch._dynamo.reset()
    fn = torch.compile(lambda q: ops.decode_attention(q, **args), fullgraph=True, dynamic=False)
    torch.testing.assert_close(fn(q), da.decode_attention_ref(q, **args), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("width", [16, 80, 200])
def test_quantize_kv_in_a_cpu_graph_gives_the_ops_codes(width):
    """In a CPU graph the format's definition is traced, except when the last of several groups
    is short (the op is called there); either way the codes equal the op's bit for bit."""
    x = torch.randn(40, width)
    for kwargs in (dict(bits=4, group_size=16), dict(bits=4, group_size=32),
                   dict(bits=8, group_size=64), dict(bits=8, group_size=16, key_block=8),
                   dict(bits=8, group_size=8, fp8=True), dict(bits=8, group_size=64, fp8=True)):
        g = kwargs["group_size"]
        traced = "key_block" in kwargs or width <= g or width % g == 0
        called = any("pllava_fast" in t for t in
                     _graph_ops(lambda x: ops.quantize_kv(x, **kwargs), x))
        assert called is not traced, kwargs
        torch._dynamo.reset()
        got = torch.compile(lambda x: ops.quantize_kv(x, **kwargs), fullgraph=True)(x)
        for a, b in zip(got, ops.quantize_kv(x, **kwargs)):
            assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                               b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b), kwargs


def test_cpu_fp8_conversion_every_code():
    # the CPU path's bit conversion of e4m3 codes against torch's own, all 256 bytes (the two
    # NaN patterns are never written: quantize_fp8_ref clamps to +-448)
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    want = codes.float()
    got = ops.kv_attention._fp8_to_fp16(codes, torch.empty(256, dtype=torch.int16)).float()
    finite = ~want.isnan()
    assert torch.equal(got[finite], want[finite]) and finite.sum() == 254
