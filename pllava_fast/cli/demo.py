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
from .common import (UsageError, add_max_new_tokens_argument, add_model_argument,
                     add_num_frames_argument, add_runtime_arguments, check_context_fit,
                     check_memory_fit, check_prompt, check_weights_runnable, device_of, kv_cache_spec, positive,
                     runtime_options,
                     tiny_info)

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
    args.runtime = runtime_options(args)
    args.prompt = check_prompt("--question", args.question)
    if args.model is not None:
        info, what = preflight.checkpoint(args.model), "--question"
    else:  # the tiny model from its shape; what only its tokenizer knows once it is written
        info, what = tiny_info("the tiny demo model"), "--question (with the tiny demo model)"
    args.headers = [preflight.video_header(args.video)] if args.video is not None else []
    check_context_fit(info, prompt=args.prompt, pooling=None, max_new_tokens=args.max_new_tokens,
                      what=what)
    args.device = device_of(args)
    check_weights_runnable(args)
    # the clip the demo writes itself is checked once written (_check_generated)
    check_memory_fit(info, headers=args.headers, num_frames=args.num_frames, batch_size=1,
                     device=args.device, dtype=args.dtype)


def _check_generated(args, model_dir, video) -> None:
    """The demo's own tiny checkpoint and clip, as soon as they are written and before the model
    loads: the same context and memory checks a given --model and --video get in ``check``."""
    info = preflight.checkpoint(model_dir)
    try:
        headers = args.headers or [preflight.video_header(video)]
        check_context_fit(info, prompt=args.prompt, pooling=None,
                          max_new_tokens=args.max_new_tokens,
                          what="--question" + ("" if args.model else " (with the tiny demo model)"))
        check_memory_fit(info, headers=headers, num_frames=args.num_frames, batch_size=1,
                         device=args.device, dtype=args.dtype)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


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
        if args.model is None or args.video is None:
            _check_generated(args, model_dir, video)
        pipe = VideoPipeline.from_pretrained(model_dir, device=args.device, dtype=args.dtype,
                                             num_frames=args.num_frames, **args.runtime)
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
