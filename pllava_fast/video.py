"""Frame sampling and video decoding: PLLaVA's frame-index rules and a PyAV reader that decodes
only the sampled frames and hands back raw YUV planes (colour conversion happens in the batched
preprocessing op, not here).

Conventions of ``read_video``:

* Frame index ``i`` is the i-th frame of PyAV's full sequential decode of the first video stream,
  i.e. the frame with the i-th smallest pts (decoders output in presentation order; frames the
  decoder drops, such as an edit list's pre-roll, are not counted). For variable frame rate,
  indices count frames, not time; ``fps`` is the stream's average rate, used only for the
  time-bound rule, as PLLaVA does with decord's average fps.
* Frame count: one demux pass reads every packet of the stream (no decoding; about 70 ms for
  60 s of 720p h264 here) and counts them, so a missing or wrong container count does not
  matter. Where packets carry no usable pts (AVI with B-frames, raw streams) or the decoder's
  output disagrees with the packet table, frames are counted by decoding the whole stream
  (one full decode; a second, shorter one if the packet count was off).
* Seeking: the same pass gives each frame's decode position and keyframe. A greedy plan starts
  a new run at a target's keyframe only when that decodes fewer frames (plus a small per-seek
  cost) than decoding on; long GOPs therefore become one forward pass. Each run ends by
  draining the decoder, so no packet past the last target is decoded. Every output frame is
  checked against the table; a mismatch falls back to counting.
* Pixels: 8-bit 4:2:0 (yuv420p, yuvj420p, nv12) tagged BT.601/BT.709 or untagged stay Y/U/V
  planes (untagged = BT.601 limited range, yuvj = full range, as FFmpeg assumes). Any other
  format (4:4:4, 4:2:2, 10-bit, gray, palette/GIF, other matrices) becomes rgb24 through
  swscale with the stream's matrix and range. Images are read with PIL as rgb24.
* Rotation: the display matrix (``VideoFrame.rotation``) in quarter turns, applied to the planes
  as FFmpeg's autorotate would (flips in the matrix are ignored); EXIF orientation for images.
"""
from __future__ import annotations

import bisect
import collections
import concurrent.futures
import dataclasses
import io
import itertools
import math
import os
import re

import av
import numpy as np
import torch

__all__ = ["DecodedVideo", "VideoDecodeError", "sample_indices", "read_video", "read_videos",
           "frame_files", "frame_to_rgb", "frame_to_yuv420"]


class VideoDecodeError(ValueError):
    """A source could not be decoded as requested (not media, corrupt, no video frames, ...)."""


@dataclasses.dataclass
class DecodedVideo:
    """Sampled frames of one video.

    Exactly one representation is set: ``rgb`` for ``pixel_format == "rgb24"``, or the planes
    ``y``/``u``/``v`` for ``pixel_format == "yuv420p"`` (``color_matrix``/``color_range`` then say
    how to turn them into RGB; for rgb24 they describe the source and are informational).

    Shapes (T = sampled frames, all uint8 CPU tensors, contiguous):
      rgb: (T, H, W, 3);  y: (T, H, W);  u, v: (T, (H + 1) // 2, (W + 1) // 2)
    ``indices[t]`` is the position of frame t in the stream's presentation order (0-based),
    ``num_frames_total`` the number of frames of the stream, ``fps`` its average rate (None for
    a single image).
    """

    source: str
    indices: list[int]
    fps: float | None
    num_frames_total: int
    pixel_format: str  # "rgb24" | "yuv420p"
    rgb: torch.Tensor | None = None
    y: torch.Tensor | None = None
    u: torch.Tensor | None = None
    v: torch.Tensor | None = None
    color_matrix: str = "bt601"  # "bt601" | "bt709"
    color_range: str = "limited"  # "limited" | "full"

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def height(self) -> int:
        return int((self.rgb if self.rgb is not None else self.y).shape[1])

    @property
    def width(self) -> int:
        return int((self.rgb if self.rgb is not None else self.y).shape[2])


def sample_indices(num_frames_total: int, num_segments: int, *, fps: float | None = None,
                   start: float | None = None, end: float | None = None) -> list[int]:
    """PLLaVA's frame indices: the midpoints of ``num_segments`` equal segments.

    Without time bounds (the chat/demo rule): ``seg = (n - 1) / k`` and frame
    ``i -> int(seg / 2) + int(round(seg * i))``.
    With ``start``/``end`` in seconds (the evaluation rule, needs ``fps``):
    ``s = max(0, round(start * fps))``, ``e = min(round(end * fps), n - 1)``,
    ``seg = (e - s) / k`` and ``i -> int(s + seg / 2 + round(seg * i))``. A missing bound means
    the clip's start or end. Every ``round`` rounds half to even (numpy's and Python's).
    Without bounds both rules give the same indices, so ``fps`` alone changes nothing.

    Returns ``num_segments`` non-decreasing indices in ``[0, n - 1]`` (repeats when k > n).
    """
    n, k = num_frames_total, num_segments
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"num_frames_total must be an int >= 1, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"num_segments must be an int >= 1, got {k!r}")
    n, k = int(n), int(k)
    if start is None and end is None:
        seg = float(n - 1) / k
        first = int(seg / 2)
        return [first + int(np.round(seg * i)) for i in range(k)]

    try:
        rate = float(fps)
    except (TypeError, ValueError):
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"time bounds need a positive finite fps, got fps={fps!r}")
    fps = rate
    for name, t in (("start", start), ("end", end)):
        if t is not None and not (math.isfinite(t) and t >= 0):
            raise ValueError(f"{name} must be a finite time >= 0 seconds, got {t!r}")
    if start is not None and end is not None and end < start:
        raise ValueError(f"end ({end} s) is before start ({start} s)")
    duration = n / fps
    s = 0 if start is None else max(0, int(np.round(start * fps)))
    e = n - 1 if end is None else min(int(np.round(end * fps)), n - 1)
    if s > n - 1:
        raise ValueError(f"start={start} s is outside the clip ({n} frames, {duration:.3f} s at "
                         f"{fps:g} fps)")
    if e < s:
        raise ValueError(f"the interval [{start}, {end}] s holds no frame of the clip ({n} "
                         f"frames at {fps:g} fps)")
    seg = float(e - s) / k
    return [int(s + seg / 2 + np.round(seg * i)) for i in range(k)]



# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})

# Codecs whose keyframes are true random-access points: seeking to one and decoding forward gives
# the pixels of a decode from the start. Anything else (GIF, APNG: frames paint over the previous
# canvas) is decoded in one forward pass.
_SEEKABLE_CODECS = frozenset({
    "h264", "hevc", "vp8", "vp9", "av1", "libdav1d", "libaom-av1", "mpeg4", "mpeg2video",
    "mpeg1video", "mjpeg", "prores", "h263", "theora", "vc1", "wmv3", "dnxhd", "ffv1",
})

# A seek flushes the decoder and refills its frame-thread pipeline; counted as this many extra
# frame decodes when choosing between seeking and decoding on.
SEEK_COST_FRAMES = 4

# AVColorSpace values swscale treats as BT.601 (unspecified, BT470BG, SMPTE170M) and BT.709.
# 8-bit 4:2:0 streams tagged with any other matrix (BT.2020, FCC, ...) go to rgb24 via swscale.
_BT601_SPACES = frozenset({2, 5, 6})
_BT709_SPACES = frozenset({1})
_YUV420_FORMATS = frozenset({"yuv420p", "yuvj420p", "nv12"})
_JPEG_RANGE = 2  # AVCOL_RANGE_JPEG


class _Mismatch(Exception):
    """The demuxer's frame table and the decoder's output disagree."""


class _LandedLate(Exception):
    """A seek landed after the keyframe it aimed at."""


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


def _quarter_turns(rotation) -> int:
    """Counterclockwise quarter turns that display a frame whose display matrix rotates by
    ``rotation`` degrees counterclockwise (PyAV's ``VideoFrame.rotation``; FFmpeg's autorotate
    applies the same turn). Rotations that are not multiples of 90 degrees round to the nearest."""
    return int(round((rotation or 0) / 90.0)) % 4


def _plane_array(plane) -> np.ndarray:
    """One frame plane as an (h, w) uint8 copy, without the line padding."""
    arr = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
    return arr[:, :plane.width].copy()


def _yuv_tags(frame) -> tuple[str, str] | None:
    """(color_matrix, color_range) when the frame can stay 8-bit YUV 4:2:0, else None."""
    fmt = frame.format.name
    if fmt not in _YUV420_FORMATS:
        return None
    space = int(frame.colorspace)
    if space in _BT601_SPACES:
        matrix = "bt601"
    elif space in _BT709_SPACES:
        matrix = "bt709"
    else:
        return None
    full = fmt == "yuvj420p" or int(frame.color_range) == _JPEG_RANGE
    return matrix, ("full" if full else "limited")


def frame_to_rgb(frame) -> np.ndarray:
    """swscale's rgb24 (H, W, 3) of a decoded frame, honouring its matrix and range tags
    (untagged YUV is BT.601 limited range, yuvj* full range, as FFmpeg assumes)."""
    rng = int(frame.color_range)
    return frame.to_ndarray(format="rgb24", src_color_range=rng if rng else None)


def frame_to_yuv420(frame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Y (H, W), U and V ((H+1)//2, (W+1)//2) of an 8-bit 4:2:0 frame; nv12 is deinterleaved by
    swscale's unscaled copy (lossless)."""
    if frame.format.name == "nv12":
        frame = frame.reformat(format="yuv420p")
    y, u, v = (_plane_array(p) for p in frame.planes[:3])
    return y, u, v


class _Opener:
    """Opens (and re-opens) a PyAV container on a path, bytes or a seekable binary file."""

    def __init__(self, source, name: str):
        self.name = name
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
        try:
            return av.open(target, "r", metadata_errors="ignore")
        except av.error.FileNotFoundError as e:
            raise FileNotFoundError(f"{self.name}: no such file") from e
        except (av.error.FFmpegError, UnicodeDecodeError, EOFError) as e:
            raise VideoDecodeError(f"{self.name}: not a readable media file ({e})") from e


def _video_stream(container, name: str):
    if not container.streams.video:
        raise VideoDecodeError(f"{name}: no video stream (audio-only or not a video)")
    return container.streams.video[0]


@dataclasses.dataclass
class _Table:
    """One demux pass over the video stream (reads packets, decodes nothing).

    pts[i], key[i], discard[i]: pts and flags of the i-th packet in decode order; the decoder
    drops the frames of discard packets (pre-roll before an edit list's start).
    """

    pts: list
    key: list
    discard: list
    codec: str
    fps: float | None

    @property
    def seekable(self) -> bool:
        """Every packet has a distinct pts and decoding starts on a keyframe, so presentation
        index <-> pts is known without decoding and frames can be found after a seek."""
        return (bool(self.pts) and self.key[0] and None not in self.pts
                and len(set(self.pts)) == len(self.pts))

    @property
    def frame_pts(self) -> list:
        """pts of the output frames in presentation order."""
        return sorted(p for p, d in zip(self.pts, self.discard) if not d)


def _scan(opener: _Opener):
    """Demux the whole video stream once; returns (table, the open container at its end)."""
    container = opener.open()
    try:
        stream = _video_stream(container, opener.name)
        pts, key, discard = [], [], []
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                pts.append(packet.pts)
                key.append(bool(packet.is_keyframe))
                discard.append(bool(packet.is_discard))
        except (av.error.FFmpegError, EOFError) as e:
            raise VideoDecodeError(f"{opener.name}: corrupt or truncated video ({e})") from e
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        listed = stream.frames
        codec = stream.codec_context.name
        mov = "mp4" in container.format.name
    except BaseException:
        container.close()
        raise
    if all(discard):
        container.close()
        raise VideoDecodeError(f"{opener.name}: the video stream has no frames")
    if mov and listed and len(pts) < listed:
        # mp4/mov list every sample; fewer packets than listed means the data was cut short
        container.close()
        raise VideoDecodeError(f"{opener.name}: truncated video: the container lists {listed} "
                               f"frames, only {len(pts)} could be read")
    table = _Table(pts=pts, key=key, discard=discard, codec=codec,
                   fps=float(rate) if rate else None)
    return table, container


class _Reader:
    """Decodes one video stream, keeping the frames at wanted presentation indices."""

    def __init__(self, opener: _Opener, threads: int, keep_yuv: bool, container=None):
        self.opener, self.threads, self.keep_yuv = opener, threads, keep_yuv
        self.container = container  # the scan's container: rewound instead of re-opened
        self.kept: dict[int, tuple] = {}
        self.tags = None  # (matrix, range) of kept YUV frames; None: kept as rgb24
        self.size = None
        self.rotation = 0
        self.seeks = 0
        self.decoded = 0

    def close(self):
        if self.container is not None:
            self.container.close()
            self.container = None

    # -- positioning -------------------------------------------------------------------------
    def _go(self, seek_pts=None, aim=None):
        """Position the demuxer: a seek on the open container (to ``seek_pts``, landing at
        decode position ``aim`` or before), else a freshly opened container at the start
        (opening is not free: FFmpeg's stream probing decodes frames)."""
        if seek_pts is not None and self.container is not None:
            self.container.seek(seek_pts, stream=self.container.streams.video[0], backward=True,
                                any_frame=False)
        else:
            self.close()
            self.container = self.opener.open()
            aim = None
        self.stream = _video_stream(self.container, self.opener.name)
        cc = self.stream.codec_context
        if cc.is_open:
            cc.flush_buffers()
        else:
            cc.thread_type = "AUTO"  # frame + slice threads
            cc.thread_count = self.threads
        self.packets = self.container.demux(self.stream)
        self.aim = aim

    def _frames(self, pos_of=None, last=None):
        """Decode packets up to decode position ``last`` (all when None), then drain the
        decoder: the frames still in flight come out without feeding further packets.
        Yields (frame, drained)."""
        cc = self.stream.codec_context
        try:
            for packet in self.packets:
                if packet.size == 0:
                    continue
                pos = None
                if pos_of is not None:
                    pos = pos_of.get(packet.pts)
                    if pos is None:
                        raise _Mismatch(f"packet pts {packet.pts} not in the table")
                    if self.aim is not None and pos > self.aim:
                        raise _LandedLate
                self.aim = None
                self.decoded += 1
                for frame in cc.decode(packet):
                    yield frame, False
                if last is not None and pos >= last:
                    break
            for frame in cc.decode(None):
                yield frame, True
        except (av.error.FFmpegError, EOFError) as e:
            raise VideoDecodeError(f"{self.opener.name}: corrupt or truncated video ({e})") from e

    def _keep(self, index, frame):
        if not self.kept:
            self.rotation = frame.rotation
            self.tags = _yuv_tags(frame) if self.keep_yuv else None
            self.size = (frame.width, frame.height)
        if (frame.width, frame.height) != self.size:
            # a mid-stream resolution change: scale to the first kept size, as ffmpeg does
            frame = frame.reformat(width=self.size[0], height=self.size[1])
        if self.tags is None:
            self.kept[index] = (frame_to_rgb(frame),)
        elif _yuv_tags(frame) == self.tags:
            self.kept[index] = frame_to_yuv420(frame)
        else:
            raise VideoDecodeError(f"{self.opener.name}: pixel format or colour tags change "
                                   f"mid-stream (frame {index})")

    # -- strategies --------------------------------------------------------------------------
    @staticmethod
    def plan(table: _Table, targets: list[int], seek: bool) -> list[tuple[int | None, int, list]]:
        """Greedy decode plan: runs of (keyframe position to seek to or None to go on from the
        start, last decode position to feed, targets). A new run (a seek) starts only when
        decoding from the target's keyframe costs fewer frames than decoding on."""
        pos_of = {p: i for i, p in enumerate(table.pts)}
        frame_pts = table.frame_pts
        keys = [i for i, k in enumerate(table.key) if k]
        runs, cur = [], -1
        for target in targets:
            p = frame_pts[target]
            q = pos_of[p]
            # last keyframe at or before the target in decode order and in presentation order
            j = bisect.bisect_right(keys, q) - 1
            while j > 0 and table.pts[keys[j]] > p:  # open GOP: a leading picture
                j -= 1
            k = keys[j]
            if runs and not (seek and k > cur and (q - k + 1) + SEEK_COST_FRAMES < q - cur):
                runs[-1][1] = max(runs[-1][1], q)
                runs[-1][2].append(target)
            else:
                start = k if (seek and k > 0 and q - k + 1 + SEEK_COST_FRAMES < q + 1) else None
                runs.append([start, q, [target]])
            cur = max(cur, q)
        return runs

    def by_table(self, table: _Table, wanted: list[int], seek: bool):
        """Frames at the wanted presentation indices following ``plan``; every output frame is
        checked against the table (consecutive presentation order while feeding)."""
        pos_of = {p: i for i, p in enumerate(table.pts)}
        frame_pts = table.frame_pts
        rank = {p: r for r, p in enumerate(frame_pts)}
        wanted = set(wanted)
        for key, last, targets in self.plan(table, sorted(wanted), seek):
            if key is None:  # from the start: rewind the scan's container
                self._go(table.pts[0], aim=0)
                floor, expect = None, 0
            else:
                self._go(table.pts[key], aim=key)
                self.seeks += 1
                floor = table.pts[key]  # earlier frames come from before the keyframe
                expect = bisect.bisect_left(frame_pts, floor)
            while True:
                try:
                    for frame, drained in self._frames(pos_of, last):
                        if frame.pts is None:
                            raise _Mismatch("frame without pts")
                        if floor is not None and frame.pts < floor:
                            continue
                        r = rank.get(frame.pts)
                        # draining skips frames whose packets were not fed
                        if r is None or r < expect or (r > expect and not drained):
                            raise _Mismatch(f"decoder gave pts {frame.pts}, table expects "
                                            f"frame {expect}")
                        expect = r + 1
                        if r in wanted and r not in self.kept:
                            self._keep(r, frame)
                    break
                except _LandedLate:  # the demuxer could not seek there: go from the start
                    self._go()
                    floor, expect = None, 0
            missing = [t for t in targets if t not in self.kept]
            if missing:
                raise _Mismatch(f"frames {missing} not found")

    def by_count(self, wanted: set[int], stop: int | None):
        """One pass from a fresh start keeping frames by output position; returns the number of
        frames seen (all of them when ``stop`` is None, else up to index ``stop``)."""
        self._go()
        count = 0
        for frame, _ in self._frames():
            if count in wanted:
                self._keep(count, frame)
            count += 1
            if stop is not None and count > stop:
                break
        return count


def _assemble(name, reader: _Reader, indices, fps, total, rotate: bool) -> DecodedVideo:
    turns = _quarter_turns(reader.rotation) if rotate else 0

    def stack(channel):
        t = torch.from_numpy(np.stack([reader.kept[i][channel] for i in indices]))
        return torch.rot90(t, turns, dims=(1, 2)).contiguous() if turns else t

    if reader.tags is None:
        return DecodedVideo(source=name, indices=list(indices), fps=fps, num_frames_total=total,
                            pixel_format="rgb24", rgb=stack(0), color_matrix="bt601",
                            color_range="full")
    matrix, rng = reader.tags
    return DecodedVideo(source=name, indices=list(indices), fps=fps, num_frames_total=total,
                        pixel_format="yuv420p", y=stack(0), u=stack(1), v=stack(2),
                        color_matrix=matrix, color_range=rng)


def _read_stream(opener: _Opener, num_frames, start, end, rotate, keep_yuv, threads, stats):
    table, container = _scan(opener)
    reader = _Reader(opener, threads, keep_yuv, container)
    try:
        if table.seekable:
            n = len(table.frame_pts)
            indices = sample_indices(n, num_frames, fps=table.fps, start=start, end=end)
            try:
                reader.by_table(table, indices, seek=table.codec in _SEEKABLE_CODECS)
                mode = "seek" if table.codec in _SEEKABLE_CODECS else "forward"
            except _Mismatch:
                reader.kept.clear()
                table = dataclasses.replace(table, pts=[None])  # count by decoding below
        if not table.seekable:
            # No usable pts table: count frames by decoding. One full pass, or two when the
            # packet count was not the frame count.
            n = len(table.key) - sum(table.discard)
            indices = sample_indices(n, num_frames, fps=table.fps, start=start, end=end)
            n = reader.by_count(set(indices), stop=None)
            if n == 0:
                raise VideoDecodeError(f"{opener.name}: no frame could be decoded")
            again = sample_indices(n, num_frames, fps=table.fps, start=start, end=end)
            if not set(again) <= set(reader.kept):
                reader.kept.clear()
                reader.by_count(set(again), stop=max(again))
            indices = again
            mode = "count"
        if stats is not None:
            stats.update(mode=mode, seeks=reader.seeks, packets_decoded=reader.decoded)
        return _assemble(opener.name, reader, indices, table.fps, n, rotate)
    finally:
        reader.close()


def _read_images(paths, name, num_frames, start, end, fps, rotate) -> DecodedVideo:
    indices = sample_indices(len(paths), num_frames, fps=fps, start=start, end=end)
    cache = {i: _load_image(paths[i], paths[i], rotate) for i in sorted(set(indices))}
    sizes = {a.shape for a in cache.values()}
    if len(sizes) > 1:
        raise VideoDecodeError(f"{name}: frames have different sizes {sorted(sizes)}")
    rgb = torch.from_numpy(np.stack([cache[i] for i in indices]))
    return DecodedVideo(source=name, indices=indices, fps=fps, num_frames_total=len(paths),
                        pixel_format="rgb24", rgb=rgb, color_matrix="bt601", color_range="full")


def read_video(source, num_frames: int = 16, *, start: float | None = None,
               end: float | None = None, rotate: bool = True, keep_yuv: bool = True,
               threads: int = 0, fps: float | None = None, require_video: bool = False,
               stats: dict | None = None) -> DecodedVideo:
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
    threads: FFmpeg decoder threads (0: one per core).
    require_video: reject single images.
    stats: when a dict, receives how the frames were found (mode, seeks, packets_decoded).

    Frame ``i`` is the i-th frame a full sequential decode outputs (presentation order, so the
    frame with the i-th smallest pts); for variable-frame-rate streams indices are frame counts,
    not times. Raises FileNotFoundError for a missing path, VideoDecodeError (a ValueError) naming
    the source for anything that is not a decodable video.
    """
    name = _name_of(source)
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such file or directory")
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
    return _read_stream(_Opener(source, name), num_frames, start, end, rotate, keep_yuv,
                        threads, stats)


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
