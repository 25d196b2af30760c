"""``pllava-fast profile VIDEO... [--model DIR] --out DIR``: high-norm visual tokens, as reports.

One video writes report.json, report.md and PNGs into --out; several write one folder each plus
summary.json / summary.md (``pllava_fast.profile``).
"""
from __future__ import annotations

import math
import os

from .. import preflight
from ..inputs import expand_sources
from .common import (UsageError, add_device_arguments, add_model_argument,
                     add_num_frames_argument, check_memory_fit, device_of, positive)


def configure_parser(p) -> None:
    p.add_argument("videos", nargs="+", metavar="VIDEO",
                   help="video files or folders of videos (one report each)")
    add_model_argument(p, required=False,
                       help_text="PLLaVA checkpoint directory (default: a tiny random model, for a demo)")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory")
    add_num_frames_argument(p)
    p.add_argument("--k", type=float, default=5.0,
                   help="outlier threshold: tokens above K x median are counted (default 5)")
    p.add_argument("--top", type=int, default=10, help="top tokens listed per point (default 10)")
    add_device_arguments(p)
    p.add_argument("--no-plots", action="store_true", help="write report.json/.md only")


def check(args) -> None:
    positive("--num-frames", args.num_frames)
    positive("--top", args.top, minimum=0)
    if not (math.isfinite(args.k) and args.k > 0):
        raise UsageError(f"--k must be a finite number > 0, got {args.k}")
    args.sources = expand_sources(args.videos)
    headers = [preflight.video_header(os.fspath(source)) for source in args.sources]
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        raise UsageError(f"--out {args.out} cannot be created: {parent} is not a directory")
    info = preflight.checkpoint(args.model) if args.model is not None else None
    args.device = device_of(args)
    # one video at a time; without --model (the tiny model) only the decoded frames count
    check_memory_fit(info, headers=headers, num_frames=args.num_frames, batch_size=1,
                     device=args.device, dtype=args.dtype)


def _load_model(args):
    if args.model is None:
        from ..devices import resolve_dtype
        from ..testing import tiny_pllava

        model, _ = tiny_pllava()
        dtype = resolve_dtype(args.dtype, args.device)
        return (model.to(device=args.device, dtype=dtype).eval(),
                "tiny random PLLaVA (pllava_fast.testing)")
    from ..model import PllavaForConditionalGeneration

    # the names as given: "checkpoint" is the config's dtype, which only the load reads
    model = PllavaForConditionalGeneration.from_pretrained(args.model, dtype=args.dtype,
                                                           device=args.device)
    return model.eval(), str(args.model)


def run(args) -> int:
    from ..profile import profile_video, profile_videos
    from ..profile.report import _fmt, _prepare_out_dir

    out = _prepare_out_dir(args.out)
    model, name = _load_model(args)
    kw = dict(num_frames=args.num_frames, k=args.k, top=args.top, plots=not args.no_plots,
              model_name=name)
    sources = args.sources
    if len(sources) == 1:
        report = profile_video(model, sources[0], out_dir=out, **kw)
        pool = report["pooling"]
        print(f"{sources[0]}: max/median {_fmt(pool['dominance_before'])} before pooling -> "
              f"{_fmt(pool['dominance_after'])} after; report: {out / 'report.md'}")
    else:
        summary = profile_videos(model, sources, out, **kw)
        for r in summary["videos"]:
            print(f"{r['video']}: max/median {_fmt(r['projector_dominance'])} -> "
                  f"{_fmt(r['pooled_dominance'])}")
        print(f"summary: {out / 'summary.md'}")
    return 0
