"""``pllava-fast bench``: the original-style pipeline against pllava-fast, stage by stage.

Original-style (as PLLaVA's demo runs it): every frame of the video decoded to RGB, the sampled
ones turned into PIL images, PllavaProcessor-style preprocessing (Pillow resize + crop
per frame, then transformers' ``CLIPImageProcessorPil``), and ``pllava_fast.reference`` (the whole
CLIP tower with all hidden states, linear_2 before the 3-D pool, a DynamicCache decode loop).
pllava-fast: ``VideoPipeline`` (sampled-frame decode to YUV, one batched preprocessing op, the
truncated tower, fused pool before linear_2, transformers' generate with the chosen KV cache).

Both run on the same weights, video and prompt, greedy, alternating, ``repeats`` times; the
per-stage medians, TTFT, decode tokens/s, peak memory (CUDA) and the videos that fit a memory
budget are reported with their ratios. ``benchmarks/e2e.py`` writes them as results JSON + PNG.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from .pipeline import (STAGES, StageTimer, VideoPipeline, _ModelProbe, add_kv_cache_arguments,
                       kv_cache_options)

QUESTION = "Describe the video in detail."

# PLLaVA-7B: CLIP ViT-L/14-336 + Vicuna-7B (llava-v1.6-vicuna-7b), pooling (16, 12, 12)
SHAPES = {
    "7b": dict(
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                    num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768,
                    hidden_act="quick_gelu"),
        text=dict(model_type="llama", hidden_size=4096, intermediate_size=11008,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5),
        num_frames=16, pooling_shape=(16, 12, 12), frame_shape=(24, 24)),
}


# -- the original-style pipeline -------------------------------------------------------------------
def original_decode(path, num_frames: int, *, start=None, end=None):
    """PLLaVA demo's reader: every frame of ``path`` decoded to RGB (as torchvision's
    ``read_video`` does, PyAV's default threading), then the sampled ones as PIL images."""
    import av
    from PIL import Image

    from .video import sample_indices

    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else None
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise ValueError(f"{path}: no video frames")
    idx = sample_indices(len(frames), num_frames, fps=fps, start=start, end=end)
    return [Image.fromarray(frames[i]) for i in idx]


def original_preprocess(images, image_size: int, processor=None) -> torch.Tensor:
    """PllavaProcessor-style: Pillow bicubic resize to the shared short edge and crop to the
    shared aspect (per frame), then CLIPImageProcessorPil (resize, center crop, normalize)."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    from .preprocess import pllava_geometry

    if processor is None:
        processor = CLIPImageProcessorPil(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size})
    w, h = images[0].size
    h1, w1, top, left, hc, wc = pllava_geometry([(h, w)], image_size)[0][:6]
    cropped = [np.asarray(img.resize((w1, h1), Image.BICUBIC))[top:top + hc, left:left + wc]
               for img in images]
    return processor(cropped, return_tensors="pt")["pixel_values"]


class OriginalPipeline:
    """The baseline: original decode, PIL preprocessing, ``ReferencePllava`` on shared weights."""

    def __init__(self, pipe: VideoPipeline):
        from transformers import CLIPImageProcessorPil

        from .reference import ReferencePllava

        self.pipe = pipe
        self.reference = ReferencePllava.from_model(pipe.model)
        s = pipe.image_size
        self.processor = CLIPImageProcessorPil(size={"shortest_edge": s},
                                               crop_size={"height": s, "width": s})

    def __call__(self, videos, question, *, max_new_tokens: int):
        pipe, timer = self.pipe, StageTimer(self.pipe.device)
        with timer.stage("decode"):
            frames = [original_decode(v, pipe.num_frames) for v in videos]
        with timer.stage("preprocess"):
            pixels = torch.cat([original_preprocess(f, pipe.image_size, self.processor)
                                for f in frames]).to(pipe.device, pipe.dtype)
        inputs = pipe.tokenize(pipe.prompts([question] * len(videos)))
        probe = _ModelProbe(self.reference, timer, part=("vision", "vision_tower"),
                            rest="projector")
        with torch.inference_mode(), probe, timer.stage("model"):
            out = self.reference.generate(inputs["input_ids"], pixels, inputs["attention_mask"],
                                          max_new_tokens=max_new_tokens, eos_token_id=None)
        new = out[:, inputs["input_ids"].shape[1]:]
        return new.cpu(), pipe._summarise(timer, len(videos), new)


# -- comparison ---------------------------------------------------------------------------------
def build_pipeline(model_dir=None, *, shape="tiny", device="cpu", dtype="auto",
                   kv_cache="bf16", num_frames=None, kv_cache_options=None) -> VideoPipeline:
    """A pipeline on a checkpoint directory, the tiny random model, or random weights of a shape."""
    if model_dir is not None:
        return VideoPipeline.from_pretrained(model_dir, device=device, dtype=dtype,
                                             kv_cache=kv_cache, kv_cache_options=kv_cache_options,
                                             num_frames=num_frames)
    if shape == "tiny":
        from .testing import save_tiny_pllava

        tmp = tempfile.mkdtemp(prefix="pllava-fast-bench-")
        # PLLaVA's 16 frames (pooled 16x2x2 on the tiny 4x4 grid): decode and preprocessing
        # carry their real weight
        path = save_tiny_pllava(os.path.join(tmp, "tiny"), num_frames=16, pooling_shape=(16, 2, 2))
        return VideoPipeline.from_pretrained(path,
                                             device=device, dtype=dtype, kv_cache=kv_cache,
                                             kv_cache_options=kv_cache_options,
                                             num_frames=num_frames)
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected 'tiny' or one of {sorted(SHAPES)}")
    from .config import PllavaConfig
    from .model import PllavaForConditionalGeneration
    from .pipeline import resolve_dtype
    from .testing import build_tokenizer

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
                         kv_cache_options=kv_cache_options, num_frames=num_frames)


def _median_timings(runs):
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and v is not None]
    return {k: statistics.median(r[k] for r in runs if r.get(k) is not None) for k in keys}


def memory_per_video(pipe: VideoPipeline, kind: str, *, original: bool, prompt_tokens: int,
                     max_new_tokens: int) -> dict:
    """Estimated bytes one more video adds to a batch: its KV cache at the end of generation plus
    the visual stage's largest live activations (all CLIP hidden states and the un-pooled
    projector output in the original order; one hidden state and the linear_1 output in ours)."""
    from .kv_cache import bytes_per_token

    cfg = pipe.model.config
    text, vision = cfg.text_config, cfg.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    elem = torch.finfo(pipe.dtype).bits // 8
    visual = math.prod(cfg.pooling_shape)
    tokens = prompt_tokens + visual + max_new_tokens
    per_token = bytes_per_token(kind, text.num_hidden_layers, kv_heads, head_dim, dtype_bytes=elem)
    kv = per_token * tokens
    if kind in ("int8", "int4"):  # plus the full-precision recent window (default 128 tokens)
        kv += bytes_per_token("bf16", text.num_hidden_layers, kv_heads, head_dim,
                              dtype_bytes=elem) * min(128, tokens)
    frames, grid = cfg.num_frames, math.prod(cfg.frame_shape)
    hidden_states = (vision.num_hidden_layers + 1) if original else 2
    activations = frames * hidden_states * (grid + 1) * vision.hidden_size * elem
    activations += frames * grid * text.hidden_size * elem * (2 if original else 1)
    return {"kv_bytes": kv, "activation_bytes": activations, "total_bytes": kv + activations}


def videos_in_budget(pipe: VideoPipeline, per_video_bytes: float, budget_bytes: float) -> int:
    weights = sum(p.numel() * p.element_size() for p in pipe.model.parameters())
    return max(0, int((budget_bytes - weights) // per_video_bytes))


def compare(pipe: VideoPipeline, videos, *, question=QUESTION, max_new_tokens=16, repeats=3,
            budget_gb=80.0, capacity_kv="int4") -> dict:
    """Run both pipelines ``repeats`` times (after a warm-up) and return the comparison."""
    original = OriginalPipeline(pipe)
    warm = min(max_new_tokens, 2)
    original(videos, question, max_new_tokens=warm)
    pipe(videos, question, max_new_tokens=warm, min_new_tokens=warm)
    base_runs, ours_runs, same = [], [], True
    for _ in range(repeats):
        if pipe.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pipe.device)
        base_tokens, base_t = original(videos, question, max_new_tokens=max_new_tokens)
        base_runs.append(base_t)
        if pipe.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pipe.device)
        out = pipe(videos, question, max_new_tokens=max_new_tokens,
                   min_new_tokens=max_new_tokens)
        ours_runs.append(out.timings)
        same &= torch.equal(base_tokens, out.sequences)
    base, ours = _median_timings(base_runs), _median_timings(ours_runs)
    records = []
    for stage in STAGES:
        name = "decode tokens" if stage == "generate" else stage
        records.append(_record(f"stage:{name}", base[f"{stage}_s"], ours[f"{stage}_s"]))
    records.append(_record("ttft", base["ttft_s"], ours["ttft_s"]))
    records.append(_record("whole pipeline", base["total_s"], ours["total_s"]))
    records.append({"name": "decode tokens/s", "baseline": base["decode_tokens_per_s"],
                    "ours": ours["decode_tokens_per_s"],
                    "speedup": ours["decode_tokens_per_s"] / base["decode_tokens_per_s"]})
    if "peak_memory_bytes" in ours:
        records.append({"name": "peak memory bytes (measured)",
                        "baseline": base["peak_memory_bytes"], "ours": ours["peak_memory_bytes"],
                        "ratio": base["peak_memory_bytes"] / ours["peak_memory_bytes"]})
    prompt_tokens = int(pipe.tokenize(pipe.prompts([question]))["input_ids"].shape[1])
    budget = budget_gb * 2**30
    per_base = memory_per_video(pipe, "bf16", original=True, prompt_tokens=prompt_tokens,
                                max_new_tokens=max_new_tokens)
    per_ours = memory_per_video(pipe, capacity_kv, original=False, prompt_tokens=prompt_tokens,
                                max_new_tokens=max_new_tokens)
    n_base = videos_in_budget(pipe, per_base["total_bytes"], budget)
    n_ours = videos_in_budget(pipe, per_ours["total_bytes"], budget)
    records.append({"name": f"videos per batch in {budget_gb:g} GB (estimate, ours {capacity_kv} KV)",
                    "baseline": n_base, "ours": n_ours,
                    "ratio": n_ours / n_base if n_base else None,
                    "baseline_bytes_per_video": per_base, "ours_bytes_per_video": per_ours})
    return {"records": records, "same_tokens": bool(same), "baseline_runs": base_runs,
            "ours_runs": ours_runs, "prompt_tokens": prompt_tokens}


def _record(name, base_s, ours_s):
    return {"name": name, "baseline_s": base_s, "ours_s": ours_s,
            "speedup": base_s / ours_s if ours_s else None}


def format_table(result: dict) -> str:
    lines = [f"{'':<44}{'original':>12}{'pllava-fast':>14}{'ratio':>9}"]
    for r in result["records"]:
        if "baseline_s" in r:
            lines.append(f"{r['name']:<44}{r['baseline_s'] * 1e3:>10.1f}ms"
                         f"{r['ours_s'] * 1e3:>12.1f}ms{r['speedup']:>8.2f}x")
        else:
            ratio = r.get("speedup") or r.get("ratio")
            fmt = (lambda v: f"{v:.1f}") if isinstance(r["baseline"], float) else str
            lines.append(f"{r['name']:<44}{fmt(r['baseline']):>12}{fmt(r['ours']):>14}"
                         + (f"{ratio:>8.2f}x" if ratio else f"{'-':>9}"))
    lines.append(f"greedy tokens identical: {result['same_tokens']}")
    return "\n".join(lines)


def default_video(tmp_dir) -> str:
    """A shared sample clip when present, else a generated 360p clip."""
    from .demo import make_clip

    shared = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "videos", "cooking.mp4")
    if os.path.exists(shared):
        return os.path.abspath(shared)
    return make_clip(os.path.join(tmp_dir, "bench.mp4"), num_frames=96, height=360, width=640,
                     fps=24)


# -- command line --------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser):
    parser.add_argument("--model", help="PLLaVA checkpoint directory (default: --shape)")
    parser.add_argument("--shape", default="tiny", choices=["tiny", *SHAPES],
                        help="random weights of this shape when no --model (default tiny)")
    parser.add_argument("--video", action="append",
                        help="video(s) for one batch (default: a sample clip)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="videos per batch when --video is not given")
    parser.add_argument("--num-frames", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-gb", type=float, default=80.0)
    parser.add_argument("--capacity-kv", default="int4", choices=("bf16", "int8", "int4"),
                        help="KV format of the videos-per-batch estimate for pllava-fast")
    add_kv_cache_arguments(parser)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.model is not None and not os.path.isdir(args.model):
        print(f"error: model directory not found: {args.model}", file=sys.stderr)
        return 2
    for v in args.video or []:
        if not os.path.exists(v):
            print(f"error: video not found: {v}", file=sys.stderr)
            return 2
    kv_options = kv_cache_options(args)
    with tempfile.TemporaryDirectory(prefix="pllava-fast-bench-") as tmp:
        videos = args.video or [default_video(tmp)] * args.batch_size
        t0 = time.perf_counter()
        pipe = build_pipeline(args.model, shape=args.shape, device=device, dtype=args.dtype,
                              num_frames=args.num_frames, kv_cache=args.kv_cache,
                              kv_cache_options=kv_options)
        result = compare(pipe, videos, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                         budget_gb=args.budget_gb, capacity_kv=args.capacity_kv)
        result["setup_s"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if not k.endswith("_runs")},
                         default=str))
    else:
        print(f"device {device}, {pipe.dtype}, {len(videos)} video(s) x {pipe.num_frames} frames, "
              f"{args.max_new_tokens} new tokens, median of {args.repeats}")
        print(format_table(result))
    return 0
