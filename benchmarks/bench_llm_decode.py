"""LLM decode benchmark: the token loop after the prefill, tokens/s per sequence and in total.

Baselines (measured in the same run, interleaved):
  generate   transformers' eager ``generate()`` with a DynamicCache (our model, compile=False)
  original   the original's bare loop: ``original.ReferencePllava.generate`` (DynamicCache, one
             eager LM forward per token)
Ours:
  compiled   ``llm_decode.CompiledDecoder``: static cache, torch.compile'd greedy step; the kinds
             given with --kinds (model-dtype, int8, int4, fp8, unquantized)

Decode time = time(max_new_tokens) - time(1 new token) of whole calls (same prompt, video and
prefill), so every method is charged the same way; tokens/s = (n - 1) x batch / that time. The
compile time of each new graph is reported apart ("compile_s"), then reused by later calls (and
by later processes through torch's on-disk cache).

    python -m benchmarks.bench_llm_decode                        # CPU, tiny model, batch 1 and 4
    python -m benchmarks.bench_llm_decode --device cuda --shape 7b --batches 1   # GPU (bf16)

On CUDA with --shape 7b it adds the weight-bandwidth roofline: weight bytes / HBM bandwidth of
the device per step, and the fraction of it the compiled step reaches. Writes
benchmarks/results/llm_decode-<device>.json.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from pllava_fast.comparison import build_pipeline
from pllava_fast.devices import default_device
from pllava_fast.kv_spec import KVCacheSpec
from pllava_fast.llm_decode import CompiledDecoder
from pllava_fast.original import ReferencePllava
from pllava_fast.testing import random_pixel_values

from .harness import command_line, device_peaks, sync, write_results

QUESTIONS = ["What is happening in the video?", "Describe the video in detail.", "Why?",
             "What colour is the square that moves left?"]


def _inputs(pipe, batch):
    cfg = pipe.model.config
    inputs = pipe.tokenize(pipe.prompts((QUESTIONS * batch)[:batch]))
    inputs["pixel_values"] = random_pixel_values(batch * cfg.num_frames, cfg).to(
        pipe.device, pipe.dtype)
    return inputs


def methods(pipe, kinds):
    """name -> fn(inputs, n) returning (B, L + n) ids, greedy, exactly n new tokens."""
    model = pipe.model
    model.generation_config.eos_token_id = None  # every method makes exactly n tokens
    reference = ReferencePllava.from_model(model)
    out = {
        "generate": lambda x, n: model.generate(**x, max_new_tokens=n, do_sample=False),
        "original": lambda x, n: reference.generate(x["input_ids"], x["pixel_values"],
                                                    x["attention_mask"], max_new_tokens=n),
    }
    for kind in kinds:
        spec = KVCacheSpec.of(kind, {} if kind == "model-dtype" else {"window": 128})
        decoder = CompiledDecoder(model, spec)
        out[f"compiled/{kind}"] = (lambda d: lambda x, n: d.generate(**x, max_new_tokens=n))(decoder)
    return out


def measure(pipe, batch, new_tokens, repeats, kinds):
    inputs = _inputs(pipe, batch)
    fns = methods(pipe, kinds)
    device = pipe.device
    records, compile_s, tokens = {}, {}, {}
    with torch.inference_mode():
        for name, fn in fns.items():  # warm-up; the first compiled call compiles
            t0 = time.perf_counter()
            tokens[name] = fn(inputs, new_tokens)
            sync(device)
            compile_s[name] = time.perf_counter() - t0
            fn(inputs, 1)
        times = {name: {"n": [], "1": []} for name in fns}
        for _ in range(repeats):  # interleaved: load drifting during the run hits all alike
            for name, fn in fns.items():
                for key, n in (("n", new_tokens), ("1", 1)):
                    t0 = time.perf_counter()
                    fn(inputs, n)
                    sync(device)
                    times[name][key].append(time.perf_counter() - t0)
    for name in fns:
        decode = statistics.median(times[name]["n"]) - statistics.median(times[name]["1"])
        records[name] = {"decode_s": decode,
                         "tokens_per_s_per_sequence": (new_tokens - 1) / decode,
                         "tokens_per_s": (new_tokens - 1) * batch / decode,
                         "same_tokens_as_generate": bool(torch.equal(tokens[name],
                                                                     tokens["generate"]))}
        if name.startswith("compiled"):
            records[name]["compile_s"] = compile_s[name] - statistics.median(times[name]["n"])
    for name, rec in records.items():
        rec["x_vs_generate"] = rec["tokens_per_s"] / records["generate"]["tokens_per_s"]
        rec["x_vs_original"] = rec["tokens_per_s"] / records["original"]["tokens_per_s"]
    return records


def roofline(pipe, rec, device):
    """Weight bytes of the LM read once per step / HBM bandwidth, against the measured step."""
    gbps, _ = device_peaks(device)
    weights = sum(p.numel() * p.element_size() for p in pipe.model.language_model.parameters())
    step = 1.0 / rec["tokens_per_s_per_sequence"]
    out = {"lm_weight_bytes": weights, "step_s": step, "achieved_GBps": weights / step / 1e9}
    if gbps:
        out["roofline_step_s"] = weights / (gbps * 1e9)
        out["fraction_of_roofline"] = out["roofline_step_s"] / step
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--shape", default="tiny", choices=("tiny", "7b"))
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", default=["model-dtype"],
                        help="cache kinds of the compiled loop")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads on CPU (a 64-wide model gains nothing from more)")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    pipe = build_pipeline(shape=args.shape, device=args.device, dtype=args.dtype)
    records = []
    for batch in args.batches:
        result = measure(pipe, batch, args.new_tokens, args.repeats, args.kinds)
        for name, rec in result.items():
            rec = {"name": f"{name}/b{batch}", "batch": batch, **rec}
            if args.shape == "7b" and name.startswith("compiled"):
                rec["roofline"] = roofline(pipe, rec, args.device)
            records.append(rec)
            print(f"{rec['name']:<28} {rec['tokens_per_s']:>9.1f} tok/s  "
                  f"x{rec['x_vs_generate']:.2f} vs generate  x{rec['x_vs_original']:.2f} vs "
                  f"original  same={rec['same_tokens_as_generate']}"
                  + (f"  compile {rec['compile_s']:.1f} s" if "compile_s" in rec else ""),
                  flush=True)
    cfg = pipe.model.config.text_config
    path = write_results("llm_decode", records, device=args.device, dtype=pipe.dtype,
                         shape=args.shape, new_tokens=args.new_tokens, repeats=args.repeats,
                         threads=args.threads, text_hidden=cfg.hidden_size,
                         text_layers=cfg.num_hidden_layers,
                         command=command_line(argv))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
