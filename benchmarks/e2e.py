"""End-to-end benchmark: the original-style PLLaVA pipeline vs pllava-fast on the same weights.

Per stage (video decode, preprocessing, vision tower, projector, prefill, decode steps), TTFT,
whole pipeline, decode tokens/s, peak memory (CUDA) and the videos per batch that fit a memory
budget (estimate: KV cache + the visual stage's live activations per video, ours with int4 KV).
See ``pllava_fast.comparison`` for what each side runs (the original: decord get_batch, PIL +
CLIPImageProcessor, all CLIP layers, linear_2 before the pool, eager DynamicCache loop), plus a
third column: pllava-fast with the compiled decode loop (``--no-compile`` drops it). Writes
``results/e2e-<device>.json`` and a bar chart ``results/e2e-<device>.png``.

    python -m benchmarks.e2e                                # CPU, tiny model (16 frames)
    python -m benchmarks.e2e --device cuda --shape 7b       # PLLaVA-7B shape, random weights
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch

from pllava_fast import comparison as bench
from pllava_fast.pipeline import VideoPipeline
from pllava_fast.testing import make_clip

from .harness import command_line, write_results

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "videos")


def scenarios(tmp: str, args) -> list[tuple[str, list[str]]]:
    """(name, videos of one batch): a generated 720p clip with 2 s keyframe spacing, and the
    shared sample clips (single keyframe: decoding cannot skip, only stop early) when present."""
    out = []
    gop = make_clip(os.path.join(tmp, "gop2s-720p.mp4"), num_frames=240, height=720, width=1280,
                    fps=24, keyframe_interval=48)
    out.append(("720p 10 s, keyframe every 2 s", [gop] * args.batch_size))
    for name in ("cooking.mp4", "jesse_dance.mp4"):
        path = os.path.join(SHARED, name)
        if os.path.exists(path):
            out.append((f"{name} (one keyframe)", [os.path.abspath(path)] * args.batch_size))
    return out


def capacity_estimate_7b(budget_gb: float, max_new_tokens: int = 256) -> dict:
    """Videos per batch in the budget for the PLLaVA-7B shape (bf16), from the memory model in
    ``pllava_fast.bench.memory_per_video`` on a meta-device model: an estimate, not a GPU run."""
    pipe = bench.build_pipeline(shape="7b", device="meta", dtype="bf16")
    prompt = int(pipe.tokenize(pipe.prompts([bench.QUESTION]))["input_ids"].shape[1])
    budget = budget_gb * 2**30
    base = bench.memory_per_video(pipe, "model-dtype", original=True, prompt_tokens=prompt,
                                  max_new_tokens=max_new_tokens)
    ours = bench.memory_per_video(pipe, "int4", original=False, prompt_tokens=prompt,
                                  max_new_tokens=max_new_tokens)
    n_base = bench.videos_in_budget(pipe, base["total_bytes"], budget)
    n_ours = bench.videos_in_budget(pipe, ours["total_bytes"], budget)
    return {"scenario": "PLLaVA-7B shape (analytic estimate, no GPU run)",
            "name": f"videos per batch in {budget_gb:g} GB, {max_new_tokens} new tokens "
                    "(original bf16 KV vs ours int4 KV)",
            "baseline": n_base, "ours": n_ours, "ratio": n_ours / n_base,
            "baseline_bytes_per_video": base, "ours_bytes_per_video": ours}


def plot(path, results: list[tuple[str, dict]], title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, (name, result) in zip(axes[0], results):
        recs = [r for r in result["records"] if "baseline_s" in r]
        labels = [r["name"].replace("stage:", "") for r in recs]
        base = [r["baseline_s"] * 1e3 for r in recs]
        ours = [r["ours_s"] * 1e3 for r in recs]
        x = range(len(recs))
        ax.bar([i - 0.27 for i in x], base, 0.27, label="original", color="#9aa5b1")
        ax.bar(list(x), ours, 0.27, label="pllava-fast", color="#2f6fdf")
        if all("ours_compiled_s" in r for r in recs):
            ax.bar([i + 0.27 for i in x], [r["ours_compiled_s"] * 1e3 for r in recs], 0.27,
                   label="pllava-fast, compiled decode", color="#13a36b")
        for i, r in enumerate(recs):
            ax.text(i, max(base[i], ours[i]) * 1.15, f"{r['speedup']:.2f}x", ha="center",
                    fontsize=8)
        ax.set_yscale("log")
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("ms (median, log scale)")
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="tiny", choices=["tiny", *bench.SHAPES])
    parser.add_argument("--model", help="a PLLaVA checkpoint directory instead of --shape")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-gb", type=float, default=80.0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="add the compiled-decode column (same model, compile=True)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = bench.build_pipeline(args.model, shape=args.shape, device=args.device,
                                dtype=args.dtype)
    compiled = (VideoPipeline(pipe.model, pipe.tokenizer, compile=True)
                if args.compile else None)
    results, records = [], []
    with tempfile.TemporaryDirectory(prefix="pllava-fast-e2e-") as tmp:
        for name, videos in scenarios(tmp, args):
            result = bench.compare(pipe, videos, max_new_tokens=args.max_new_tokens,
                                   repeats=args.repeats, budget_gb=args.budget_gb,
                                   compiled=compiled)
            print(f"== {name}: batch {len(videos)}, {pipe.num_frames} frames, "
                  f"{args.max_new_tokens} new tokens")
            print(bench.format_table(result))
            results.append((name, result))
            for r in result["records"]:
                records.append({"scenario": name, **r})
            records.append({"scenario": name, "name": "greedy tokens identical",
                            "value": result["same_tokens"],
                            "compiled": result["same_tokens_compiled"]})
    if args.shape != "7b" and args.model is None:
        records.append(capacity_estimate_7b(args.budget_gb))
        print(f"PLLaVA-7B shape, analytic estimate: {records[-1]}")
    cfg = pipe.model.config
    command = command_line(argv)
    path = write_results(
        "e2e", records, device=args.device, dtype=pipe.dtype, command=command.strip(),
        model=args.model or args.shape, num_frames=cfg.num_frames,
        pooling_shape=list(cfg.pooling_shape), image_size=cfg.vision_config.image_size,
        text_hidden=cfg.text_config.hidden_size, text_layers=cfg.text_config.num_hidden_layers,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
        budget_gb=args.budget_gb)
    png = path.with_suffix(".png")
    plot(png, results, f"pllava-fast vs original-style pipeline, {args.model or args.shape} "
                       f"model, {pipe.dtype}, {path.stem.split('-', 1)[1]}")
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
