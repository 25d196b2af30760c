"""``pllava-fast make-tiny DIR``: a tiny random PLLaVA checkpoint to try the CLI with.

The real architecture (CLIP tower, projector, Llama LM) at tiny widths with random weights, in
PLLaVA's checkpoint layout with its tokenizer (``pllava_fast.testing.save_tiny_pllava``); nothing
is downloaded. Its answers are random words: it shows the pipeline, not a model's knowledge::

    pllava-fast make-tiny /tmp/tiny-pllava
    pllava-fast caption clip.mp4 --model /tmp/tiny-pllava
"""
from __future__ import annotations

import argparse
import math
import os

from .common import TINY, UsageError, parse_pooling, positive


def configure_parser(parser: argparse.ArgumentParser):
    parser.add_argument("path", metavar="DIR", help="directory to write (created; must be empty)")
    parser.add_argument("--num-frames", type=int, default=4, metavar="N",
                        help="frames per video the model takes (default 4)")
    parser.add_argument("--pooling", default=None, metavar="T,H,W",
                        help="pooled visual-token grid (default: N,2,2)")
    parser.add_argument("--seed", type=int, default=0)


# the tiny model's context: its visual tokens must leave room for a prompt and an answer
TINY_CONTEXT = TINY["max_positions"]
_PROMPT_ROOM = 256


def check(args) -> None:
    positive("--num-frames", args.num_frames)
    positive("--seed", args.seed, minimum=0, maximum=2**63 - 1)  # torch.Generator's range
    args.pooling_shape = parse_pooling(args.pooling) or (args.num_frames, 2, 2)
    tokens = math.prod(args.pooling_shape)
    if tokens > TINY_CONTEXT - _PROMPT_ROOM:
        what = f"--pooling {args.pooling}" if args.pooling else f"--num-frames {args.num_frames}"
        raise UsageError(f"{what}: {tokens} visual tokens per video (t*h*w of pooling "
                         f"{args.pooling_shape}) leave no room in the tiny model's "
                         f"{TINY_CONTEXT}-token context (at most {TINY_CONTEXT - _PROMPT_ROOM})")
    if os.path.exists(args.path) and (not os.path.isdir(args.path) or os.listdir(args.path)):
        raise UsageError(f"{args.path} exists and is not an empty directory")


def run(args) -> int:
    from ..testing import save_tiny_pllava

    path = save_tiny_pllava(args.path, num_frames=args.num_frames,
                            pooling_shape=args.pooling_shape, seed=args.seed)
    print(f"wrote a tiny random PLLaVA ({args.num_frames} frames, pooling "
          f"{tuple(args.pooling_shape)}) to {path}")
    return 0
