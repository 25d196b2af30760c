"""Inputs of a run, listed without torch: video folders and list files, duplicates, the share of
each torchrun rank, and the videos a profile covers."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from .checks import time_span
from .video.extensions import IMAGE_EXTENSIONS, MEDIA_EXTENSIONS, VIDEO_EXTENSIONS


def list_inputs(spec: str) -> list[dict]:
    """A folder (its video and image files, recursively, sorted) or a list file -> input items.

    A list file has one input per line: a path (relative paths are relative to the list file's
    folder) or a JSON object ``{"video": path, "start": s, "end": s}``; blank lines and lines
    starting with ``#`` are skipped. Each item is ``{"video": str, "start"?: float, "end"?: float}``.
    """
    if os.path.isdir(spec):
        found = []
        for root, _, files in os.walk(spec):
            found += [os.path.join(root, f) for f in files
                      if os.path.splitext(f)[1].lower() in MEDIA_EXTENSIONS]
        return [{"video": p} for p in sorted(found)]
    if not os.path.isfile(spec):
        if os.path.exists(spec):
            raise ValueError(f"--input {spec} is neither a folder nor a regular list file")
        raise FileNotFoundError(f"--input not found: {spec} (expected a folder or a list file)")
    base = os.path.dirname(os.path.abspath(spec))
    items = []
    try:
        with open(spec, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"--input {spec} is not a UTF-8 text list ({exc.reason} at byte "
                         f"{exc.start})") from None
    for lineno, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{spec}:{lineno}"
        if line.startswith("{"):
            try:
                # NaN / Infinity are not JSON: a strict parse, so a time never becomes NaN
                item = json.loads(line, parse_constant=_no_constant)
            except (json.JSONDecodeError, ValueError) as exc:
                raise ValueError(f"{where}: bad JSON line ({exc})") from None
            if not isinstance(item, dict) or "video" not in item:
                raise ValueError(f"{where}: JSON line has no 'video' field")
            item = {k: item[k] for k in ("video", "start", "end") if item.get(k) is not None}
        else:
            item = {"video": line}
        if not isinstance(item["video"], str) or not item["video"]:
            raise ValueError(f"{where}: 'video' must be a non-empty path string, got "
                             f"{item['video']!r}")
        time_span(item.get("start"), item.get("end"), where)
        if not os.path.isabs(item["video"]):
            item["video"] = os.path.join(base, item["video"])
        items.append(item)
    return items


def _no_constant(name):
    raise ValueError(f"{name} is not a number")


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


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer (torchrun sets it), got {name}={raw!r}") from None


def dist_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's RANK / WORLD_SIZE environment (default 0, 1)."""
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world} (expected 0..{world - 1})")
    return rank, world


def local_rank(default: int) -> int:
    """This process's GPU slot on its node, torchrun's LOCAL_RANK (``default`` when unset)."""
    rank = _env_int("LOCAL_RANK", default)
    if rank < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0, got {rank}")
    return rank


def _is_single_video(obj) -> bool:
    return (isinstance(obj, (str, os.PathLike)) or hasattr(obj, "shape")
            or hasattr(obj, "num_frames_total") or hasattr(obj, "__array_interface__")
            or not isinstance(obj, Iterable))


def expand_sources(videos) -> list:
    """Videos to profile, paths checked to exist. A folder holding video files expands to them
    (sorted); a folder of images only is one video (numbered frames, as ``read_video`` reads it).
    In-memory videos (DecodedVideo, frame arrays) pass through."""
    if _is_single_video(videos):
        videos = [videos]
    out = []
    for v in videos:
        if not isinstance(v, (str, os.PathLike)):
            out.append(v)
            continue
        p = Path(v)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file())
            found = [f for f in files if f.suffix.lower() in VIDEO_EXTENSIONS]
            if found:
                out.extend(found)
            elif any(f.suffix.lower() in IMAGE_EXTENSIONS for f in files):
                out.append(p)
            else:
                raise ValueError(f"no video files ({', '.join(sorted(VIDEO_EXTENSIONS))}) or "
                                 f"image frames in folder {p}")
        elif not p.exists():
            if p.is_symlink():
                raise ValueError(f"video {p}: a symbolic link loop or a link to nothing")
            raise FileNotFoundError(f"video not found: {p}")
        else:
            out.append(p)
    if not out:
        raise ValueError("no videos given: pass at least one video file or folder")
    return out
