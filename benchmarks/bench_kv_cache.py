"""KV cache: memory per token, decode-attention latency, and greedy agreement.

* Memory at the 7B shape (32 layers, 32 KV heads, head dim 128), group size 128: bytes per token
  of the quantized part at steady state (window excluded), measured on a filled cache layer and
  checked against the format; ratios to bf16 as ``int8_memory_ratio`` / ``int4_memory_ratio``
  (fp8 takes int8's bytes).
* Decode attention, one new token per sequence, 32 heads x 128: baseline bf16
  ``F.scaled_dot_product_attention`` over a bf16 cache vs ``pllava_fast.ops.decode_attention``
  over an int8 / int4 / fp8 cache (128-token bf16 window). GPU: contexts 1k / 2.4k / 8k / 32k, batch
  1 / 8 / 32 (the Triton kernel). CPU: a reduced set, and ours is the torch path (chunked codes -> fp32
  + batched matmuls).
* Greedy agreement: teacher-forced per-step argmax agreement with DynamicCache on the toy
  induction model of the tests (20 prompts, 320-token contexts, window 16).

    python -m benchmarks.bench_kv_cache [--device cuda] [--repeats 10]

Writes benchmarks/results/kv_cache-<device>.json.
"""
from __future__ import annotations

import argparse
import pathlib

import torch
import torch.nn.functional as F

from pllava_fast import ops
from pllava_fast.devices import default_device
from pllava_fast.kv_cache import make_cache, teacher_forced_logits
from pllava_fast.kv_spec import bytes_per_token
from pllava_fast.quantized_cache import QuantizedKVLayer

from .harness import compare, write_results

LAYERS, HEADS, HEAD_DIM, GROUP, WINDOW = 32, 32, 128, 128, 128
KINDS = (("int8", 8), ("int4", 4), ("fp8", 8))  # the quantized kinds and their bits
TOY_MODEL = pathlib.Path(__file__).resolve().parents[1] / "tests" / "data" / "kv_cache_toy_llama"


def memory_records(device):
    """Bytes per token, measured on one filled layer (x LAYERS) and from the format."""
    recs, measured = [], {}
    tokens = 4096 + WINDOW
    bf16 = bytes_per_token("model-dtype", LAYERS, HEADS, HEAD_DIM)
    measured["bf16"] = bf16
    for kind, bits in KINDS:
        layer = QuantizedKVLayer(bits=bits, group_size=GROUP, window=WINDOW, block=64,
                                 fp8=kind == "fp8")
        kv = torch.randn(1, HEADS, tokens, HEAD_DIM, device=device, dtype=torch.bfloat16)
        layer.update(kv, kv)
        quant_bytes = layer.nbytes() - layer.keys.nbytes - layer.values.nbytes
        per_token = quant_bytes / layer.n_quant * LAYERS
        assert per_token == bytes_per_token(kind, LAYERS, HEADS, HEAD_DIM, group_size=GROUP)
        measured[kind] = per_token
    for kind, b in measured.items():
        recs.append({"name": f"memory/{kind}", "bytes_per_token": b, "ratio_vs_bf16": b / bf16,
                     "shape": f"{LAYERS} layers x {HEADS} KV heads x {HEAD_DIM}, group {GROUP}"})
    return recs, measured["int8"] / bf16, measured["int4"] / bf16


def decode_inputs(batch, context, kind, bits, device):
    """A filled quantized layer of ``kind`` (bf16 window) and the bf16 K/V it was built from."""
    k = torch.randn(batch, HEADS, context, HEAD_DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    layer = QuantizedKVLayer(bits=bits, group_size=GROUP, window=WINDOW, block=64,
                             fp8=kind == "fp8")
    layer.update(k, v)
    return k, v, layer.decode_inputs()


def latency_records(device, contexts, batches, repeats):
    recs = []
    for context in contexts:
        for batch in batches:
            q = torch.randn(batch, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
            for kind, bits in KINDS:
                k, v, inputs = decode_inputs(batch, context, kind, bits, device)

                def baseline(q=q, k=k, v=v):
                    return F.scaled_dot_product_attention(q[:, :, None], k, v)

                def ours(q=q, inputs=inputs):
                    return ops.decode_attention(q, **inputs)

                bf16_bytes = 2 * k.numel() * 2
                quant_bytes = sum(t.numel() * t.element_size() for t in inputs.values()
                                  if isinstance(t, torch.Tensor))
                rec = compare(f"decode/{kind}/ctx{context}/b{batch}", baseline, ours, device=device,
                              bytes_moved=quant_bytes, warmup=2, repeats=repeats,
                              context=context, batch=batch, kv_bytes_bf16=bf16_bytes,
                              kv_bytes_ours=quant_bytes)
                err = (ours().float() - baseline()[:, :, 0].float()).pow(2).sum()
                rec["sqnr_db_vs_bf16"] = float(10 * torch.log10(baseline().float().pow(2).sum() / err))
                recs.append(rec)
                print(rec["name"], f"speedup {rec['speedup']:.2f}", flush=True)
                del k, v, inputs
    return recs


def agreement_records():
    if not TOY_MODEL.is_dir():
        return []
    from transformers import DynamicCache, LlamaForCausalLM

    from pllava_fast.attention import install_attention

    model = install_attention(LlamaForCausalLM.from_pretrained(TOY_MODEL, dtype=torch.float32).eval())
    g = torch.Generator().manual_seed(5)
    prompts, prompt_len, steps = 20, 320, 16
    rows = []
    for _ in range(prompts):
        period = int(torch.randint(8, 25, (1,), generator=g))
        rows.append(torch.randint(0, 64, (period,), generator=g).repeat(400 // period + 1)[:prompt_len + steps])
    ids = torch.stack(rows)
    mask = torch.ones_like(ids)
    for i in range(prompts):
        mask[i, : 3 * i] = 0
    ref = teacher_forced_logits(model, ids, mask, prompt_len, DynamicCache()).argmax(-1)
    recs = []
    for kind in ("unquantized", "int8", "int4", "fp8"):
        for key_quant in ("token",) if kind == "fp8" else ("token", "channel"):
            cache = make_cache(kind, model.config, window=16, block=16, group_size=16, key_quant=key_quant)
            agree = (teacher_forced_logits(model, ids, mask, prompt_len, cache).argmax(-1) == ref)
            recs.append({"name": f"agreement/{kind}/{key_quant}_keys", "argmax_agreement": agree.float().mean().item(),
                         "prompts": prompts, "context": prompt_len, "steps": steps, "window": 16})
    return recs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--contexts", type=int, nargs="+", default=None,
                        help="cached tokens (default: 1k 2.4k 8k 32k on CUDA, 1k 2.4k on CPU)")
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="sequences (default: 1 8 32 on CUDA, 1 8 on CPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        contexts, batches, note = (1024, 2400, 8192, 32768), (1, 8, 32), "Triton decode kernel"
    else:
        contexts, batches, note = (1024, 2400), (1, 8), (
            "CPU: reduced set; ours is the torch path (token chunks of codes converted to fp32 in a reused "
            "buffer, scales folded into q / p, batched matmuls), not the GPU kernel")
    contexts, batches = args.contexts or contexts, args.batches or batches
    mem, int8_ratio, int4_ratio = memory_records(device)
    recs = mem + latency_records(device, contexts, batches, args.repeats) + agreement_records()
    path = write_results("kv_cache", recs, device=device, dtype=torch.bfloat16,
                         int8_memory_ratio=int8_ratio, int4_memory_ratio=int4_ratio,
                         heads=HEADS, head_dim=HEAD_DIM, group_size=GROUP, window=WINDOW, note=note)
    print(f"int8_memory_ratio {int8_ratio:.4f}  int4_memory_ratio {int4_ratio:.4f}  -> {path}")


if __name__ == "__main__":
    main()
