"""Decoding only the sampled frames: a greedy plan of keyframe seeks over the frame table,
checked frame by frame, with a full-decode count as the fallback."""
from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import os

import av

from .frames import VideoDecodeError, _yuv_tags, assemble, frame_to_rgb, frame_to_yuv420
from .decord_order import DecordOrder
from .sampling import sample_indices
from .sources import _Opener, _video_stream
from .table import _scan, _Table

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


class _Mismatch(Exception):
    """The demuxer's frame table and the decoder's output disagree."""


class _LandedLate(Exception):
    """A seek landed after the keyframe it aimed at."""


class _Reader:
    """Decodes one video stream, keeping the frames at wanted presentation indices.

    ``skip_nonref``: between targets the decoder skips the non-reference frames (FFmpeg's
    ``skip_frame="NONREF"``) that no target needs; a target's own packet is always decoded.
    Nothing else depends on a non-reference frame, so the kept pixels do not change.
    """

    def __init__(self, opener: _Opener, threads: int, keep_yuv: bool, container=None,
                 skip_nonref: bool = False):
        self.opener, self.threads, self.keep_yuv = opener, threads, keep_yuv
        self.skip_nonref = skip_nonref
        self.target_pts: set = set()
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
        if seek_pts is not None:
            if self.container is None:
                self.container = self.opener.open()
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
                if self.skip_nonref:
                    cc.skip_frame = "DEFAULT" if packet.pts in self.target_pts else "NONREF"
                for frame in cc.decode(packet):
                    yield frame, False
                if last is not None and pos >= last:
                    break
            for frame in cc.decode(None):
                yield frame, True
            if self.skip_nonref:
                cc.skip_frame = "DEFAULT"
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

    def by_table(self, table: _Table, wanted, seek: bool, runs=None):
        """Frames at the wanted presentation indices following ``plan`` (or the given ``runs``
        of it); every output frame is checked against the table (consecutive presentation
        order while feeding; skipped non-reference frames leave gaps)."""
        pos_of = {p: i for i, p in enumerate(table.pts)}
        frame_pts = table.frame_pts
        rank = {p: r for r, p in enumerate(frame_pts)}
        wanted = set(wanted)
        self.target_pts = {frame_pts[r] for r in wanted}
        if runs is None:
            runs = self.plan(table, sorted(wanted), seek)
        for key, last, targets in runs:
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
                        gap_ok = drained or self.skip_nonref
                        if r is None or r < expect or (r > expect and not gap_ok):
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


# decode work (packets) below which a second worker costs more than it saves
_PARALLEL_MIN_PACKETS = 48


def _split(runs, workers: int) -> list[list]:
    """Contiguous chunks of ``runs`` with about equal packets to decode each."""
    cost = [last - (key or 0) + 1 for key, last, _ in runs]
    total, chunks, cur, acc = sum(cost), [], [], 0
    for run, c in zip(runs, cost):
        cur.append(run)
        acc += c
        if len(chunks) < workers - 1 and acc >= total * (len(chunks) + 1) / workers:
            chunks.append(cur)
            cur = []
    return chunks + ([cur] if cur else [])


def _decode_targets(reader: _Reader, table: _Table, wanted: list[int], seek: bool,
                    workers: int) -> None:
    """``reader.by_table`` for the wanted frames, the plan's runs split over ``workers``
    concurrent readers (one container and decoder each; PyAV releases the GIL while FFmpeg
    decodes) when the video can be opened again and there is enough to decode."""
    runs = reader.plan(table, sorted(set(wanted)), seek)
    cost = sum(last - (key or 0) + 1 for key, last, _ in runs)
    if (workers <= 1 or len(runs) < 2 or cost < _PARALLEL_MIN_PACKETS
            or reader.opener.file is not None):  # one file object cannot be read twice at once
        reader.by_table(table, wanted, seek, runs)
        return
    chunks = _split(runs, workers)
    threads = reader.threads
    if threads == 0:
        # auto: the cores shared among the decoders. FFmpeg's own frame threads on top of
        # concurrent decoders oversubscribe 2 cores: 1 thread each measured 10-20% faster
        # (benchmarks/bench_frames.py, "default" against "2 workers x auto")
        reader.threads = max(1, (os.cpu_count() or 1) // len(chunks))
    readers = [reader] + [_Reader(reader.opener, reader.threads, reader.keep_yuv,
                                  skip_nonref=reader.skip_nonref) for _ in chunks[1:]]
    try:
        with concurrent.futures.ThreadPoolExecutor(len(chunks), "pllava-decode-run") as pool:
            for future in [pool.submit(r.by_table, table, wanted, seek, c)
                           for r, c in zip(readers, chunks)]:
                future.result()
        for other in readers[1:]:
            if other.kept and (other.tags, other.size) != (reader.tags, reader.size):
                raise _Mismatch("frames of one video decoded in different formats")
            reader.kept.update(other.kept)
            reader.seeks += other.seeks
            reader.decoded += other.decoded
    finally:
        reader.threads = threads  # a fallback decode after a mismatch gets the caller's count
        for other in readers[1:]:
            other.close()


def _read_stream(opener: _Opener, num_frames, start, end, rotate, keep_yuv, threads, stats,
                 numbering: str = "decord", workers: int = 1, skip_nonref: bool = True):
    table, container = _scan(opener)
    reader = _Reader(opener, threads, keep_yuv, container, skip_nonref=skip_nonref)
    try:
        if table.seekable:
            frame_pts = table.frame_pts
            if numbering == "decord":  # (an unseekable table is counted by decoding below)
                order = DecordOrder(table.pts, table.dts, table.key, table.discard, table.fmt,
                                    table.codec)
                n = len(order)
                indices = sample_indices(n, num_frames, fps=table.fps, start=start, end=end)
                rank = {p: r for r, p in enumerate(frame_pts)}
                try:
                    positions = [rank[p] for p in order.get_batch(indices)]
                except IndexError as exc:  # decord itself fails on this file: say so, once
                    raise VideoDecodeError(f"{opener.name}: decord's numbering cannot read the "
                                           f"sampled frames ({exc}); use "
                                           f"numbering='presentation'") from None
            else:
                n = len(frame_pts)
                indices = sample_indices(n, num_frames, fps=table.fps, start=start, end=end)
                positions = indices
            try:
                _decode_targets(reader, table, positions, table.codec in _SEEKABLE_CODECS,
                                workers)
                mode = "seek" if table.codec in _SEEKABLE_CODECS else "forward"
            except _Mismatch:
                reader.kept.clear()
                table = dataclasses.replace(table, pts=[None])  # count by decoding below
        if not table.seekable:
            # No usable pts table: count frames by decoding (presentation numbering). One full
            # pass, or two when the packet count was not the frame count.
            numbering = "presentation"
            reader.skip_nonref = False  # every output frame is counted
            n = len(table.key) - sum(table.discard)
            indices = sample_indices(n, num_frames, fps=table.fps, start=start, end=end)
            n = reader.by_count(set(indices), stop=None)
            if n == 0:
                raise VideoDecodeError(f"{opener.name}: no frame could be decoded")
            again = sample_indices(n, num_frames, fps=table.fps, start=start, end=end)
            if not set(again) <= set(reader.kept):
                reader.kept.clear()
                reader.by_count(set(again), stop=max(again))
            indices = positions = again
            mode = "count"
        if stats is not None:
            stats.update(mode=mode, seeks=reader.seeks, packets_decoded=reader.decoded,
                         numbering=numbering)
        return assemble(opener.name, reader, indices, positions, table.fps, n, rotate, numbering)
    finally:
        reader.close()
