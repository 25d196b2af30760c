"""Cheap checks of a run's inputs before torch or any model loads.

Reads a checkpoint's config.json and file headers (weights, tokenizer), the headers of the videos,
and estimates what a run would need against what the machine has: host memory for the decoded
frames, the model input and the visual activations, and the LLM context for the prompt, the
visual tokens and the new tokens. Every problem is a ``ValueError`` / ``FileNotFoundError`` whose
message names the file, frame, argument or shape. Nothing here imports torch or transformers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
import zipfile

from .checks import check_path, host_memory_available
from .config_json import index_shards, read_config_json
from .video.extensions import IMAGE_EXTENSIONS

# headroom: an estimate above this share of the available memory is refused
MEMORY_SHARE = 0.8


@dataclasses.dataclass
class CheckpointInfo:
    """What a checkpoint directory (or a named shape) says about the model, from its config.json
    and weight headers."""

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
    params: int = 0  # parameters in the weight files (a lower bound for .bin files)
    stored_bytes: int = 0  # bytes of the weight files, read into host memory at load
    dtype: str | None = None  # the dtype config.json records (for --dtype checkpoint)

    @property
    def visual_tokens(self) -> int:
        return math.prod(self.pooling_shape)


def _field(file, obj, key, default, minimum=1):
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{file}: {key} must be an int >= {minimum}, got {value!r}")
    return value


def checkpoint(path: str) -> CheckpointInfo:
    """Check a PLLaVA checkpoint directory without loading it: config.json, weight files (a
    safetensors file whose header promises more bytes than it holds is truncated; a weight index
    must list files that exist), tokenizer."""
    path = os.fspath(path)
    check_path(path, "model directory")
    if not os.path.isdir(path):
        raise ValueError(f"model directory {path} is a file, not a checkpoint directory")
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"no config.json in model directory {path}")
    cfg = read_config_json(config_file)
    vision, text = cfg.get("vision_config", {}), cfg.get("text_config", {})
    vision, text = {} if vision is None else vision, {} if text is None else text
    if not isinstance(vision, dict) or not isinstance(text, dict):
        raise ValueError(f"{config_file}: vision_config and text_config must be JSON objects")
    params, stored = _check_weights(path)
    tokenizer_file = _tokenizer_file(path)
    pooling = cfg.get("pooling_shape", (16, 12, 12))
    if (not isinstance(pooling, list | tuple) or len(pooling) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pooling)):
        raise ValueError(f"{config_file}: pooling_shape must be 3 positive ints, got {pooling!r}")
    max_positions = text.get("max_position_embeddings")
    if max_positions is not None:
        max_positions = _field(config_file, text, "max_position_embeddings", None)
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or text.get("torch_dtype")
    return CheckpointInfo(
        path=path, num_frames=_field(config_file, cfg, "num_frames", 16),
        pooling_shape=tuple(pooling),
        image_size=_field(config_file, vision, "image_size", 336),
        patch_size=_field(config_file, vision, "patch_size", 14),
        vision_hidden=_field(config_file, vision, "hidden_size", 1024),
        vision_layers=_field(config_file, vision, "num_hidden_layers", 24),
        text_hidden=_field(config_file, text, "hidden_size", 4096),
        text_layers=_field(config_file, text, "num_hidden_layers", 32),
        max_positions=max_positions, tokenizer_file=tokenizer_file, params=params,
        stored_bytes=stored, dtype=dtype if isinstance(dtype, str) else None)


def _tokenizer_file(path: str) -> str | None:
    tokenizer_file = next((os.path.join(path, f) for f in ("tokenizer.json", "tokenizer.model")
                           if os.path.isfile(os.path.join(path, f))), None)
    config = os.path.join(path, "tokenizer_config.json")
    if tokenizer_file is None and not os.path.isfile(config):
        raise FileNotFoundError(f"no tokenizer in model directory {path} (tokenizer.json, "
                                "tokenizer.model or tokenizer_config.json)")
    if os.path.isfile(config):
        read_config_json(config)  # a broken tokenizer_config.json fails here, named
    return tokenizer_file


def _check_weights(path: str) -> tuple[int, int]:
    """(parameters, bytes) of the weight files; ValueError naming a file that cannot be one."""
    names = sorted(os.listdir(path))
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index in names:
            absent = [s for s in index_shards(os.path.join(path, index)) if s not in names]
            if absent:
                raise FileNotFoundError(f"{os.path.join(path, index)} lists shards that are "
                                        f"absent: {absent}")
    shards = [n for n in names if n.endswith(".safetensors")]
    bins = [n for n in names if n.endswith(".bin") and n.startswith(("pytorch_model", "model"))]
    if not shards and not bins:
        raise FileNotFoundError(f"no weights in model directory {path}: expected model.safetensors, "
                                "safetensors shards or pytorch_model*.bin")
    params = stored = 0
    for name in shards:
        n, size = _check_safetensors(os.path.join(path, name))
        params, stored = params + n, stored + size
    if not shards:  # loading reads .bin files only without safetensors
        for name in bins:
            size = _check_bin(os.path.join(path, name))
            params, stored = params + size // 4, stored + size  # fp32 storage: a lower bound
    return params, stored


def _check_bin(file: str) -> int:
    """A torch.save zip must have its central directory (a truncated download has not)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    if zipped:
        try:
            zipfile.ZipFile(file).close()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ValueError(f"{file}: not a torch checkpoint or truncated ({exc})") from None
    return size


def _check_safetensors(file: str) -> tuple[int, int]:
    """A safetensors file is an 8-byte header length, a JSON header and the tensor bytes: the
    header's largest data offset must fit in the file. Returns (parameters, file bytes)."""
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            raw = f.read(8)
            (n,) = struct.unpack("<Q", raw) if len(raw) == 8 else (None,)
            if n is None or n > size - 8 or n > 100 * 2**20:
                raise ValueError("bad header length")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = params = 0
        for name, v in tensors.items():
            offsets, shape = v.get("data_offsets"), v.get("shape")
            if (not isinstance(offsets, list) or len(offsets) != 2 or not isinstance(shape, list)
                    or not all(isinstance(o, int) for o in offsets + shape)):
                raise ValueError(f"tensor {name!r} has no valid shape / data_offsets")
            end, params = max(end, offsets[1]), params + math.prod(shape)
    except (ValueError, UnicodeDecodeError, struct.error, AttributeError) as exc:
        raise ValueError(f"{file}: not a safetensors file or truncated ({exc})") from None
    if 8 + n + end > size:
        raise ValueError(f"{file}: truncated: the header lists {8 + n + end} bytes, the file "
                         f"has {size}")
    return params, size


def shared_sample() -> str | None:
    """../shared/videos/cooking.mp4 beside the checkout, when present (bench's default clip)."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "videos", "cooking.mp4")
    return os.path.abspath(path) if os.path.exists(path) else None


# bench's generated clip where the shared sample is missing (comparison.default_video)
BENCH_CLIP = dict(num_frames=96, height=360, width=640, fps=24)


@dataclasses.dataclass
class VideoHeader:
    """Size and length of a video (or image / frame folder) from its header, not its frames."""

    path: str
    width: int
    height: int
    frames: int | None  # None when the container does not say
    image: bool = False
    duration: float | None = None  # seconds, when the container says (not for frame folders)
    folder: bool = False


def video_header(path: str) -> VideoHeader:
    """Open ``path`` just far enough to know its frame size (PyAV's probe / PIL's header).
    FileNotFoundError / ValueError naming the file for anything that is not a video, image or
    folder of frames (a FIFO or device is refused before anything opens it: it would block)."""
    path = os.fspath(path)
    check_path(path, "video")
    if os.path.isdir(path):
        frames = sorted(n for n in os.listdir(path)
                        if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
        if not frames:
            raise ValueError(f"{path}: folder holds no image frames "
                             f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
        w, h = _image_size(os.path.join(path, frames[0]))
        return VideoHeader(path, w, h, len(frames), folder=True)
    if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
        w, h = _image_size(path)
        return VideoHeader(path, w, h, 1, image=True)
    import av

    try:
        with av.open(path, metadata_errors="ignore") as container:
            if not container.streams.video:
                raise ValueError(f"{path}: no video stream (audio-only or not a video)")
            stream = container.streams.video[0]
            w, h = stream.codec_context.width, stream.codec_context.height
            frames = stream.frames or None
            if stream.duration and stream.time_base:
                duration = float(stream.duration * stream.time_base)
            else:
                duration = container.duration / 1e6 if container.duration else None
    except av.error.FFmpegError as exc:
        raise ValueError(f"{path}: not a readable video ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:  # metadata that is not UTF-8 in some PyAV versions
        raise ValueError(f"{path}: not a readable video ({exc})") from None
    if not w or not h:
        raise ValueError(f"{path}: the video stream has no frame size")
    return VideoHeader(path, w, h, frames, duration=duration)


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read image ({exc})") from None


def available_memory() -> int | None:
    """Bytes of host memory available now (Linux MemAvailable), or None when unknown."""
    return host_memory_available()


def visual_bytes(videos: list[VideoHeader], num_frames: int, info: CheckpointInfo | None,
                 dtype_bytes: int, on_host: bool) -> int:
    """Estimated peak bytes of the visual stage for one batch of ``videos``: the sampled frames
    as YUV planes, and, where the model runs on the host, the model input (twice: the op's
    output and the batch it is concatenated into), the largest CLIP activations of a frame
    batch and the linear_1 output. Without ``info`` (a model not written yet) only the frames."""
    frames = sum(num_frames * v.width * v.height * 3 // 2 for v in videos)
    if not on_host or info is None:
        return frames
    grid = (info.image_size // info.patch_size) ** 2
    n = num_frames * len(videos)
    pixels = 2 * n * 3 * info.image_size ** 2 * dtype_bytes
    # a CLIP layer holds its input, the attention scores of every head and the MLP's 4x width
    vision = n * (grid + 1) * (6 * info.vision_hidden + (grid + 1) * 16) * dtype_bytes
    projector = n * grid * info.text_hidden * dtype_bytes
    return frames + pixels + vision + projector


def weights_bytes(info: CheckpointInfo, dtype_bytes: int, on_host: bool) -> int:
    """Host bytes the weights take while the model loads: the files' tensors as read, and the
    model built on the host in the run's dtype before it moves to a GPU (``stored_bytes`` 0: a
    random model of a named shape, made on its device)."""
    if info.stored_bytes:
        return info.stored_bytes + info.params * dtype_bytes
    return info.params * dtype_bytes if on_host else 0


def check_memory(needed: int, what: str, available: int | None = None) -> None:
    """ValueError when ``needed`` bytes exceed MEMORY_SHARE of the available memory."""
    available = available_memory() if available is None else available
    if available is not None and needed > MEMORY_SHARE * available:
        raise ValueError(f"{what} would need about {needed / 2**30:.1f} GiB, but only "
                         f"{available / 2**30:.1f} GiB of memory is available")


def prompt_tokens(info: CheckpointInfo, text: str) -> int | None:
    """Tokens of ``text`` with the checkpoint's tokenizer.json (the fast tokenizers library, no
    transformers), or None when the checkpoint has none; ValueError naming a broken file."""
    if info.tokenizer_file is None or not info.tokenizer_file.endswith(".json"):
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(info.tokenizer_file)
    except Exception as exc:  # the tokenizers library raises its own Exception types
        raise ValueError(f"{info.tokenizer_file}: not a tokenizer ({_one_line(exc)})") from None
    return len(tokenizer.encode(text).ids)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def check_context(info: CheckpointInfo, prompt: int | None, max_new_tokens: int,
                  visual_tokens: int | None = None, what: str = "the prompt",
                  at_least: bool = False) -> None:
    """ValueError when prompt + visual tokens + max_new_tokens exceed the LM's positions
    (``at_least``: ``prompt`` is a lower bound of the prompt's tokens)."""
    if info.max_positions is None:
        return
    visual = info.visual_tokens if visual_tokens is None else visual_tokens
    total = (prompt or 0) + visual + max_new_tokens
    if total > info.max_positions:
        parts = (f"{'at least ' if at_least else ''}{prompt} prompt + " if prompt is not None
                 else "")
        raise ValueError(f"{what} does not fit the model's context: {parts}{visual} visual + "
                         f"{max_new_tokens} new tokens = {total} > max_position_embeddings "
                         f"{info.max_positions} ({_config_of(info)})")


def _config_of(info: CheckpointInfo) -> str:
    return os.path.join(info.path, "config.json") if os.path.isdir(info.path) else info.path


def utf8(name: str, text: str) -> str:
    """``text`` if it encodes as UTF-8 (argv with undecodable bytes holds surrogates), else
    ValueError naming the argument."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} is not valid UTF-8 text (byte {exc.start})") from None
    return text


def config_info(config, path: str) -> CheckpointInfo:
    """A ``CheckpointInfo`` of a built model's ``PllavaConfig`` (read by attribute: no import)
    for the memory estimate; its weights are already in memory (``params`` 0)."""
    v, t = config.vision_config, config.text_config
    return CheckpointInfo(
        path=path, num_frames=config.num_frames, pooling_shape=tuple(config.pooling_shape),
        image_size=v.image_size, patch_size=v.patch_size, vision_hidden=v.hidden_size,
        vision_layers=v.num_hidden_layers, text_hidden=t.hidden_size,
        text_layers=t.num_hidden_layers,
        max_positions=getattr(t, "max_position_embeddings", None), tokenizer_file=None)


def shape_info(name: str, spec: dict) -> CheckpointInfo:
    """A ``CheckpointInfo`` for random weights of a named shape (``shapes.SHAPES``): its config,
    and its parameters counted from the widths (CLIP + projector + Llama)."""
    v, t = spec["vision"], spec["text"]
    grid = v["image_size"] // v["patch_size"]
    vision = v["num_hidden_layers"] * (4 * v["hidden_size"] ** 2 + 2 * v["hidden_size"]
                                       * v["intermediate_size"])
    vision += (3 * v["patch_size"] ** 2 + grid ** 2 + 1) * v["hidden_size"]
    head = t["hidden_size"] // t["num_attention_heads"]
    kv = t.get("num_key_value_heads", t["num_attention_heads"]) * head
    text = t["num_hidden_layers"] * (2 * t["hidden_size"] ** 2 + 2 * t["hidden_size"] * kv
                                     + 3 * t["hidden_size"] * t["intermediate_size"])
    text += 2 * t["vocab_size"] * t["hidden_size"]
    projector = v["hidden_size"] * t["hidden_size"] + t["hidden_size"] ** 2
    return CheckpointInfo(
        path=f"--shape {name}", num_frames=spec["num_frames"],
        pooling_shape=tuple(spec["pooling_shape"]), image_size=v["image_size"],
        patch_size=v["patch_size"], vision_hidden=v["hidden_size"],
        vision_layers=v["num_hidden_layers"], text_hidden=t["hidden_size"],
        text_layers=t["num_hidden_layers"], max_positions=t.get("max_position_embeddings"),
        tokenizer_file=None, params=vision + text + projector)


def default_bench_header() -> VideoHeader:
    """The header of the clip ``pllava-fast bench`` runs without --video: the shared sample, or
    the clip it generates (``BENCH_CLIP``)."""
    path = shared_sample()
    if path is not None:
        return video_header(path)
    c = BENCH_CLIP
    return VideoHeader(path=f"the generated {c['width']}x{c['height']} bench clip",
                       width=c["width"], height=c["height"], frames=c["num_frames"],
                       duration=c["num_frames"] / c["fps"])
