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

Exit codes: 0 every input has a caption; 1 some inputs became error rows; 2 bad arguments or
inputs (no model directory, nothing to caption); 3 the run itself failed (model load, OOM, ...);
130 interrupted.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import traceback
from typing import Iterable, Iterator

from .pipeline import add_kv_cache_arguments, kv_cache_options

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_RUN_FAILED = 0, 1, 2, 3

DEFAULT_PROMPT = "Describe the video in detail."
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".gif", ".flv", ".mpg",
                    ".mpeg", ".ts", ".wmv", ".jpg", ".jpeg", ".png", ".bmp", ".webp")


# -- inputs --------------------------------------------------------------------------------------
def list_inputs(spec: str) -> list[dict]:
    """A folder (its video and image files, recursively, sorted) or a list file -> input items.

    A list file has one input per line: a path (relative paths are relative to the list file's
    folder) or a JSON object ``{"video": path, "start": s, "end": s}``; blank lines and lines
    starting with ``#`` are skipped. Each item is ``{"video": str, "start"?: float, "end"?: float}``.
    """
    if os.path.isdir(spec):
        found = []
        for root, _, files in os.walk(spec):
            found += [os.path.join(root, f) for f in files if f.lower().endswith(VIDEO_EXTENSIONS)]
        return [{"video": p} for p in sorted(found)]
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--input not found: {spec} (expected a folder or a list file)")
    base = os.path.dirname(os.path.abspath(spec))
    items = []
    with open(spec, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("{"):
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{spec}:{lineno}: bad JSON line ({exc})") from None
                if "video" not in item:
                    raise ValueError(f"{spec}:{lineno}: JSON line has no 'video' field")
                item = {k: item[k] for k in ("video", "start", "end") if item.get(k) is not None}
            else:
                item = {"video": line}
            if not os.path.isabs(item["video"]):
                item["video"] = os.path.join(base, item["video"])
            items.append(item)
    return items


def dedupe(items: Iterable[dict]) -> list[dict]:
    """Keep the first item of each video path (a row is keyed by its path)."""
    seen, out = set(), []
    for item in items:
        if item["video"] not in seen:
            seen.add(item["video"])
            out.append(item)
    return out


def shard(items: list[dict], rank: int, world_size: int) -> list[dict]:
    """The items of one rank: every ``world_size``-th, starting at ``rank`` (disjoint, complete)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    return items[rank::world_size]


def dist_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's RANK / WORLD_SIZE environment (default 0, 1)."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise ValueError(f"RANK/WORLD_SIZE must be integers, got RANK={os.environ.get('RANK')!r} "
                         f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}") from None


# -- rows on disk --------------------------------------------------------------------------------
def part_path(output: str, rank: int) -> str:
    return f"{output}.part-{rank:05d}.jsonl"


def read_rows(path: str) -> list[dict]:
    """The complete rows of a JSONL file; a torn or garbled line (a killed writer) is skipped."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # torn last line
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(row, dict) and "video" in row:
                rows.append(row)
    return rows


def done_rows(output: str) -> dict[str, dict]:
    """Rows already written for ``output``: the merged file and every rank's part, by video path."""
    done = {}
    for path in [output] + sorted(glob.glob(glob.escape(output) + ".part-*.jsonl")):
        for row in read_rows(path):
            prev = done.get(row["video"])
            if prev is None or (not prev.get("ok") and row.get("ok")):
                done[row["video"]] = row
    return done


class RowWriter:
    """Appends rows to one JSONL file, one flushed line each (durable against a killed process).

    Opening truncates a torn last line left by a previous crash, so appended rows start on a
    line of their own.
    """

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if os.path.exists(path):
            with open(path, "rb+") as f:
                data = f.read()
                keep = data.rfind(b"\n") + 1
                if keep != len(data):
                    f.truncate(keep)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, row: dict):
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self):
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()


def merge(output: str, items: list[dict]) -> tuple[int, int]:
    """Write ``output`` with one row per item, in input order, atomically; returns (rows, missing)."""
    done = done_rows(output)
    tmp = f"{output}.tmp-{os.getpid()}"
    rows = missing = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for item in items:
            row = done.get(item["video"])
            if row is None:
                missing += 1
                continue
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            rows += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, output)
    return rows, missing


# -- decode/preprocess in DataLoader workers ------------------------------------------------------
class _VideoDataset:
    """Map-style dataset: item -> decoded (and on CPU preprocessed) frames, or the error."""

    def __init__(self, items, num_frames, preprocess, image_size):
        self.items, self.num_frames = items, num_frames
        self.preprocess, self.image_size = preprocess, image_size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from .video import read_video

        item = dict(self.items[i])
        try:
            video = read_video(item["video"], num_frames=self.num_frames,
                               start=item.get("start"), end=item.get("end"))
            item["frames"] = len(video)
            if self.preprocess:
                from .preprocess import frames_to_pixel_values

                item["pixel_values"] = frames_to_pixel_values(video, image_size=self.image_size)
            else:
                item["decoded"] = video
        except Exception as exc:  # a bad video becomes an error row, never stops the run
            item["error"] = f"{type(exc).__name__}: {exc}"
        return item


def _identity(x):
    return x


def iter_loaded(items, pipe, workers: int) -> Iterator[dict]:
    """Items with their frames, decoded by ``workers`` processes ahead of the model."""
    import torch.utils.data

    dataset = _VideoDataset(items, pipe.num_frames, pipe.device.type == "cpu", pipe.image_size)
    if workers <= 0:
        yield from (dataset[i] for i in range(len(dataset)))
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_identity,
        prefetch_factor=2, persistent_workers=False)
    yield from loader


def caption_items(pipe, items, *, prompt: str, batch_size: int, workers: int,
                  max_new_tokens: int, write, progress=None):
    """Caption ``items`` in batches; ``write(row)`` is called once per item. Returns error count."""
    import torch

    errors = 0
    pending = []

    def flush():
        nonlocal errors
        if not pending:
            return
        try:
            if "pixel_values" in pending[0]:
                pixels = torch.cat([p["pixel_values"] for p in pending])
            else:
                pixels, _ = pipe.preprocess([p["decoded"] for p in pending])
            inputs = pipe.build_inputs(pixels, [p["frames"] for p in pending],
                                       [prompt] * len(pending))
            texts = pipe.generate(inputs, max_new_tokens=max_new_tokens).texts
            rows = [_row(p, caption=t) for p, t in zip(pending, texts)]
        except (ValueError, RuntimeError) as exc:
            if len(pending) > 1 and not _is_oom(exc):
                # one bad input must not sink its batch: retry one by one
                batch = list(pending)
                pending.clear()
                for p in batch:
                    pending.append(p)
                    flush()
                return
            if _is_oom(exc):
                raise
            rows = [_row(p, error=f"{type(exc).__name__}: {exc}") for p in pending]
        for row in rows:
            errors += not row["ok"]
            write(row)
        if progress is not None:
            progress.update(len(pending))
        pending.clear()

    for item in iter_loaded(items, pipe, workers):
        if "error" in item:
            errors += 1
            write(_row(item, error=item["error"]))
            if progress is not None:
                progress.update(1)
            continue
        pending.append(item)
        if len(pending) >= batch_size:
            flush()
    flush()
    return errors


def _is_oom(exc) -> bool:
    return "out of memory" in str(exc).lower()


def _row(item, *, caption=None, error=None) -> dict:
    row = {"video": item["video"], "ok": error is None}
    for key in ("start", "end", "frames"):
        if item.get(key) is not None:
            row[key] = item[key]
    if error is None:
        row["caption"] = caption
    else:
        row["error"] = error
    return row


# -- command line --------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser):
    parser.add_argument("videos", nargs="*", help="video files (or images / frame folders)")
    parser.add_argument("--model", required=True, help="PLLaVA checkpoint directory")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="the captioning question")
    parser.add_argument("--num-frames", type=int, default=None,
                        help="frames sampled per video (default: the model's num_frames)")
    parser.add_argument("--pooling", default=None,
                        help="pooling shape T,H,W (default: the model's, e.g. 16,12,12)")
    add_kv_cache_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=1, help="videos per generate() call")
    parser.add_argument("--stream", action="store_true",
                        help="print tokens as they are generated (direct mode, batch 1)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--start", type=float, default=None, help="start time (s) of every video")
    parser.add_argument("--end", type=float, default=None, help="end time (s) of every video")
    parser.add_argument("--json", action="store_true", help="JSON lines on stdout")
    parser.add_argument("--input", help="dataset mode: a folder of videos or a list file")
    parser.add_argument("--output", help="dataset mode: merged captions JSONL (parts beside it)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader decode workers (default: 2 in dataset mode, else 0)")
    parser.add_argument("--retry-errors", action="store_true",
                        help="dataset mode: redo inputs whose earlier row is an error")
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: per rank)")
    parser.add_argument("--dtype", default="auto", help="auto | bf16 | fp16 | fp32")
    parser.add_argument("--device-map", default=None,
                        help="split one model over this process's GPUs with accelerate: auto | "
                             "balanced | sequential (e.g. the 34B model)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="tqdm progress bar on stderr (default: when stderr is a terminal)")


def parse_pooling(spec):
    if spec is None:
        return None
    try:
        shape = tuple(int(v) for v in str(spec).replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) <= 0:
        raise ValueError(f"--pooling must be three positive ints T,H,W (e.g. 16,12,12), got {spec!r}")
    return shape


def load_pipeline(args, device):
    """The pipeline for ``args.model`` with ``--num-frames``, ``--pooling`` and the KV-cache flags."""
    from .pipeline import VideoPipeline

    return VideoPipeline.from_pretrained(
        args.model, device=device, dtype=args.dtype, kv_cache=args.kv_cache,
        kv_cache_options=kv_cache_options(args),
        device_map=getattr(args, "device_map", None),
        num_frames=args.num_frames, pooling_shape=parse_pooling(getattr(args, "pooling", None)))


def _device(arg, rank):
    import torch

    if arg:
        return arg
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", rank))
        return f"cuda:{local % torch.cuda.device_count()}"
    return "cpu"


def _progress(args, total, desc):
    from tqdm import tqdm

    disable = not sys.stderr.isatty() if args.progress is None else not args.progress
    return tqdm(total=total, desc=desc, unit="video", file=sys.stderr, disable=disable,
                dynamic_ncols=True)


def run(args) -> int:
    try:
        parse_pooling(args.pooling)
        kv_cache_options(args)
        if args.batch_size < 1 or args.max_new_tokens < 1:
            raise ValueError("--batch-size and --max-new-tokens must be >= 1")
        if not os.path.isdir(args.model):
            raise FileNotFoundError(f"model directory not found: {args.model}")
        if args.input and not args.output:
            raise ValueError("--input needs --output (the captions JSONL)")
        rank, world = dist_env()
        items = [{"video": v} for v in args.videos]
        if args.input:
            items += list_inputs(args.input)
        for item in items:
            for key in ("start", "end"):
                if item.get(key) is None and getattr(args, key) is not None:
                    item[key] = getattr(args, key)
        items = dedupe(items)
        if not items:
            raise ValueError("nothing to caption: give video paths or --input")
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.output:
            return _run_dataset(args, items, rank, world)
        return _run_direct(args, items)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        traceback.print_exc()
        print(f"error: captioning failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED


def _run_direct(args, items) -> int:
    pipe = load_pipeline(args, _device(args.device, 0))
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
            except (ValueError, RuntimeError, FileNotFoundError) as exc:
                errors += 1
                print(f"\nerror: {item['video']}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_SOME_FAILED if errors else EXIT_OK

    def write(row):
        if args.json:
            print(json.dumps(row, ensure_ascii=False), flush=True)
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
            pipe = load_pipeline(args, _device(args.device, rank))
            writer = RowWriter(part_path(args.output, rank))
            workers = 2 if args.workers is None else args.workers
            try:
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
            print(json.dumps({"rank": rank, "world_size": world, "inputs": len(mine),
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
