"""``pllava-fast caption``: caption videos, from a handful to a dataset on many GPUs.

Direct mode: ``pllava-fast caption a.mp4 b.mp4 --model DIR`` prints one caption per video (or JSON
lines with ``--json``; ``--stream`` prints tokens as they come).

Dataset mode: ``pllava-fast caption --input LIST_OR_DIR --output captions.jsonl --model DIR``.
Started with torchrun, each process takes the inputs ``i`` with ``i % WORLD_SIZE == RANK``;
DataLoader workers decode (and on CPU preprocess) the next videos while the model runs. Each rank
appends one flushed JSON line per video to ``<output>.part-<rank>.jsonl``; at the end the parts
are merged into ``--output`` in input order. A restart skips every input that already has a row in
any part (so a crash loses at most the rows being computed and never duplicates one); a torn last
line from a killed process is dropped and its video redone. A video that cannot be read becomes an
error row ``{"video": ..., "ok": false, "error": ...}`` and the run goes on.

Exit codes (``cli.common``): 0 every input has a caption; 1 some inputs became error rows; 2 bad
arguments or inputs, found before the model loads; 3 the run itself failed; 130 interrupted.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

from .. import jsonio, preflight
from ..checks import check_path
from ..inputs import dedupe, dist_env, list_inputs, local_rank, shard
from .common import (EXIT_OK, EXIT_SOME_FAILED, UsageError, add_device_arguments,
                     add_kv_cache_arguments, add_max_new_tokens_argument, add_model_argument,
                     add_num_frames_argument, add_speed_arguments, check_context_fit,
                     check_memory_fit, check_prompt, check_weights_runnable, device_of,
                     finite_times, kv_cache_spec, one_line, parse_pooling, positive,
                     runtime_options, start_within)

DEFAULT_PROMPT = "Describe the video in detail."


def configure_parser(parser: argparse.ArgumentParser):
    parser.add_argument("videos", nargs="*", help="video files (or images / frame folders)")
    add_model_argument(parser, required=True)
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the captioning question")
    add_num_frames_argument(parser)
    parser.add_argument("--pooling", default=None, metavar="T,H,W",
                        help="pooling shape (default: the model's, e.g. 16,12,12)")
    add_kv_cache_arguments(parser)
    add_speed_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=1, help="videos per generate() call")
    parser.add_argument("--stream", action="store_true",
                        help="print tokens as they are generated (direct mode, batch 1)")
    add_max_new_tokens_argument(parser, 128)
    parser.add_argument("--start", type=float, default=None, help="start time (s) of every video")
    parser.add_argument("--end", type=float, default=None, help="end time (s) of every video")
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout")
    parser.add_argument("--input", help="dataset mode: a folder of videos or a list file")
    parser.add_argument("--output", help="dataset mode: merged captions JSONL (parts beside it)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader decode workers (default: 2 in dataset mode, else 0)")
    parser.add_argument("--retry-errors", action="store_true",
                        help="dataset mode: redo inputs whose earlier row is an error")
    add_device_arguments(parser)
    parser.add_argument("--device-map", default=None, choices=("auto", "balanced", "sequential"),
                        help="split one model over this process's GPUs with accelerate "
                             "(e.g. the 34B model)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="tqdm progress bar on stderr (default: when stderr is a terminal)")


# DataLoader decode workers: each is a process holding decoded videos; far more than the cores
# only thrashes (and 100000 would fork until the machine stops)
MAX_WORKERS = max(8, 4 * (os.cpu_count() or 1))


def check(args) -> None:
    """Every argument and input, before torch or the model loads."""
    positive("--batch-size", args.batch_size)
    positive("--max-new-tokens", args.max_new_tokens)
    positive("--num-frames", args.num_frames)
    positive("--workers", args.workers, minimum=0, maximum=MAX_WORKERS)
    finite_times(args.start, args.end)
    args.pooling_shape = parse_pooling(args.pooling)
    args.kv_spec = kv_cache_spec(args)
    args.runtime = runtime_options(args)
    prompt = check_prompt("--prompt", args.prompt)
    if args.input and not args.output:
        raise UsageError("--input needs --output (the captions JSONL)")
    if args.output and not args.input and not args.videos:
        raise UsageError("--output needs inputs: video paths or --input")
    if args.stream and (args.batch_size > 1 or args.output):
        raise UsageError("--stream prints one video at a time: not with --batch-size > 1 or "
                         "--output")
    if args.output:
        _check_output(args.output)
    info = preflight.checkpoint(args.model)
    args.rank, args.world = dist_env()
    items = [{"video": v} for v in args.videos]
    if args.input:
        listed = list_inputs(args.input)
        if not listed:
            raise UsageError(f"--input {args.input} lists no videos")
        items += listed
    for item in items:
        for key in ("start", "end"):
            if item.get(key) is None and getattr(args, key) is not None:
                item[key] = getattr(args, key)
    if not items:
        raise UsageError("nothing to caption: give video paths or --input")
    if args.output:
        unique = dedupe(items)
        if len(unique) < len(items):
            print(f"note: {len(items) - len(unique)} duplicate input(s) skipped: a dataset row is "
                  "keyed by its video path", file=sys.stderr)
        items = unique
        headers = _readable_headers(items[:8])
    else:
        headers = _direct_headers(items, args.start)
    args.items = items
    check_context_fit(info, prompt=prompt, pooling=args.pooling_shape,
                      max_new_tokens=args.max_new_tokens)
    args.device = device_of(args, local_rank(args.rank))
    check_weights_runnable(args)
    check_memory_fit(info, headers=headers, num_frames=args.num_frames,
                     batch_size=min(args.batch_size, len(items)), device=args.device,
                     dtype=args.dtype)


def _check_output(output: str) -> None:
    if os.path.isdir(output):
        raise UsageError(f"--output {output} is a folder: give the captions file to write "
                         "(its part files go beside it)")
    # the merge replaces --output and every part is read whole: a device there (a link to
    # /dev/zero or /dev/full) would be read without end or replaced
    for path in [output] + glob.glob(glob.escape(output) + ".part-*.jsonl"):
        if os.path.lexists(path):
            check_path(path, "--output file" if path == output else "part file",
                                 folder=False)
    out_dir = os.path.dirname(os.path.abspath(output)) or "."
    if not os.path.isdir(out_dir):
        raise UsageError(f"--output {output}: folder {out_dir} does not exist")
    if not os.access(out_dir, os.W_OK):
        raise UsageError(f"--output {output}: folder {out_dir} is not writable")


def _direct_headers(items, start):
    """Direct mode: a path that is missing, a link loop, a folder without frames or not a file
    is a bad argument (exit 2); one FFmpeg cannot read becomes an error row beside the others'
    captions, unless no input is readable at all (then nothing would run: exit 2 too)."""
    headers, unreadable = [], None
    for item in items:
        path = item["video"]
        check_path(path, "video")
        try:
            header = preflight.video_header(path)
        except ValueError as exc:
            if os.path.isdir(path):
                raise UsageError(str(exc)) from None
            unreadable = unreadable or exc
            continue
        start_within(header, item.get("start", start))
        headers.append(header)
    if not headers:
        raise UsageError(f"no input is a readable video: {unreadable}")
    return headers


def _readable_headers(items):
    headers = []
    for item in items:
        try:
            headers.append(preflight.video_header(item["video"]))
        except (OSError, ValueError):
            pass  # reported as that input's error row
    return headers


def load_pipeline(args, device):
    """The pipeline for ``args.model`` with ``--num-frames``, ``--pooling`` and the KV-cache flags."""
    from ..pipeline import VideoPipeline

    return VideoPipeline.from_pretrained(
        args.model, device=device, dtype=args.dtype,
        device_map=getattr(args, "device_map", None), num_frames=args.num_frames,
        pooling_shape=args.pooling_shape, **args.runtime)


def _progress(args, total, desc):
    from tqdm import tqdm

    disable = not sys.stderr.isatty() if args.progress is None else not args.progress
    return tqdm(total=total, desc=desc, unit="video", file=sys.stderr, disable=disable,
                dynamic_ncols=True)


def run(args) -> int:
    if args.output:
        return _run_dataset(args, args.items, args.rank, args.world)
    return _run_direct(args, args.items)


def _run_direct(args, items) -> int:
    from ..dataset import caption_items

    pipe = load_pipeline(args, args.device)
    workers = args.workers or 0
    errors = 0
    if args.stream and not args.json:
        for item in items:
            print(f"{item['video']}: ", end="", flush=True)
            try:
                for piece in pipe.stream(item["video"], args.prompt, start=item.get("start"),
                                         end=item.get("end"), max_new_tokens=args.max_new_tokens):
                    print(piece, end="", flush=True)
                print()
            except (ValueError, RuntimeError, OSError) as exc:
                errors += 1
                print(f"\nerror: {item['video']}: {one_line(exc)}", file=sys.stderr)
        return EXIT_SOME_FAILED if errors else EXIT_OK

    def write(row):
        if args.json:
            print(jsonio.dumps(row), flush=True)
        elif row["ok"]:
            print(f"{row['video']}: {row['caption']}", flush=True)
        else:
            print(f"error: {row['video']}: {row['error']}", file=sys.stderr, flush=True)

    with _progress(args, len(items), "caption") as bar:
        errors = caption_items(pipe, items, prompt=args.prompt, batch_size=args.batch_size,
                               workers=workers, max_new_tokens=args.max_new_tokens, write=write,
                               progress=bar)
    return EXIT_SOME_FAILED if errors else EXIT_OK


def _run_dataset(args, items, rank, world) -> int:
    from ..dataset import OutputLocked, RowWriter, caption_items, done_rows, merge, part_path

    group = _init_group(world)
    try:
        mine = shard(items, rank, world)
        done = done_rows(args.output)
        todo = [it for it in mine if it["video"] not in done
                or (args.retry_errors and not done[it["video"]].get("ok"))]
        skipped = len(mine) - len(todo)
        print(f"rank {rank}/{world}: {len(mine)} inputs, {skipped} already done, "
              f"{len(todo)} to caption", file=sys.stderr)
        errors = 0
        if todo:
            try:  # the lock first: a second run on the same output stops before loading a model
                writer = RowWriter(part_path(args.output, rank))
            except OutputLocked as exc:
                raise UsageError(str(exc)) from None
            try:
                pipe = load_pipeline(args, args.device)
                workers = 2 if args.workers is None else args.workers
                with _progress(args, len(todo), f"caption rank {rank}") as bar:
                    errors = caption_items(pipe, todo, prompt=args.prompt,
                                           batch_size=args.batch_size, workers=workers,
                                           max_new_tokens=args.max_new_tokens,
                                           write=writer.write, progress=bar)
            finally:
                writer.close()
        if group:
            import torch.distributed as dist

            dist.barrier()
        done = done_rows(args.output)
        missing = [it["video"] for it in items if it["video"] not in done]
        if rank == 0 or not group:
            if not missing:
                rows, _ = merge(args.output, items)
                failed = sum(1 for it in items if not done[it["video"]].get("ok"))
                print(f"merged {rows} rows into {args.output} ({failed} error rows)",
                      file=sys.stderr)
            elif not group:
                print(f"rank {rank}: {len(missing)} inputs of other ranks not done yet; the "
                      "last rank to finish merges", file=sys.stderr)
        if args.json:
            print(jsonio.dumps({"rank": rank, "world_size": world, "inputs": len(mine),
                              "skipped": skipped, "captioned": len(todo) - errors,
                              "errors": errors, "output": args.output}))
        mine_failed = sum(1 for it in mine if not done.get(it["video"], {}).get("ok"))
        return EXIT_SOME_FAILED if mine_failed else EXIT_OK
    finally:
        if group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _init_group(world) -> bool:
    """Join torchrun's process group (gloo: only a barrier is needed) when there are several ranks."""
    if world <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        # long timeout: ranks wait at the final barrier for the slowest shard
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
    return True
