"""``pllava-fast chat VIDEO --model DIR``: multi-turn questions about one video.

The video is decoded and preprocessed once; each turn re-renders the conversation in the model's
template (the video token in the first user turn, earlier answers kept) and streams the answer.
Questions come from stdin, one per line: interactively with a prompt, or piped
(``printf 'What happens?\\nWhy?\\n' | pllava-fast chat clip.mp4 --model DIR``). ``/reset`` starts
the conversation over, ``/quit`` (or end of input) ends it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from .pipeline import add_kv_cache_arguments, kv_cache_options


class Chat:
    """A conversation about one video with a ``VideoPipeline``."""

    def __init__(self, pipe, video, *, template: str = "plain", start=None, end=None):
        from .conversation import get_template

        self.pipe, self.template = pipe, template
        get_template(template)  # unknown names fail here, before the video is decoded
        decoded = pipe.decode([video], start=start, end=end)
        self.pixel_values, self.frames = pipe.preprocess(decoded)
        self.reset()

    def reset(self):
        from .conversation import get_template

        self.conversation = get_template(self.template)
        self.turns = 0

    def ask(self, question: str, *, max_new_tokens: int = 256, streamer=None, **kwargs) -> str:
        conv = self.conversation
        conv.user_query(question, conv.pre_query_prompt, conv.post_query_prompt,
                        is_mm=self.turns == 0)
        inputs = self.pipe.tokenize([conv.get_prompt()])
        inputs["pixel_values"] = self.pixel_values
        if self.frames[0] != self.pipe.num_frames:
            inputs["frames_per_video"] = self.frames
        out = self.pipe.generate(inputs, max_new_tokens=max_new_tokens, streamer=streamer, **kwargs)
        answer = out.texts[0]
        conv.assistant_response(answer)
        self.turns += 1
        return answer


def configure_parser(parser: argparse.ArgumentParser):
    parser.add_argument("video", help="video file, image or frame folder")
    parser.add_argument("--model", required=True, help="PLLaVA checkpoint directory")
    parser.add_argument("--template", default="plain",
                        help="conversation template (plain, vcg, mvbench, chatml, ...)")
    parser.add_argument("--num-frames", type=int, default=None)
    add_kv_cache_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--start", type=float, default=None, help="start time (s)")
    parser.add_argument("--end", type=float, default=None, help="end time (s)")
    parser.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="print tokens as they come (default on)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per turn on stdout (no streaming)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="auto")


def run(args) -> int:
    import torch
    from transformers import TextStreamer

    from .pipeline import VideoPipeline

    if not os.path.exists(args.video):
        print(f"error: video not found: {args.video}", file=sys.stderr)
        return 2
    if not os.path.isdir(args.model):
        print(f"error: model directory not found: {args.model}", file=sys.stderr)
        return 2
    kv_options = kv_cache_options(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = VideoPipeline.from_pretrained(args.model, device=device, dtype=args.dtype,
                                         kv_cache=args.kv_cache, kv_cache_options=kv_options,
                                         num_frames=args.num_frames)
    try:
        chat = Chat(pipe, args.video, template=args.template, start=args.start, end=args.end)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
        if stream:
            print("pllava> ", end="", flush=True)
            streamer = TextStreamer(pipe.tokenizer, skip_prompt=True, skip_special_tokens=True)
            chat.ask(question, max_new_tokens=args.max_new_tokens, streamer=streamer)
        else:
            answer = chat.ask(question, max_new_tokens=args.max_new_tokens)
            if args.json:
                print(json.dumps({"turn": chat.turns, "question": question, "answer": answer}),
                      flush=True)
            else:
                print(f"pllava> {answer}", flush=True)
    return 0
