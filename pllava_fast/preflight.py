"""Cheap checks of a run's inputs before torch or any model loads.

Reads a checkpoint's config.json and file headers (weights, tokenizer), the headers of the videos,
and estimates what a run would need against what the machine has: host memory for the decoded
frames, the model input and the visual activations, and the LLM context for the prompt, the
visual tokens and the new tokens. Every problem is a ``ValueError`` / ``FileNotFoundError`` whose
message names the file, frame, argument or shape. Nothing here imports torch or transformers.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import struct

from .config_json import read_config_json
from .video.extensions import IMAGE_EXTENSIONS

# headroom: an estimate above this share of the available memory is refused
MEMORY_SHARE = 0.8


@dataclasses.dataclass
class CheckpointInfo:
    """What a checkpoint directory says about the model, from its config.json."""

    path: str
    num_frames: int
    pooling_shape: tuple[int, int, int]
    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    text_hidden: int
    text_layers: int
    max_positions: int | None
    tokenizer_file: str | None

    @property
    def visual_tokens(self) -> int:
        return math.prod(self.pooling_shape)


def _stat_path(path: str, what: str) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{what} {path}: a symbolic link loop (too many levels of links)") from None
        raise ValueError(f"{what} {path}: cannot be read ({exc.strerror})") from None


def checkpoint(path: str) -> CheckpointInfo:
    """Check a PLLaVA checkpoint directory without loading it: config.json, weight files (a
    safetensors file whose header promises more bytes than it holds is truncated), tokenizer."""
    path = os.fspath(path)
    _stat_path(path, "model directory")
    if not os.path.isdir(path):
        raise ValueError(f"model directory {path} is a file, not a checkpoint directory")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in model directory {path}")
    cfg = read_config_json(config_file)
    vision, text = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
    if not isinstance(vision, dict) or not isinstance(text, dict):
        raise ValueError(f"{config_file}: vision_config and text_config must be JSON objects")
    _check_weights(path)
    tokenizer_file = next((os.path.join(path, f) for f in ("tokenizer.json", "tokenizer.model")
                           if os.path.isfile(os.path.join(path, f))), None)
    if tokenizer_file is None and not os.path.isfile(os.path.join(path, "tokenizer_config.json")):
        raise FileNotFoundError(f"no tokenizer in model directory {path} (tokenizer.json, "
                                "tokenizer.model or tokenizer_config.json)")

    def field(obj, key, default, kind=int):
        value = obj.get(key, default)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{config_file}: {key} must be {kind.__name__}, got {value!r}")
        return value

    pooling = cfg.get("pooling_shape", (16, 12, 12))
    if (not isinstance(pooling, list | tuple) or len(pooling) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pooling)):
        raise ValueError(f"{config_file}: pooling_shape must be 3 positive ints, got {pooling!r}")
    max_positions = text.get("max_position_embeddings")
    return CheckpointInfo(
        path=path, num_frames=field(cfg, "num_frames", 16), pooling_shape=tuple(pooling),
        image_size=field(vision, "image_size", 336), patch_size=field(vision, "patch_size", 14),
        vision_hidden=field(vision, "hidden_size", 1024),
        vision_layers=field(vision, "num_hidden_layers", 24),
        text_hidden=field(text, "hidden_size", 4096),
        text_layers=field(text, "num_hidden_layers", 32),
        max_positions=max_positions if isinstance(max_positions, int) else None,
        tokenizer_file=tokenizer_file)


def _check_weights(path: str) -> None:
    names = sorted(os.listdir(path))
    shards = [n for n in names if n.endswith(".safetensors")]
    bins = [n for n in names if n.endswith(".bin") and n.startswith(("pytorch_model", "model"))]
    if not shards and not bins:
        raise FileNotFoundError(f"no weights in model directory {path}: expected model.safetensors, "
                                "safetensors shards or pytorch_model*.bin")
    for name in shards:
        _check_safetensors(os.path.join(path, name))


def _check_safetensors(file: str) -> None:
    """A safetensors file is an 8-byte header length, a JSON header and the tensor bytes: the
    header's largest data offset must fit in the file."""
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (None,)
            if n is None or n > size - 8 or n > 100 * 2**20:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise ValueError(f"{file}: not a safetensors file or truncated ({exc})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"
               and isinstance(v, dict) and "data_offsets" in v), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{file}: truncated: the header lists {8 + n + end} bytes, the file "
                         f"has {size}")


@dataclasses.dataclass
class VideoHeader:
    """Size and length of a video (or image / frame folder) from its header, not its frames."""

    path: str
    width: int
    height: int
    frames: int | None  # None when the container does not say
    image: bool = False


def video_header(path: str) -> VideoHeader:
    """Open ``path`` just far enough to know its frame size (PyAV's probe / PIL's header)."""
    path = os.fspath(path)
    _stat_path(path, "video")
    if os.path.isdir(path):
        frames = sorted(n for n in os.listdir(path)
                        if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
        if not frames:
            raise ValueError(f"{path}: folder holds no image frames")
        w, h = _image_size(os.path.join(path, frames[0]))
        return VideoHeader(path, w, h, len(frames))
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
        w, h = _image_size(path)
        return VideoHeader(path, w, h, 1, image=True)
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream (audio-only or not a video)")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            frames = stream.frames or None
    except av.error.FFmpegError as exc:
        raise ValueError(f"{path}: not a readable video ({exc.strerror or exc})") from None
    if not w or not h:
        raise ValueError(f"{path}: the video stream has no frame size")
    return VideoHeader(path, w, h, frames)


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path}: cannot read image ({exc})") from None


def available_memory() -> int | None:
    """Bytes of host memory available now (Linux MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def visual_bytes(videos: list[VideoHeader], num_frames: int, info: CheckpointInfo,
                 dtype_bytes: int, on_host: bool) -> int:
    """Estimated peak bytes of the visual stage for one batch of ``videos``: the sampled frames
    as YUV planes, and, where the model runs on the host, the model input, the largest CLIP
    activations of a frame batch and the linear_1 output."""
    frames = sum(num_frames * v.width * v.height * 3 // 2 for v in videos)
    if not on_host:
        return frames
    grid = (info.image_size // info.patch_size) ** 2
    n = num_frames * len(videos)
    pixels = n * 3 * info.image_size ** 2 * dtype_bytes
    # a CLIP layer holds its input, the attention scores of every head and the MLP's 4x width
    vision = n * (grid + 1) * (6 * info.vision_hidden + (grid + 1) * 16) * dtype_bytes
    projector = n * grid * info.text_hidden * dtype_bytes
    return frames + pixels + vision + projector


def check_memory(needed: int, what: str, available: int | None = None) -> None:
    """ValueError when ``needed`` bytes exceed MEMORY_SHARE of the available memory."""
    available = available_memory() if available is None else available
    if available is not None and needed > MEMORY_SHARE * available:
        raise ValueError(f"{what} would need about {needed / 2**30:.1f} GiB, but only "
                         f"{available / 2**30:.1f} GiB of memory is available")


def prompt_tokens(info: CheckpointInfo, text: str) -> int | None:
    """Tokens of ``text`` with the checkpoint's tokenizer.json (the fast tokenizers library, no
    transformers), or None when the checkpoint has none."""
    if info.tokenizer_file is None or not info.tokenizer_file.endswith(".json"):
        return None
    from tokenizers import Tokenizer

    return len(Tokenizer.from_file(info.tokenizer_file).encode(text).ids)


def check_context(info: CheckpointInfo, prompt: int | None, max_new_tokens: int,
                  visual_tokens: int | None = None, what: str = "the prompt") -> None:
    """ValueError when prompt + visual tokens + max_new_tokens exceed the LM's positions."""
    if info.max_positions is None:
        return
    visual = info.visual_tokens if visual_tokens is None else visual_tokens
    total = (prompt or 0) + visual + max_new_tokens
    if total > info.max_positions:
        parts = f"{prompt} prompt + " if prompt is not None else ""
        raise ValueError(f"{what} does not fit the model's context: {parts}{visual} visual + "
                         f"{max_new_tokens} new tokens = {total} > max_position_embeddings "
                         f"{info.max_positions} ({info.path}/config.json)")


def utf8(name: str, text: str) -> str:
    """``text`` if it encodes as UTF-8 (argv with undecodable bytes holds surrogates), else
    ValueError naming the argument."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not valid UTF-8 text (byte {exc.start})") from None
    return text
