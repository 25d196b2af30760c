"""One demux pass over a video stream: the frame table (pts, keyframes, discard flags) that
numbers the frames and plans the seeks, read without decoding."""
from __future__ import annotations

import dataclasses
import functools

import av

from .frames import VideoDecodeError
from .sources import _Opener, _video_stream


@dataclasses.dataclass
class _Table:
    """One demux pass over the video stream (reads packets, decodes nothing).

    pts[i], dts[i], key[i], discard[i]: timestamps and flags of the i-th packet in decode order;
    the decoder drops the frames of discard packets (pre-roll before an edit list's start).
    ``fmt``: the container format's name, ``codec`` the decoder's.
    """

    pts: list
    key: list
    discard: list
    codec: str
    fps: float | None
    dts: list = dataclasses.field(default_factory=list)
    fmt: str = ""

    @property
    def seekable(self) -> bool:
        """Every packet has a distinct pts and decoding starts on a keyframe, so presentation
        index <-> pts is known without decoding and frames can be found after a seek."""
        return (bool(self.pts) and self.key[0] and None not in self.pts
                and len(set(self.pts)) == len(self.pts))

    @functools.cached_property
    def frame_pts(self) -> list:
        """pts of the output frames in presentation order (sorted once: the plan, the workers
        and the numbering all read it; ``dataclasses.replace`` makes a table without it)."""
        return sorted(p for p, d in zip(self.pts, self.discard) if not d)


def _scan(opener: _Opener):
    """Demux the whole video stream once; returns (table, the open container at its end)."""
    container = opener.open()
    try:
        stream = _video_stream(container, opener.name)
        pts, dts, key, discard = [], [], [], []
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                pts.append(packet.pts)
                dts.append(packet.dts)
                key.append(bool(packet.is_keyframe))
                discard.append(bool(packet.is_discard))
        except (av.error.FFmpegError, EOFError) as e:
            raise VideoDecodeError(f"{opener.name}: corrupt or truncated video ({e})") from e
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        listed = stream.frames
        codec = stream.codec_context.name
        fmt = container.format.name
        mov = "mp4" in fmt
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
                   fps=float(rate) if rate else None, dts=dts, fmt=fmt)
    return table, container
