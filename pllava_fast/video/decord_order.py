"""decord 0.6.0's frame numbering, computed from one demux pass (no decoding).

The original PLLaVA reads ``decord.VideoReader(path)``, samples ``get_index(len(vr), 16)`` and
calls ``vr.get_batch(indices)``. decord's answers are not PyAV's i-th frames in general:

* ``len(vr)`` counts every packet of the stream (pre-roll / discard packets too), and its table
  is the packet list sorted by pts, while its keyframe positions are decode-order positions;
* a picture comes from counting the decoder's outputs, re-synchronised when ``get_batch`` moves
  to another GOP (or backwards): it seeks to the keyframe, decodes one frame, looks its pts up in
  the sorted table and counts on from there; past the last output it returns the previous
  picture again (cooking.mp4: 160 packets, 159 frames, index 159 = the picture of index 158).

``DecordOrder(table).get_batch(indices)`` replays decord's state machine (``SeekAccurate``,
``CheckKeyFrame``, ``SkipFramesImpl``, ``NextFrameImpl`` with its cached picture and rewinds,
read from dmlc/decord v0.6.0 ``src/video/video_reader.cc``) over a model of its bundled FFmpeg
4.1, fitted to measurements: packet pts (4.1 leaves AVI's h264 packets and the reference packets
of B-frame AVIs without pts), where a seek lands (mov / mp4: the dts timeline from the first
shown packet; AVI: frame numbers; others: pts) and which frames the decoder outputs after a seek
(the packets from the landing one on, minus discarded ones and minus those shown before it).
It returns, for every index, the pts of the picture decord shows; the reader then decodes exactly
those frames. Checked against decord itself on the test clips (pre-roll, edit lists, B-frames, open
GOP, VFR, odd sizes, rotation, mkv / webm / AVI, 1-15 frame clips, the shared videos).
"""
from __future__ import annotations

import bisect
import collections

NOPTS = -(2 ** 63)  # AV_NOPTS_VALUE: sorts first, as in decord's std::sort
_EOF = None  # the decoder thread's end-of-stream result


class Unsupported(ValueError):
    """Packets without pts in PyAV's demux (raw streams): decord's behaviour is not modelled."""


def ffmpeg41_pts(pts, dts, fmt: str, codec: str) -> list:
    """Packet pts as decord's FFmpeg 4.1 demuxes them: FFmpeg 8's, except in AVI, where 4.1
    gives h264 / hevc packets none and, in streams with B-frames, gives none to the reference
    packets (pts != dts) and pts = dts to the B-frames (measured)."""
    if "avi" not in fmt:
        return list(pts)
    if codec in ("h264", "hevc"):
        return [NOPTS] * len(pts)
    if any(p != d for p, d in zip(pts, dts)):
        return [d if p == d else NOPTS for p, d in zip(pts, dts)]
    return list(pts)


class DecordOrder:
    """decord's ``VideoReader`` over the packets of one video stream (decode order).

    ``pts``, ``dts``, ``key``, ``discard``: per packet as PyAV demuxes them; ``fmt`` the container
    format name and ``codec`` the codec name (they choose the FFmpeg 4.1 model). ``len()`` is
    decord's ``len(vr)``; ``get_batch(indices)`` the pts of the picture decord returns for each.
    """

    def __init__(self, pts, dts, key, discard, fmt: str, codec: str = ""):
        if any(p is None for p in pts):
            raise Unsupported("packets without pts: decord's numbering is not modelled")
        n = self.n = len(pts)
        self.pts, self.discard = list(pts), list(discard)
        self.avi = "avi" in fmt
        self.mov = not self.avi and any(x in fmt for x in ("mov", "mp4"))
        # IndexKeyframes: every packet, sorted by (4.1's) pts; keyframes by decode position
        self.table = sorted(ffmpeg41_pts(pts, dts, fmt, codec))
        self.keys = [j for j in range(n) if key[j]]
        self.position = {}
        for i, p in enumerate(self.table):
            self.position.setdefault(p, i)
        if self.mov:  # 4.1's mov index: the dts timeline, 0 at the first shown packet
            first = next((j for j in range(n) if not discard[j]), 0)
            self.index_ts = [d - dts[first] for d in dts]
        elif self.avi:  # AVI's index: frame numbers (the dts in the 1/fps time base)
            self.index_ts = list(dts)
        else:  # matroska / webm cues and most others index keyframes by pts
            self.index_ts = list(pts)
        self.dts = list(dts)
        # the constructor: curr_frame_ = N, then Seek(0)
        self.curr, self.queue, self.cached = n, collections.deque(), None
        self.landed = None  # packet of the last seek; its outputs are queued at the first pop
        self.overrun, self.key_picture, self.flushed = False, None, False
        self._seek(0)

    def __len__(self) -> int:
        return self.n

    # -- FFmpeg 4.1 ---------------------------------------------------------------------------
    def _land(self, ts, backward: bool):
        """Decode position of the keyframe a seek to ``ts`` lands on, or None when it fails."""
        if ts == NOPTS:  # forward lands on the first keyframe, backward fails
            return None if backward else (self.keys[0] if self.keys else 0)
        if not backward:
            return next((j for j in self.keys if self.index_ts[j] >= ts), None)
        below = [j for j in self.keys if self.index_ts[j] <= ts]
        if below:
            return below[-1]
        return 0 if self.mov else None

    def _outputs_from(self, start: int) -> list:
        """Decoder outputs (pts, presentation order) after a flush and a seek to packet
        ``start``: no discarded packet, and nothing shown before the landing packet."""
        first = self.pts[start]
        return sorted(self.pts[j] for j in range(start, self.n)
                      if not self.discard[j] and self.pts[j] >= first)

    # -- decord's VideoReader -----------------------------------------------------------------
    def _seek(self, pos: int) -> None:
        if self.curr == pos:
            return
        self.cached, self.flushed = None, True
        ts = self.table[pos]
        backward = self.curr > pos
        land = self._land(ts, backward)
        if land is None and not backward:
            land = self._land(ts, True)
        if land is None:  # the last try: the keyframe at or before frame number pos
            below = [j for j in self.keys if self.dts[j] <= pos] if self.avi else []
            land = below[-1] if below else (self.keys[0] if self.keys else 0)
        self.landed = land  # a seek followed by another seek never reads its outputs
        self.curr = pos

    def _pop(self):
        self.flushed = False
        if self.landed is not None:
            self.queue, self.landed = collections.deque(self._outputs_from(self.landed)), None
        return self.queue.popleft() if self.queue else _EOF

    def _key_before(self, pos: int) -> int:
        if not self.keys or pos <= self.keys[0]:
            return 0
        if pos >= self.n:
            return self.keys[-1]
        return self.keys[bisect.bisect_right(self.keys, pos) - 1]

    def _skip(self, num: int) -> None:
        for _ in range(max(0, min(self.n - self.curr, num))):
            self._pop()
            self.curr += 1

    def _check_key(self) -> bool:
        frame = self._pop()
        if frame is _EOF:
            self.curr = self.n
            return False
        found = self.position.get(frame, self.curr)
        if self.curr != found:
            self.curr = found + 1
            return False
        self.curr += 1
        self.key_picture = frame
        return True

    def _seek_accurate(self, pos: int) -> None:
        if self.curr == pos:
            return
        key_pos, curr_key = self._key_before(pos), self._key_before(self.curr)
        self.overrun = False
        if key_pos == curr_key and pos >= self.curr:
            self._skip(pos - self.curr)
            return
        self._seek(0)
        self._seek(key_pos)
        if self._check_key():
            if pos > key_pos:
                self._skip(pos - self.curr)
            elif pos == key_pos:
                self.overrun = True
        elif self.curr < pos:
            self._skip(pos - self.curr)
        else:
            key_pos = self._key_before(pos)
            self._seek(key_pos)
            self._skip(pos - key_pos)

    def _next_frame(self):
        if self.overrun:
            self.overrun = False
            return self.key_picture
        rewind, frame = 0, object()
        while True:
            if self.curr >= self.n:
                raise IndexError(f"decord reads past the end (frame {self.curr} of {self.n})")
            # a freshly flushed decoder has nothing yet: decord reads the stale end-of-stream
            # result again (measured)
            if not (frame is _EOF and self.flushed):
                frame = self._pop()
            if frame is not _EOF:
                break
            if self.cached is not None:
                frame = self.cached
                break
            if rewind > 16:  # DECORD_REWIND_RETRY_MAX
                raise IndexError(f"decord cannot read frame {self.curr}")
            self._seek_accurate(self.curr - rewind)
            rewind += 1
        self.curr += 1
        self.cached = frame
        return frame

    def get_batch(self, indices) -> list:
        """decord's ``get_batch``: per index the pts of the picture it returns (repeats copied)."""
        out, first = [], {}
        for i, pos in enumerate(indices):
            if pos in first:
                out.append(out[first[pos]])
                continue
            if not 0 <= pos < self.n:
                raise IndexError(f"frame {pos} outside decord's {self.n} frames")
            first[pos] = i
            if self.curr != pos:
                self._seek_accurate(pos)
            out.append(self._next_frame())
        return out
