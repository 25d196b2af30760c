"""``pllava-fast demo``: the whole pipeline on a generated clip with a tiny random model.

With no arguments it writes a short clip of moving shapes with PyAV, saves a tiny random PLLaVA
checkpoint (``pllava_fast.testing.save_tiny_pllava``) in a temporary directory, answers a question
about the clip and prints the answer and a per-stage timing table. ``--video`` and ``--model`` use
real ones. (A random tiny model answers with random tokens: the demo shows the pipeline, not the
model's knowledge.)
"""
from __future__ import annotations

import argparse
import os
import tempfile

from .. import jsonio, preflight
from .common import (add_max_new_tokens_argument, add_model_argument, add_num_frames_argument,
                     add_runtime_arguments, check_fit, device_of, kv_cache_spec, positive)

DEFAULT_QUESTION = "What is happening in this video?"


def configure_parser(parser: argparse.ArgumentParser):
    parser.add_argument("--video", help="video file, image or frame folder (default: a generated clip)")
    add_model_argument(parser, required=False,
                       help_text="PLLaVA checkpoint directory (default: a tiny random model)")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    add_num_frames_argument(parser)
    add_max_new_tokens_argument(parser, 24)
    add_runtime_arguments(parser, "print one JSON object instead of text")


def check(args) -> None:
    positive("--num-frames", args.num_frames)
    positive("--max-new-tokens", args.max_new_tokens)
    args.kv_spec = kv_cache_spec(args)
    preflight.utf8("--question", args.question)
    info = preflight.checkpoint(args.model) if args.model is not None else None
    if args.video is not None:
        preflight.video_header(args.video)
    args.device = device_of(args)
    if info is not None:
        headers = [preflight.video_header(args.video)] if args.video else []
        check_fit(info, headers=headers, num_frames=args.num_frames, pooling=None,
                  prompt=args.question, max_new_tokens=args.max_new_tokens, batch_size=1,
                  device=args.device, dtype=args.dtype, what="--question")


def run(args) -> int:
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    import torch

    from ..pipeline import VideoPipeline
    from ..testing import make_clip, save_tiny_pllava
    from ..timing import format_timings

    with tempfile.TemporaryDirectory(prefix="pllava-fast-demo-") as tmp:
        video = args.video or make_clip(os.path.join(tmp, "shapes.mp4"))
        model_dir = args.model
        if model_dir is None:
            if args.device == "cpu":
                # a 64-wide model gains nothing from intra-op threads, and idle OpenMP threads
                # spinning on a busy machine slow every small op down
                torch.set_num_threads(1)
            model_dir = save_tiny_pllava(os.path.join(tmp, "tiny-pllava"))
        pipe = VideoPipeline.from_pretrained(model_dir, device=args.device, dtype=args.dtype,
                                             kv_cache=args.kv_spec, num_frames=args.num_frames)
        pipe.answer(video, args.question, max_new_tokens=2)  # warm-up: first-call allocations
        out = pipe([video], [args.question], max_new_tokens=args.max_new_tokens)
    if args.json:
        print(jsonio.dumps({"video": args.video or "generated clip", "question": args.question,
                          "answer": out.texts[0], "timings": out.timings}))
    else:
        print(f"video:    {args.video or 'generated clip (moving shapes)'}")
        print(f"model:    {args.model or 'tiny random PLLaVA'} on {args.device}, "
              f"{pipe.num_frames} frames, kv cache {pipe.kv_cache_spec.kind}")
        print(f"question: {args.question}")
        print(f"answer:   {out.texts[0]}")
        print()
        print(format_timings(out.timings))
    return 0
