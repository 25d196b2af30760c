"""Dataset captioning: input lists, sharding over ranks, durable JSONL rows, resume and merge.

Each process (torchrun rank) takes the inputs ``i`` with ``i % WORLD_SIZE == RANK``;
DataLoader workers decode (and on CPU preprocess) the next videos while the model runs. Each rank
appends one flushed JSON line per video to ``<output>.part-<rank>.jsonl``; at the end the parts
are merged into the output in input order. A restart skips every input that already has a row in
any part (so a crash loses at most the rows being computed and never duplicates one); a torn last
line from a killed process is dropped and its video redone. A video that cannot be read becomes an
error row ``{"video": ..., "ok": false, "error": ...}`` and the run goes on.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import stat
from typing import Iterator

import torch
import torch.utils.data

from . import jsonio
from .preprocess import frames_to_pixel_values
from .video.read import read_video

# -- rows on disk --------------------------------------------------------------------------------
def part_path(output: str, rank: int) -> str:
    return f"{output}.part-{rank:05d}.jsonl"


def _regular(path: str) -> None:
    """A row file must be a regular file: a device (a link to /dev/zero or /dev/full) would be
    read without end, and a merge would replace it."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path} is not a regular file: rows are written to and read from "
                         "regular files only")


def read_rows(path: str) -> list[dict]:
    """The complete rows of a JSONL file; a torn or garbled line (a killed writer) is skipped."""
    rows = []
    if not os.path.exists(path):
        return rows
    _regular(path)
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


class OutputLocked(RuntimeError):
    """Another process holds the part file: two runs must not caption into the same output."""


class RowWriter:
    """Appends rows to one JSONL file, one flushed line each (durable against a killed process).

    Opening takes an exclusive lock on ``<path>.lock`` (``OutputLocked`` at once when another
    run holds it), then truncates a torn last line left by a previous crash, so appended rows
    start on a line of their own. A failed write (a full disk) raises OSError naming the file;
    the rows before it stay complete.
    """

    def __init__(self, path: str):
        self.path = path
        self.failed = False  # a write failed: close() must not raise a second, unnamed error
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # a POSIX record lock on a file of its own: unlike flock it is not inherited by the
        # DataLoader workers this process forks (a killed run's orphaned workers would hold it),
        # and it dies with the process
        self.lock = open(path + ".lock", "a")
        try:
            fcntl.lockf(self.lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.lock.close()
            raise OutputLocked(f"{path} is locked by another caption run on the same --output "
                               f"({path}.lock): wait for it to finish or choose another "
                               "--output") from None
        if os.path.exists(path):
            try:
                _regular(path)
            except ValueError:
                self.lock.close()
                raise
        self.file = open(path, "a", encoding="utf-8")
        with open(path, "rb") as f:
            data = f.read()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            os.ftruncate(self.file.fileno(), keep)

    def write(self, row: dict):
        try:
            self.file.write(jsonio.dumps(row) + "\n")
            self.file.flush()
        except OSError as exc:
            self.failed = True
            raise OSError(exc.errno, f"{self.path}: cannot write a row ({exc.strerror})") from None

    def close(self):
        """Flush, fsync and close; after a failed write only close (the error was raised once,
        naming the file: a second one from the same full disk must not replace it)."""
        if self.file.closed:
            return
        try:
            if not self.failed:
                self.file.flush()
                os.fsync(self.file.fileno())
        except OSError as exc:
            raise OSError(exc.errno, f"{self.path}: cannot write the last rows "
                                     f"({exc.strerror})") from None
        finally:
            try:
                self.file.close()
            except OSError:
                pass  # the rows that could not be written were reported above
            self.lock.close()  # releases the lock; the empty .lock file may stay


def merge(output: str, items: list[dict]) -> tuple[int, int]:
    """Write ``output`` with one row per item, in input order, atomically; returns (rows, missing)."""
    done = done_rows(output)
    tmp = f"{output}.tmp-{os.getpid()}"
    rows = missing = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for item in items:
                row = done.get(item["video"])
                if row is None:
                    missing += 1
                    continue
                f.write(jsonio.dumps(row) + "\n")
                rows += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, output)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        # the parts stay: a rerun merges them again
        raise OSError(exc.errno, f"{output}: cannot write the merged captions ({exc.strerror}); "
                                 "the part files are kept") from None
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
        item = dict(self.items[i])
        try:
            # read_video refuses a FIFO or device first (it would block the decoder)
            video = read_video(item["video"], num_frames=self.num_frames,
                               start=item.get("start"), end=item.get("end"))
            item["frames"] = len(video)
            if self.preprocess:
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
