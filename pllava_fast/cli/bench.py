"""``pllava-fast bench``: the original PLLaVA pipeline against pllava-fast, stage by stage.

The original (``pllava_fast.original``): decord ``get_batch`` of PLLaVA's indices, PIL +
CLIPImageProcessor, all CLIP layers, linear_2 before the pool, a DynamicCache decode loop.
pllava-fast: ``VideoPipeline``. Same weights, video and prompt, greedy, alternating
(``pllava_fast.comparison.compare``).
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time

from .. import jsonio, preflight
from ..kv_spec import CACHE_KINDS
from ..shapes import SHAPES
from .common import (UsageError, add_max_new_tokens_argument, add_model_argument,
                     add_num_frames_argument, add_runtime_arguments, check_context_fit,
                     check_memory_fit, check_prompt, device_of, kv_cache_spec, positive, runtime_options,
                     tiny_info)

QUESTION = "Describe the video in detail."  # comparison.QUESTION, the prompt compare() times


def configure_parser(parser: argparse.ArgumentParser):
    add_model_argument(parser, required=False,
                       help_text="PLLaVA checkpoint directory (default: --shape)")
    parser.add_argument("--shape", default="tiny", choices=["tiny", *SHAPES],
                        help="random weights of this shape when no --model (default tiny)")
    parser.add_argument("--video", action="append",
                        help="video(s) for one batch (default: a sample clip)")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="videos per batch when --video is not given")
    add_num_frames_argument(parser)
    add_max_new_tokens_argument(parser, 16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-gb", type=float, default=80.0,
                        help="memory budget of the videos-per-batch estimate (default 80)")
    parser.add_argument("--capacity-kv", default="int4", choices=CACHE_KINDS,
                        help="KV format of the videos-per-batch estimate for pllava-fast")
    add_runtime_arguments(parser, "print the result as JSON", weights=False)


def check(args) -> None:
    positive("--batch-size", args.batch_size)
    positive("--num-frames", args.num_frames)
    positive("--max-new-tokens", args.max_new_tokens)
    positive("--repeats", args.repeats)
    if not (math.isfinite(args.budget_gb) and args.budget_gb > 0):
        raise UsageError(f"--budget-gb must be a finite number > 0, got {args.budget_gb}")
    if args.video and args.batch_size != 1:
        raise UsageError("--batch-size is for the default clip: with --video, give one --video "
                         "per video of the batch")
    args.kv_spec = kv_cache_spec(args)
    args.runtime = runtime_options(args)
    headers = []
    for v in args.video or []:
        header = preflight.video_header(v)
        if header.image or header.folder:
            # the original pipeline reads with decord, which takes video files only
            raise UsageError(f"--video {v}: bench needs a video file, not "
                             f"{'an image' if header.image else 'a folder of frames'}")
        headers.append(header)
    if args.model is not None:
        info = preflight.checkpoint(args.model)
    elif args.shape in SHAPES:  # random weights of a named shape: its widths say it all
        info = preflight.shape_info(args.shape, SHAPES[args.shape])
    else:  # comparison's tiny model (16 frames); checked again once built (_check_built)
        info = tiny_info("--shape tiny", num_frames=16, pooling_shape=(16, 2, 2))
    check_context_fit(info, prompt=check_prompt("the bench question", QUESTION), pooling=None,
                      max_new_tokens=args.max_new_tokens)
    args.device = device_of(args)
    batch = len(headers) or args.batch_size
    # without --video: the default clip's header, so a batch or frame count that cannot fit
    # fails here, not after the model is built
    headers = headers or [preflight.default_bench_header()]
    check_memory_fit(info, headers=headers, num_frames=args.num_frames, batch_size=batch,
                     device=args.device, dtype=args.dtype)


def _check_built(pipe, args, videos) -> None:
    """What ``check`` could not know before the tiny model was built: its context and the
    visual stage of the batch (the default clip included), before any timed run."""
    model = args.model or f"--shape {args.shape}"
    try:
        pipe.check_context([QUESTION], args.max_new_tokens)
    except ValueError as exc:
        raise UsageError(f"{exc} ({model})") from None
    headers = [preflight.video_header(v) for v in dict.fromkeys(videos)]
    info = preflight.config_info(pipe.model.config, model)
    try:
        check_memory_fit(info, headers=headers, num_frames=args.num_frames,
                         batch_size=len(videos), device=args.device, dtype=args.dtype)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def run(args) -> int:
    from ..comparison import build_pipeline, compare, default_video, format_table

    with tempfile.TemporaryDirectory(prefix="pllava-fast-bench-") as tmp:
        videos = args.video or [default_video(tmp)] * args.batch_size
        t0 = time.perf_counter()
        pipe = build_pipeline(args.model, shape=args.shape, device=args.device, dtype=args.dtype,
                              num_frames=args.num_frames, kv_cache=args.kv_spec,
                              compile=args.compile)
        _check_built(pipe, args, videos)
        result = compare(pipe, videos, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                         budget_gb=args.budget_gb, capacity_kv=args.capacity_kv)
        result["setup_s"] = time.perf_counter() - t0
    if args.json:
        print(jsonio.dumps({k: v for k, v in result.items() if not k.endswith("_runs")}))
    else:
        print(f"device {args.device}, {pipe.dtype}, {len(videos)} video(s) x {pipe.num_frames} "
              f"frames, {args.max_new_tokens} new tokens, median of {args.repeats}")
        print(format_table(result))
    return 0
