"""Decode benchmark (a): PLLaVA's 16 sampled frames of a 60 s 720p h264 clip.

Baseline: decode every frame and keep the sampled ones (what decord- and vLLM-style readers do),
with the same FFmpeg threading. Ours: ``pllava_fast.video.read_video`` (one demux pass, then
keyframe seeks only where they decode fewer frames). Both return the same YUV planes.

    python -m benchmarks.bench_frames [--seconds 60] [--gops 12 60 250] [--repeats 3]

Clips are generated once with PyAV and cached under $PLLAVA_FAST_BENCH_CACHE (default
/tmp/pllava_fast_bench). Writes benchmarks/results/frames_decode-<device>.json.
"""
from __future__ import annotations

import argparse
import os
import pathlib

import av
import numpy as np

from pllava_fast.video import frame_to_yuv420, read_video, sample_indices

from .harness import compare, write_results

CACHE = pathlib.Path(os.environ.get("PLLAVA_FAST_BENCH_CACHE", "/tmp/pllava_fast_bench"))


def bench_clip(gop: int, seconds: float = 60, size=(1280, 720), fps: int = 30) -> str:
    """A textured, moving h264 clip (x264 veryfast, B-frames, fixed keyframe interval)."""
    w, h = size
    path = CACHE / f"h264_{w}x{h}_{seconds:g}s_{fps}fps_gop{gop}.mp4"
    if path.exists():
        return str(path)
    CACHE.mkdir(parents=True, exist_ok=True)
    # smooth random texture (upsampled coarse noise, like natural images), panning, with a
    # moving bright box: about 3-5 Mbit/s at crf 23, in the range of real 720p clips
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (h // 16 + 2, (w + 512) // 16 + 2, 3)).astype(np.float32)
    ys = np.linspace(0, coarse.shape[0] - 1.001, h)
    xs = np.linspace(0, coarse.shape[1] - 1.001, w + 512)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    texture = ((coarse[y0][:, x0] * (1 - fy) + coarse[y0 + 1][:, x0] * fy) * (1 - fx)
               + (coarse[y0][:, x0 + 1] * (1 - fy) + coarse[y0 + 1][:, x0 + 1] * fy) * fx)
    texture = np.clip(texture + rng.normal(0, 4, texture.shape), 0, 255).astype(np.uint8)
    tmp = path.with_suffix(".part.mp4")
    with av.open(str(tmp), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.options = {"preset": "veryfast", "crf": "23",
                                   "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        for i in range(int(seconds * fps)):
            shift = (i * 3) % 512
            img = texture[:, shift:shift + w].copy()
            bx, by = (i * 7) % (w - 160), (i * 5) % (h - 120)
            img[by:by + 120, bx:bx + 160] = (255, 200 - i % 100, i % 256)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    tmp.rename(path)
    return str(path)


def decode_every_frame(path: str, num_frames: int = 16, threads: int = 0):
    """The baseline reader: decode the whole stream, keep the sampled frames' planes."""
    with av.open(path) as c:
        s = c.streams.video[0]
        s.codec_context.thread_type = "AUTO"
        s.codec_context.thread_count = threads
        wanted = set(sample_indices(s.frames, num_frames))
        kept = {}
        for i, frame in enumerate(c.decode(s)):
            if i in wanted:
                kept[i] = frame_to_yuv420(frame)
    return kept


def run(seconds=60, gops=(12, 60, 250), num_frames=16, repeats=3, size=(1280, 720)):
    records = []
    for gop in gops:
        path = bench_clip(gop, seconds, size)
        stats = {}
        video = read_video(path, num_frames, stats=stats)
        kept = decode_every_frame(path, num_frames)
        for t, i in enumerate(video.indices):  # same pixels, or the timing means nothing
            assert np.array_equal(video.y[t].numpy(), kept[i][0]), (gop, i)
        rec = compare(f"decode_{num_frames}_of_{video.num_frames_total}_gop{gop}",
                      lambda: decode_every_frame(path, num_frames),
                      lambda: read_video(path, num_frames),
                      warmup=1, repeats=repeats, keyframe_interval=gop,
                      clip=f"{size[0]}x{size[1]} h264 {seconds:g}s",
                      frames_total=video.num_frames_total, sampled=num_frames,
                      ours_packets_decoded=stats["packets_decoded"], ours_seeks=stats["seeks"],
                      baseline_reader="PyAV decode of every frame (decord/vLLM-style)")
        print(f"gop {gop:4d}: every frame {rec['baseline_s'] * 1e3:8.1f} ms   read_video "
              f"{rec['ours_s'] * 1e3:8.1f} ms   {rec['speedup']:5.2f}x   "
              f"({stats['packets_decoded']} packets decoded, {stats['seeks']} seeks)")
        records.append(rec)
    return records


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--gops", type=int, nargs="+", default=[12, 60, 250])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    records = run(args.seconds, tuple(args.gops), args.frames, args.repeats)
    path = write_results("frames_decode", records, device="cpu", dtype="uint8",
                         threads=os.cpu_count())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
