"""``pllava-fast chat VIDEO --model DIR``: multi-turn questions about one video.

The video is decoded and preprocessed once; each turn re-renders the conversation in the model's
template (the video token in the first user turn, earlier answers kept) and streams the answer.
Questions come from stdin, one per line: interactively with a prompt, or piped
(``printf 'What happens?\\nWhy?\\n' | pllava-fast chat clip.mp4 --model DIR``). ``/reset`` starts
the conversation over, ``/quit`` (or end of input) ends it.
"""
from __future__ import annotations

import argparse
import sys

from .. import jsonio, preflight
from .common import (add_device_arguments, add_kv_cache_arguments, add_max_new_tokens_argument,
                     add_model_argument, add_num_frames_argument, add_speed_arguments,
                     check_context_fit, check_memory_fit, check_prompt, check_weights_runnable,
                     device_of, finite_times, kv_cache_spec, one_line, positive,
                     runtime_options, start_within)


def configure_parser(parser: argparse.ArgumentParser):
    parser.add_argument("video", help="video file, image or frame folder")
    add_model_argument(parser, required=True)
    parser.add_argument("--template", default="plain",
                        help="conversation template (plain, vcg, mvbench, chatml, ...)")
    add_num_frames_argument(parser)
    add_kv_cache_arguments(parser)
    add_speed_arguments(parser)
    add_max_new_tokens_argument(parser, 256)
    parser.add_argument("--start", type=float, default=None, help="start time (s)")
    parser.add_argument("--end", type=float, default=None, help="end time (s)")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="print tokens as they come (default on)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per turn on stdout (no streaming)")
    add_device_arguments(parser)


def check(args) -> None:
    positive("--num-frames", args.num_frames)
    positive("--max-new-tokens", args.max_new_tokens)
    finite_times(args.start, args.end)
    args.kv_spec = kv_cache_spec(args)
    args.runtime = runtime_options(args)
    first_turn = check_prompt("--template", "", template=args.template)  # unknown ones fail here
    info = preflight.checkpoint(args.model)
    header = preflight.video_header(args.video)
    start_within(header, args.start)
    check_context_fit(info, prompt=first_turn, pooling=None, max_new_tokens=args.max_new_tokens,
                      what="the conversation")
    args.device = device_of(args)
    check_weights_runnable(args)
    check_memory_fit(info, headers=[header], num_frames=args.num_frames, batch_size=1,
                     device=args.device, dtype=args.dtype)


def run(args) -> int:
    from transformers import TextStreamer

    from ..chat import Chat
    from ..pipeline import VideoPipeline

    pipe = VideoPipeline.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                         num_frames=args.num_frames, **args.runtime)
    chat = Chat(pipe, args.video, template=args.template, start=args.start, end=args.end)
    interactive = sys.stdin.isatty()
    stream = args.stream and not args.json
    if interactive:
        print(f"chatting about {args.video} ({pipe.num_frames} frames); /reset, /quit",
              file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        question = line.strip()
        if not question:
            continue
        if question == "/quit":
            break
        if question == "/reset":
            chat.reset()
            continue
        try:
            if stream:
                print("pllava> ", end="", flush=True)
                streamer = TextStreamer(pipe.tokenizer, skip_prompt=True, skip_special_tokens=True)
                chat.ask(question, max_new_tokens=args.max_new_tokens, streamer=streamer)
                continue
            answer = chat.ask(question, max_new_tokens=args.max_new_tokens)
        except ValueError as exc:  # e.g. the conversation outgrew the context: say so, go on
            print(f"error: {one_line(exc)} (/reset starts over)", file=sys.stderr, flush=True)
            continue
        if args.json:
            print(jsonio.dumps({"turn": chat.turns, "question": question, "answer": answer}),
                  flush=True)
        else:
            print(f"pllava> {answer}", flush=True)
    return 0
