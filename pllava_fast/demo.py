"""``pllava-fast demo``: the whole pipeline on a generated clip with a tiny random model.

With no arguments it writes a short clip of moving shapes with PyAV, saves a tiny random PLLaVA
checkpoint (``pllava_fast.testing.save_tiny_pllava``) in a temporary directory, answers a question
about the clip and prints the answer and a per-stage timing table. ``--video`` and ``--model`` use
real ones. (A random tiny model answers with random tokens: the demo shows the pipeline, not the
model's knowledge.)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from .pipeline import add_kv_cache_arguments, kv_cache_options

DEFAULT_QUESTION = "What is happening in this video?"


def make_clip(path, *, num_frames: int = 24, height: int = 96, width: int = 128, fps: int = 8,
              codec: str = "libx264", seed: int = 0, keyframe_interval: int | None = None) -> str:
    """Write a clip of moving coloured shapes (a square and a disc on a gradient) to ``path``.

    H.264 in MP4 by default (yuv420p, so height and width must be even); ``keyframe_interval``
    sets the GOP length in frames (default: the encoder's). Returns ``path``.
    """
    import av

    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs an even frame size, got {height}x{width}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    background = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                           np.full_like(xx, 96)], axis=-1).astype(np.uint8)
    colour_a, colour_b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    side, radius = max(height // 5, 2), max(height // 8, 2)
    path = os.fspath(path)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if keyframe_interval:
            stream.codec_context.gop_size = int(keyframe_interval)
            stream.options = {"x264-params": f"keyint={int(keyframe_interval)}:scenecut=0"}
        for t in range(num_frames):
            img = background.copy()
            x0 = int((width - side) * t / max(num_frames - 1, 1))
            y0 = (height - side) // 3
            img[y0:y0 + side, x0:x0 + side] = colour_a
            cx = width - 1 - int((width - 1) * t / max(num_frames - 1, 1))
            cy = 2 * height // 3
            img[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2] = colour_b
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def configure_parser(parser: argparse.ArgumentParser):
    parser.add_argument("--video", help="video file, image or frame folder (default: a generated clip)")
    parser.add_argument("--model", help="PLLaVA checkpoint directory (default: a tiny random model)")
    parser.add_argument("--question", default=DEFAULT_QUESTION)
    parser.add_argument("--num-frames", type=int, default=None,
                        help="frames sampled per video (default: the model's num_frames)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    add_kv_cache_arguments(parser)
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", help="auto | bf16 | fp16 | fp32")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args) -> int:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    try:
        return _run(args, device)
    finally:
        torch.set_num_threads(threads)


def _run(args, device) -> int:
    import torch

    from .pipeline import VideoPipeline, format_timings

    kv_options = kv_cache_options(args)
    with tempfile.TemporaryDirectory(prefix="pllava-fast-demo-") as tmp:
        video = args.video
        if video is None:
            video = make_clip(os.path.join(tmp, "shapes.mp4"))
        elif not os.path.exists(video):
            print(f"error: video not found: {video}", file=sys.stderr)
            return 2
        model_dir = args.model
        if model_dir is None:
            from .testing import save_tiny_pllava

            if device == "cpu":
                # a 64-wide model gains nothing from intra-op threads, and idle OpenMP threads
                # spinning on a busy machine slow every small op down
                torch.set_num_threads(1)

            model_dir = save_tiny_pllava(os.path.join(tmp, "tiny-pllava"))
        elif not os.path.isdir(model_dir):
            print(f"error: model directory not found: {model_dir}", file=sys.stderr)
            return 2
        pipe = VideoPipeline.from_pretrained(model_dir, device=device, dtype=args.dtype,
                                             kv_cache=args.kv_cache, kv_cache_options=kv_options,
                                             num_frames=args.num_frames)
        pipe.answer(video, args.question, max_new_tokens=2)  # warm-up: first-call allocations
        out = pipe([video], [args.question], max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps({"video": args.video or "generated clip", "question": args.question,
                          "answer": out.texts[0], "timings": out.timings}))
    else:
        print(f"video:    {args.video or 'generated clip (moving shapes)'}")
        print(f"model:    {args.model or 'tiny random PLLaVA'} on {device}, "
              f"{pipe.num_frames} frames, kv cache {args.kv_cache}")
        print(f"question: {args.question}")
        print(f"answer:   {out.texts[0]}")
        print()
        print(format_timings(out.timings))
    return 0
