"""pytest-benchmark: decode attention over an int4 cache vs bf16 SDPA, and cache memory.

On CPU ours is the chunked torch path; on CUDA the Triton split-sequence kernel.
Run: ``pytest benchmarks/test_kv_cache.py --benchmark-only``.
"""
import pytest
import torch
import torch.nn.functional as F

from pllava_fast import ops
from pllava_fast.devices import default_device
from pllava_fast.kv_spec import bytes_per_token
from pllava_fast.quantized_cache import QuantizedKVLayer

from .harness import bench

DEVICE = default_device()
BATCH, HEADS, HEAD_DIM = (8, 32, 128) if DEVICE == "cuda" else (1, 32, 128)
CONTEXT = 2400


@pytest.fixture(scope="module", params=[4, 8], ids=["int4", "int8"])
def setup(request):
    torch.manual_seed(0)
    q = torch.randn(BATCH, HEADS, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    k = torch.randn(BATCH, HEADS, CONTEXT, HEAD_DIM, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    layer = QuantizedKVLayer(bits=request.param, group_size=128, window=128, block=64)
    layer.update(k, v)
    return q, k, v, layer.decode_inputs()


@pytest.mark.benchmark(group="decode-attention-ctx2400")
def test_bf16_sdpa_baseline(benchmark, setup):
    q, k, v, _ = setup
    bench(benchmark, lambda: F.scaled_dot_product_attention(q[:, :, None], k, v), device=DEVICE)


@pytest.mark.benchmark(group="decode-attention-ctx2400")
def test_quantized_decode_attention(benchmark, setup):
    q, k, v, inputs = setup
    out = bench(benchmark, lambda: ops.decode_attention(q, **inputs), device=DEVICE)
    ref = F.scaled_dot_product_attention(q[:, :, None].float(), k.float(), v.float())[:, :, 0]
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (out.float() - ref).pow(2).sum())
    assert sqnr > (15 if inputs["bits"] == 4 else 30)


def test_memory_ratios_at_7b_shape():
    bf16 = bytes_per_token("model-dtype", 32, 32, 128)
    assert bytes_per_token("int4", 32, 32, 128, group_size=128) / bf16 <= 0.30
    assert bytes_per_token("int8", 32, 32, 128, group_size=128) / bf16 <= 0.55
