"""``read_video`` / ``read_videos``: the sampled frames of any source, as ``DecodedVideo``."""
from __future__ import annotations

import collections
import concurrent.futures
import io
import itertools
import os

import torch

from ..checks import check_path, one_of, positive_int
from .decode import _read_stream
from .extensions import IMAGE_EXTENSIONS
from .frames import DecodedVideo, VideoDecodeError
from .sources import (_is_still_image, _load_image, _name_of, _Opener, _read_images,
                      check_hwaccel, frame_files)

NUMBERINGS = ("decord", "presentation")


def read_video(source, num_frames: int = 16, *, start: float | None = None,
               end: float | None = None, rotate: bool = True, keep_yuv: bool = True,
               threads: int = 0, fps: float | None = None, require_video: bool = False,
               stats: dict | None = None, numbering: str = "decord", workers: int | None = None,
               skip_nonref: bool = True, hwaccel: str | None = None) -> DecodedVideo:
    """Decode the ``num_frames`` frames PLLaVA samples from ``source`` (see ``sample_indices``).

    source: a video file (anything FFmpeg demuxes: mp4/mov/mkv/webm/avi/gif...), a folder of
      numbered image frames, a single image (returned as 1 frame: the model repeats it), or the
      same as ``bytes`` or a binary file object (read from its current position; one that
      cannot seek is read into memory first).
    start, end: time bounds in seconds (PLLaVA's evaluation rule); ``fps`` gives the frame rate
      of a frame folder (needed for bounds there); video files use their average rate.
    rotate: apply the display matrix (quarter turns; flips are ignored) / EXIF orientation.
    keep_yuv: 8-bit 4:2:0 streams (yuv420p, yuvj420p, nv12) tagged BT.601/BT.709 or untagged
      come back as Y/U/V planes with their matrix and range; everything else, and everything
      when False, as swscale's rgb24.
    threads: FFmpeg threads per decoder (0: one per core, shared among the ``workers``).
    require_video: reject single images.
    stats: when a dict, receives how the frames were found (mode, seeks, packets_decoded,
      numbering).
    numbering: "decord" (default): frames numbered as the original PLLaVA's decoder, decord
      0.6.0, numbers them, so PLLaVA's indices pick the original's pictures: ``len(vr)`` counts
      every packet (pre-roll too) and index i is the picture decord's ``get_batch`` returns
      (``decord_order``); "presentation": frame i is the i-th frame a full sequential decode
      outputs (the frame with the i-th smallest pts). For ordinary files (no pre-roll, closed
      GOPs) the two agree. For variable-frame-rate streams indices are frame counts, not times.
    workers: decoders that take the keyframe ranges concurrently (None: 2 where there are 2+
      cores); skip_nonref: skip the non-reference frames no target needs (same pixels).
    hwaccel: "cuda" decodes on NVDEC where torch has a CUDA GPU and PyAV's FFmpeg offers the
      cuda device (frames downloaded to host memory as NV12, the same pictures; software decode
      for streams NVDEC cannot take). Opt-in and unverified: no GPU run has checked it yet.

    Raises FileNotFoundError for a missing path, VideoDecodeError (a ValueError) naming the
    source for anything that is not a decodable video.
    """
    positive_int("num_frames", num_frames)
    positive_int("threads", threads, minimum=0)
    one_of("numbering", numbering, NUMBERINGS)
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    positive_int("workers", workers)
    check_hwaccel(hwaccel)
    name = _name_of(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        # missing: FileNotFoundError; a link loop, FIFO or device: ValueError (av.open would
        # block on a FIFO and read a device forever)
        check_path(path, "video")
        if os.path.isdir(path):
            paths = frame_files(path)
            if not paths:
                raise VideoDecodeError(f"{path}: folder holds no image frames "
                                       f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
            return _read_images(paths, name, num_frames, start, end, fps, rotate)
        if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
            if require_video:
                raise VideoDecodeError(f"{path}: is an image, a video is required")
            return _read_images([path], name, 1, None, None, None, rotate)
    elif isinstance(source, (bytes, bytearray, memoryview)) or hasattr(source, "read"):
        if isinstance(source, io.TextIOBase) or "b" not in getattr(source, "mode", "b"):
            raise TypeError(f"read_video: {name} is a text-mode file; open it in binary mode "
                            "(open(path, 'rb'))")
        if hasattr(source, "read") and not (hasattr(source, "seekable") and source.seekable()):
            source = source.read()  # a pipe or socket: demuxing and seeking need random access
        fp = source if hasattr(source, "read") else io.BytesIO(source)
        if _is_still_image(fp):
            if require_video:
                raise VideoDecodeError(f"{name}: is an image, a video is required")
            rgb = _load_image(fp, name, rotate)
            return DecodedVideo(source=name, indices=[0], fps=None, num_frames_total=1,
                                pixel_format="rgb24", rgb=torch.from_numpy(rgb[None]),
                                color_matrix="bt601", color_range="full")
    else:
        raise TypeError(f"read_video: source must be a path, bytes or a binary file object, "
                        f"got {type(source).__name__}")
    return _read_stream(_Opener(source, name, hwaccel), num_frames, start, end, rotate, keep_yuv,
                        threads, stats, numbering, workers, skip_nonref)


def read_videos(sources, num_frames: int = 16, *, prefetch: int = 2, **kwargs):
    """Yield ``read_video(s, num_frames, **kwargs)`` for each source, in order, decoding up to
    ``prefetch`` videos ahead on background threads (FFmpeg releases the GIL while decoding, so
    decoding overlaps whatever the caller does with the previous video). An error is raised when
    its video is reached."""
    if prefetch < 0:
        raise ValueError(f"prefetch must be >= 0, got {prefetch}")
    if prefetch == 0:
        for s in sources:
            yield read_video(s, num_frames, **kwargs)
        return
    pending = collections.deque()
    it = iter(sources)
    with concurrent.futures.ThreadPoolExecutor(max_workers=prefetch,
                                               thread_name_prefix="pllava-decode") as pool:
        try:
            for s in itertools.islice(it, prefetch):
                pending.append(pool.submit(read_video, s, num_frames, **kwargs))
            while pending:
                video = pending.popleft().result()
                for s in itertools.islice(it, 1):
                    pending.append(pool.submit(read_video, s, num_frames, **kwargs))
                yield video
        finally:
            for f in pending:
                f.cancel()
