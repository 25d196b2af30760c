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
                     add_num_frames_argument, add_runtime_arguments, check_fit, device_of,
                     kv_cache_spec, positive)


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
    add_runtime_arguments(parser, "print the result as JSON")


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
    for v in args.video or []:
        preflight.video_header(v)
    info = preflight.checkpoint(args.model) if args.model is not None else None
    args.device = device_of(args)
    if info is not None and args.video:
        check_fit(info, headers=[preflight.video_header(v) for v in args.video],
                  num_frames=args.num_frames, pooling=None, prompt="Describe the video in detail.",
                  max_new_tokens=args.max_new_tokens, batch_size=len(args.video),
                  device=args.device, dtype=args.dtype)


def run(args) -> int:
    from ..comparison import build_pipeline, compare, default_video, format_table

    with tempfile.TemporaryDirectory(prefix="pllava-fast-bench-") as tmp:
        videos = args.video or [default_video(tmp)] * args.batch_size
        t0 = time.perf_counter()
        pipe = build_pipeline(args.model, shape=args.shape, device=args.device, dtype=args.dtype,
                              num_frames=args.num_frames, kv_cache=args.kv_spec)
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
