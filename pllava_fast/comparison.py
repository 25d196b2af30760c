"""The fast pipeline against the original, stage by stage, on the same weights and video.

``compare`` runs both (``original.OriginalPipeline`` and ``VideoPipeline``) ``repeats`` times,
alternating, greedy, after a warm-up, and reports the per-stage medians, TTFT, decode tokens/s,
peak memory (CUDA) and an estimate of the videos that fit a memory budget, with their ratios.
``pllava-fast bench`` prints it; ``benchmarks/e2e.py`` writes it as results JSON + PNG.
"""
from __future__ import annotations

import importlib.util
import math
import os
import statistics
import tempfile

import torch

from .config import PllavaConfig
from .devices import resolve_dtype
from .kv_spec import KVCacheSpec, bytes_per_token
from .model import PllavaForConditionalGeneration
from .original import OriginalPipeline, decode_every_frame, original_decode
from .pipeline import VideoPipeline
from .preflight import BENCH_CLIP, shared_sample
from .shapes import SHAPES
from .testing import build_tokenizer, make_clip, save_tiny_pllava
from .timing import STAGES

QUESTION = "Describe the video in detail."


# -- comparison ---------------------------------------------------------------------------------
def build_pipeline(model_dir=None, *, shape="tiny", device="cpu", dtype="auto",
                   kv_cache="model-dtype", num_frames=None, kv_cache_options=None,
                   compile=False) -> VideoPipeline:
    """A pipeline on a checkpoint directory, the tiny random model, or random weights of a shape
    (``compile``: its compiled decode loop, ``VideoPipeline``'s)."""
    if model_dir is not None:
        return VideoPipeline.from_pretrained(model_dir, device=device, dtype=dtype,
                                             kv_cache=kv_cache, kv_cache_options=kv_cache_options,
                                             num_frames=num_frames, compile=compile)
    if shape == "tiny":
        tmp = tempfile.mkdtemp(prefix="pllava-fast-bench-")
        # PLLaVA's 16 frames (pooled 16x2x2 on the tiny 4x4 grid): decode and preprocessing
        # carry their real weight
        path = save_tiny_pllava(os.path.join(tmp, "tiny"), num_frames=16, pooling_shape=(16, 2, 2))
        return VideoPipeline.from_pretrained(path,
                                             device=device, dtype=dtype, kv_cache=kv_cache,
                                             kv_cache_options=kv_cache_options,
                                             num_frames=num_frames, compile=compile)
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected 'tiny' or one of {sorted(SHAPES)}")
    spec = SHAPES[shape]
    tokenizer = build_tokenizer()
    text = dict(spec["text"], pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = PllavaConfig(
        vision_config=dict(spec["vision"], model_type="clip_vision_model"), text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id, num_frames=spec["num_frames"],
        pooling_shape=spec["pooling_shape"], frame_shape=spec["frame_shape"])
    torch_dtype = resolve_dtype(dtype, device)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with torch.device(device):  # random weights made on the device: the shape sets the speed
            model = PllavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return VideoPipeline(model.eval(), tokenizer, kv_cache=kv_cache,
                         kv_cache_options=kv_cache_options, num_frames=num_frames,
                         compile=compile)


def _median_timings(runs):
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and v is not None]
    return {k: statistics.median(r[k] for r in runs if r.get(k) is not None) for k in keys}


def memory_per_video(pipe: VideoPipeline, kind: str, *, original: bool, prompt_tokens: int,
                     max_new_tokens: int) -> dict:
    """Estimated bytes one more video adds to a batch: its KV cache at the end of generation plus
    the visual stage's largest live activations (all CLIP hidden states and the un-pooled
    projector output in the original order; one hidden state and the linear_1 output in ours)."""
    cfg = pipe.model.config
    text, vision = cfg.text_config, cfg.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    elem = torch.finfo(pipe.dtype).bits // 8
    visual = math.prod(cfg.pooling_shape)
    tokens = prompt_tokens + visual + max_new_tokens
    per_token = bytes_per_token(kind, text.num_hidden_layers, kv_heads, head_dim, dtype_bytes=elem)
    kv = per_token * tokens
    spec = KVCacheSpec.of(kind)
    if spec.quantized:  # plus the full-precision recent window
        kv += bytes_per_token("model-dtype", text.num_hidden_layers, kv_heads, head_dim,
                              dtype_bytes=elem) * min(spec.window, tokens)
    frames, grid = cfg.num_frames, math.prod(cfg.frame_shape)
    hidden_states = (vision.num_hidden_layers + 1) if original else 2
    activations = frames * hidden_states * (grid + 1) * vision.hidden_size * elem
    activations += frames * grid * text.hidden_size * elem * (2 if original else 1)
    return {"kv_bytes": kv, "activation_bytes": activations, "total_bytes": kv + activations}


def videos_in_budget(pipe: VideoPipeline, per_video_bytes: float, budget_bytes: float) -> int:
    weights = sum(p.numel() * p.element_size() for p in pipe.model.parameters())
    return max(0, int((budget_bytes - weights) // per_video_bytes))


def compare(pipe: VideoPipeline, videos, *, question=QUESTION, max_new_tokens=16, repeats=3,
            budget_gb=80.0, capacity_kv="int4", compiled: VideoPipeline | None = None) -> dict:
    """Run the original and ``pipe`` (and ``compiled``, the same model with compile=True, as a
    third column) ``repeats`` times, interleaved, after a warm-up (which also compiles)."""
    # the original's decoder when it is installed; else the weaker baseline, labelled as such
    if importlib.util.find_spec("decord") is not None:
        decode, decode_name = original_decode, "decord 0.6.0 get_batch (the original)"
    else:
        decode, decode_name = decode_every_frame, "every frame with PyAV (decord not installed)"
    original = OriginalPipeline(pipe, decode=decode)
    warm = min(max_new_tokens, 2)
    original(videos, question, max_new_tokens=warm)
    ours_pipes = {"ours": pipe, **({"compiled": compiled} if compiled is not None else {})}
    for p in ours_pipes.values():
        p(videos, question, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    base_runs, runs, same = [], {k: [] for k in ours_pipes}, {k: True for k in ours_pipes}
    for _ in range(repeats):
        if pipe.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pipe.device)
        base_tokens, base_t = original(videos, question, max_new_tokens=max_new_tokens)
        base_runs.append(base_t)
        for key, p in ours_pipes.items():
            if pipe.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(pipe.device)
            out = p(videos, question, max_new_tokens=max_new_tokens,
                    min_new_tokens=max_new_tokens)
            runs[key].append(out.timings)
            same[key] &= torch.equal(base_tokens, out.sequences)
    base = _median_timings(base_runs)
    med = {k: _median_timings(v) for k, v in runs.items()}
    ours = med["ours"]
    records = []
    pairs = [(f"stage:{stage}", f"{stage}_s") for stage in STAGES]
    pairs += [("ttft", "ttft_s"), ("whole pipeline", "total_s")]
    for name, key in pairs:
        rec = _record(name, base[key], ours[key])
        if "compiled" in med:
            rec["ours_compiled_s"] = med["compiled"][key]
            rec["speedup_compiled"] = base[key] / med["compiled"][key] if med["compiled"][key] else None
        records.append(rec)
    tps = "llm_decode_tokens_per_s"
    rec = {"name": "llm_decode tokens/s", "baseline": base[tps], "ours": ours[tps],
           "speedup": ours[tps] / base[tps]}
    if "compiled" in med:
        rec.update(ours_compiled=med["compiled"][tps],
                   speedup_compiled=med["compiled"][tps] / base[tps])
    records.append(rec)
    if "peak_memory_bytes" in ours:
        records.append({"name": "peak memory bytes (measured)",
                        "baseline": base["peak_memory_bytes"], "ours": ours["peak_memory_bytes"],
                        "ratio": base["peak_memory_bytes"] / ours["peak_memory_bytes"]})
    prompt_tokens = int(pipe.tokenize(pipe.prompts([question]))["input_ids"].shape[1])
    cfg = pipe.model.config
    budget = budget_gb * 2**30
    per_base = memory_per_video(pipe, "model-dtype", original=True, prompt_tokens=prompt_tokens,
                                max_new_tokens=max_new_tokens)
    per_ours = memory_per_video(pipe, capacity_kv, original=False, prompt_tokens=prompt_tokens,
                                max_new_tokens=max_new_tokens)
    n_base = videos_in_budget(pipe, per_base["total_bytes"], budget)
    n_ours = videos_in_budget(pipe, per_ours["total_bytes"], budget)
    shape = (f"{cfg.text_config.num_hidden_layers} LM layers x {cfg.text_config.hidden_size}, "
              f"{cfg.num_frames} frames, pooling {tuple(cfg.pooling_shape)}")
    records.append({"name": f"videos per batch in {budget_gb:g} GB: an estimate for this model "
                            f"({shape}; ours {capacity_kv} KV), not a measurement",
                    "baseline": n_base, "ours": n_ours,
                    "ratio": n_ours / n_base if n_base else None,
                    "baseline_bytes_per_video": per_base, "ours_bytes_per_video": per_ours})
    return {"records": records, "baseline_video_decode": decode_name,
            "same_tokens": bool(same["ours"]),
            "same_tokens_compiled": same.get("compiled"), "baseline_runs": base_runs,
            "ours_runs": runs["ours"], "compiled_runs": runs.get("compiled"),
            "prompt_tokens": prompt_tokens}


def _record(name, base_s, ours_s):
    return {"name": name, "baseline_s": base_s, "ours_s": ours_s,
            "speedup": base_s / ours_s if ours_s else None}


def format_table(result: dict) -> str:
    compiled = result.get("same_tokens_compiled") is not None
    lines = [f"{'':<44}{'original':>12}{'pllava-fast':>14}{'ratio':>9}"
             + (f"{'compiled':>12}{'ratio':>9}" if compiled else "")]
    for r in result["records"]:
        if "baseline_s" in r:
            lines.append(f"{r['name']:<44}{r['baseline_s'] * 1e3:>10.1f}ms"
                         f"{r['ours_s'] * 1e3:>12.1f}ms{r['speedup']:>8.2f}x"
                         + (f"{r['ours_compiled_s'] * 1e3:>10.1f}ms{r['speedup_compiled']:>8.2f}x"
                            if "ours_compiled_s" in r else ""))
        else:
            ratio = r.get("speedup") or r.get("ratio")
            fmt = (lambda v: f"{v:.1f}") if isinstance(r["baseline"], float) else str
            lines.append(f"{r['name']:<44}{fmt(r['baseline']):>12}{fmt(r['ours']):>14}"
                         + (f"{ratio:>8.2f}x" if ratio else f"{'-':>9}")
                         + (f"{fmt(r['ours_compiled']):>12}{r['speedup_compiled']:>8.2f}x"
                            if "ours_compiled" in r else ""))
    lines.append(f"greedy tokens identical: {result['same_tokens']}"
                 + (f" (compiled: {result['same_tokens_compiled']})" if compiled else ""))
    return "\n".join(lines)


def default_video(tmp_dir) -> str:
    """A shared sample clip when present, else a generated 360p clip."""
    shared = shared_sample()
    if shared is not None:
        return shared
    return make_clip(os.path.join(tmp_dir, "bench.mp4"), **BENCH_CLIP)


