"""Where frames come from: media extensions, paths / bytes / file objects opened with PyAV,
still images and folders of numbered frames (read with PIL)."""
from __future__ import annotations

import io
import os
import re

import av
import numpy as np
import torch

from ..checks import one_of
from .frames import DecodedVideo, VideoDecodeError
from .sampling import sample_indices

from .extensions import IMAGE_EXTENSIONS


def _name_of(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(getattr(source, "name", None) or f"<{type(source).__name__}>")


def _natural_key(name: str):
    return [int(tok) if tok.isdigit() else tok.lower() for tok in re.split(r"(\d+)", name)]


def frame_files(folder: str) -> list[str]:
    """Image files of a frame folder in numeric order (frame2.jpg before frame10.jpg)."""
    names = [n for n in os.listdir(folder)
             if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
             and os.path.isfile(os.path.join(folder, n))]
    return [os.path.join(folder, n) for n in sorted(names, key=_natural_key)]


def _load_image(fp, name: str, rotate: bool) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        with Image.open(fp) as im:
            if rotate:
                im = ImageOps.exif_transpose(im)
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise VideoDecodeError(f"{name}: cannot read image ({e})") from e


def _is_still_image(fp) -> bool:
    """True when PIL reads the seekable binary file ``fp`` as one still image (animations go to
    the decoder); PIL reads only the header. ``fp`` is left where it was."""
    from PIL import Image, UnidentifiedImageError
    pos = fp.tell()
    try:
        with Image.open(fp) as im:
            return im.format != "GIF" and getattr(im, "n_frames", 1) == 1
    except (UnidentifiedImageError, OSError, ValueError):
        return False
    finally:
        fp.seek(pos)


HWACCELS = (None, "cuda")


def check_hwaccel(hwaccel) -> None:
    """ValueError unless ``hwaccel`` is None or "cuda" with both a CUDA GPU and a PyAV whose
    FFmpeg offers the cuda (NVDEC) device type."""
    one_of("hwaccel", hwaccel, HWACCELS)
    if hwaccel is None:
        return
    from av.codec.hwaccel import hwdevices_available

    if hwaccel not in hwdevices_available():
        raise ValueError(f"hwaccel={hwaccel!r}: this PyAV's FFmpeg offers only "
                         f"{hwdevices_available()}")
    if not torch.cuda.is_available():
        raise ValueError(f"hwaccel={hwaccel!r} needs a CUDA GPU; torch sees none")


class _Opener:
    """Opens (and re-opens) a PyAV container on a path, bytes or a seekable binary file;
    ``hwaccel="cuda"``: its video decoders run on NVDEC (frames downloaded to host memory,
    software decode where NVDEC cannot take the stream)."""

    def __init__(self, source, name: str, hwaccel: str | None = None):
        self.name, self.hwaccel = name, hwaccel
        self.path = self.data = self.file = None
        if isinstance(source, (str, os.PathLike)):
            self.path = os.fspath(source)
        elif isinstance(source, (bytes, bytearray, memoryview)):
            self.data = bytes(source)
        else:
            self.file = source
            self.file_start = source.tell() if hasattr(source, "tell") else 0

    def open(self):
        if self.path is not None:
            target = self.path
        elif self.data is not None:
            target = io.BytesIO(self.data)
        else:
            self.file.seek(self.file_start)
            target = self.file
        kwargs = {}
        if self.hwaccel is not None:
            from av.codec.hwaccel import HWAccel

            kwargs["hwaccel"] = HWAccel(self.hwaccel, allow_software_fallback=True)
        try:
            return av.open(target, "r", metadata_errors="ignore", **kwargs)
        except av.error.FileNotFoundError as e:
            raise FileNotFoundError(f"{self.name}: no such file") from e
        except (av.error.FFmpegError, UnicodeDecodeError, EOFError) as e:
            raise VideoDecodeError(f"{self.name}: not a readable media file ({e})") from e
        except OSError as e:  # the hardware device could not be opened
            if self.hwaccel is None:
                raise
            raise VideoDecodeError(f"{self.name}: hwaccel={self.hwaccel!r} could not open the "
                                   f"device ({e})") from e


def _video_stream(container, name: str):
    if not container.streams.video:
        raise VideoDecodeError(f"{name}: no video stream (audio-only or not a video)")
    return container.streams.video[0]


def _read_images(paths, name, num_frames, start, end, fps, rotate) -> DecodedVideo:
    indices = sample_indices(len(paths), num_frames, fps=fps, start=start, end=end)
    cache = {i: _load_image(paths[i], paths[i], rotate) for i in sorted(set(indices))}
    sizes = {a.shape for a in cache.values()}
    if len(sizes) > 1:
        raise VideoDecodeError(f"{name}: frames have different sizes {sorted(sizes)}")
    rgb = torch.from_numpy(np.stack([cache[i] for i in indices]))
    return DecodedVideo(source=name, indices=indices, fps=fps, num_frames_total=len(paths),
                        pixel_format="rgb24", rgb=rgb, color_matrix="bt601", color_range="full")
