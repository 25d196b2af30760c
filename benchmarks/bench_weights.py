"""Weight-only quantization benchmark: LLM decode speed and memory, as stored vs int8 / int4.

A ~1.1B-parameter Llama LLM (TinyLlama's shape: 2048 wide, 22 layers, 32 heads, 4 KV heads,
vocab 32000) with random weights behind a tiny vision tower, batch 1, 64 new tokens, greedy:
decode tokens/s (time(64) - time(1) of whole generate calls, so the prefill is charged alike)
eager (``generate()``, DynamicCache) and with the compiled decode loop, and the process's peak
RSS, for fp32 and bf16 as stored against int8 and int4 weights (torchao; bf16 activations, its
fast CPU path). Each variant runs in its own process, so the peak RSS is its own.

    python -m benchmarks.bench_weights                      # CPU (about 15 minutes on 2 cores)
    python -m benchmarks.bench_weights --device cuda --shape 7b --variants bf16 int4

Also writes the memory plan: PLLaVA-34B's shape with int4 weights and an int4 KV cache for a
16-frame prompt against one 80 GB GPU (an estimate from the shapes, not a run).
Writes benchmarks/results/weights-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from pllava_fast.devices import default_device
from pllava_fast.kv_spec import bytes_per_token

from .harness import command_line, sync, write_results

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32064),
    # Yi-34B, PLLaVA-34B's LLM
    "34b": dict(hidden_size=7168, intermediate_size=20480, num_hidden_layers=60,
                num_attention_heads=56, num_key_value_heads=8, vocab_size=64000),
}
VARIANTS = {"fp32": (None, "fp32"), "bf16": (None, "bf16"), "int8": ("int8", "bf16"),
            "int4": ("int4", "bf16")}


def _model(shape: str, device: str, dtype: str, weights):
    from pllava_fast.config import PllavaConfig
    from pllava_fast.devices import resolve_dtype
    from pllava_fast.model import PllavaForConditionalGeneration
    from pllava_fast.testing import build_tokenizer
    from pllava_fast.weight_quant import WeightSpec, check_weights, quantize_weights

    tok = build_tokenizer()
    text = dict(SHAPES[shape], model_type="llama", max_position_embeddings=4096,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=None)
    config = PllavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, image_size=28,
                           patch_size=14),
        text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id, num_frames=4, pooling_shape=(4, 2, 2), frame_shape=(2, 2))
    torch_dtype = resolve_dtype(dtype, device)
    spec = WeightSpec.of(weights)
    check_weights(spec, device, torch_dtype)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):
            model = PllavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    if spec is not None:
        quantize_weights(model, spec)
    model.generation_config.eos_token_id = None
    return model, tok


def child(args) -> dict:
    """One variant in this process: decode tokens/s eager and compiled, peak RSS."""
    from pllava_fast.llm_decode import CompiledDecoder
    from pllava_fast.testing import random_pixel_values
    from pllava_fast.weight_quant import parameter_bytes

    torch.set_num_threads(args.threads)
    weights, dtype = VARIANTS[args.child]
    model, tok = _model(args.shape, args.device, dtype, weights)
    enc = tok(["USER: <image> What is happening in the video? ASSISTANT:"], return_tensors="pt")
    inputs = {**{k: v.to(args.device) for k, v in enc.items()},
              "pixel_values": random_pixel_values(4, model.config).to(args.device, model.dtype)}
    n = args.new_tokens
    out = {"variant": args.child, "weights": weights or "as stored", "dtype": dtype,
           "lm_weight_bytes": parameter_bytes(model.language_model)}
    runs = {"eager": lambda k: model.generate(**inputs, max_new_tokens=k, do_sample=False)}
    if args.compile:
        decoder = CompiledDecoder(model, model.kv_cache_spec)
        runs["compiled"] = lambda k: decoder.generate(**inputs, max_new_tokens=k)
    with torch.inference_mode():
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn(n)  # warm-up (the compiled loop compiles here)
            sync(args.device)
            out[f"{name}_first_call_s"] = time.perf_counter() - t0
            times = {1: [], n: []}
            for _ in range(args.repeats):
                for k in (1, n):
                    t0 = time.perf_counter()
                    fn(k)
                    sync(args.device)
                    times[k].append(time.perf_counter() - t0)
            decode = min(times[n]) - min(times[1])
            out[f"{name}_tokens_per_s"] = (n - 1) / decode
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if args.device.startswith("cuda"):
        out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return out


def memory_plan(shape="34b", frames=16, prompt=128, new_tokens=256, group=128, kv="int4",
                budget_gb=80.0) -> dict:
    """Bytes of PLLaVA-34B with int4 LLM linears, CLIP-L and the projector in bf16, and the KV
    cache of one 16-frame prompt, against ``budget_gb`` (from the shapes)."""
    s = SHAPES[shape]
    h, inter, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    head_dim = h // s["num_attention_heads"]
    kv_dim = s["num_key_value_heads"] * head_dim
    linear = layers * (h * h * 2 + h * kv_dim * 2 + 3 * h * inter)  # q, o, k, v, gate, up, down
    int4 = linear / 2 + linear / group * 2 * 2  # codes + bf16 scale and zero per group
    other = 2 * (2 * s["vocab_size"] * h + 2 * layers * h)  # embeddings, lm_head, norms in bf16
    vision = 2 * 304e6 + 2 * (1024 * h + h * h)  # CLIP ViT-L/14-336 and the projector, bf16
    visual_tokens = frames * 12 * 12  # pooled (16, 12, 12)
    tokens = prompt + visual_tokens + new_tokens
    kv_bytes = bytes_per_token(kv, layers, s["num_key_value_heads"], head_dim, group_size=128,
                               dtype_bytes=2) * tokens
    kv_bytes += bytes_per_token("model-dtype", layers, s["num_key_value_heads"], head_dim) * 128
    total = int4 + other + vision + kv_bytes
    return {"name": f"memory plan: PLLaVA-{shape.upper()} shape, int4 weights (group {group}), "
                    f"{kv} KV, {frames} frames", "estimate": True,
            "llm_int4_linear_bytes": int4, "llm_bf16_bytes_if_unquantized": 2 * linear,
            "embeddings_head_norms_bytes": other, "vision_projector_bytes": vision,
            "kv_bytes": kv_bytes, "tokens": tokens, "total_bytes": total,
            "budget_bytes": budget_gb * 2**30, "fits": total < budget_gb * 2**30}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=default_device())
    ap.add_argument("--shape", default="1b", choices=list(SHAPES))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    records = []
    for variant in args.variants:
        cmd = [sys.executable, "-m", "benchmarks.bench_weights", "--child", variant,
               "--device", args.device, "--shape", args.shape, "--new-tokens",
               str(args.new_tokens), "--repeats", str(args.repeats), "--threads",
               str(args.threads), "--compile" if args.compile else "--no-compile"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(f"{variant}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        records.append({"name": f"decode/{args.shape}/{variant}", **rec})
        print(json.dumps(records[-1]), flush=True)
    base = next((r for r in records if r["variant"] == "bf16"), None)
    for r in records:
        if base:
            r["lm_bytes_vs_bf16"] = r["lm_weight_bytes"] / base["lm_weight_bytes"]
            for key in ("eager_tokens_per_s", "compiled_tokens_per_s"):
                if key in r and key in base:
                    r[key.replace("tokens_per_s", "x_vs_bf16")] = r[key] / base[key]
    records.append(memory_plan())
    path = write_results("weights", records, device=args.device, shape=args.shape,
                         new_tokens=args.new_tokens, threads=args.threads,
                         command=command_line(argv))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
