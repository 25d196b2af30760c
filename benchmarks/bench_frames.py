"""Video decode benchmark: PLLaVA's 16 sampled frames of 60 s h264 clips, against the original's
own decoder.

Baseline (the original PLLaVA, as it runs): ``decord.VideoReader(path)`` (built inside the
timing, once per video as PLLaVA does) + ``get_batch(get_index(len(vr), 16))``. Beside it,
labelled weaker: decoding every frame with PyAV and keeping the sampled ones (torchvision / vLLM
style; 720p only, it is slow). Ours: ``read_video`` (decord's numbering, YUV planes), with each
lever alone so its gain shows:

    plan only          one demux pass, keyframe seeks only where they decode fewer frames
    + skip nonref      FFmpeg skip_frame=NONREF on packets no target needs (B-frame streams)
    + 2 workers        the plan's keyframe ranges on two decoders at once
    default            both (read_video's defaults: with 2 decoders on 2 cores, 1 thread each)
    2 workers x auto   both, each decoder with one thread per core (the previous default)

Clips: 1280x720 and 1920x1080, 30 fps, keyframe every 12 / 60 / 250 frames, x264 ultrafast (no
B-frames) and veryfast (B-frames), textured and panning (about 3-5 Mbit/s at 720p). Every
variant's frames are checked identical to decord's pictures before timing. With --preprocess,
decode + preprocessing together (decord + PIL + CLIPImageProcessor vs read_video +
frames_to_pixel_values) at keyframe interval 60. With --batch, the batch-mode lever: four 720p
clips decoded and preprocessed one after another, against ``read_videos`` decoding ahead on
background threads (as ``VideoPipeline.video_decode`` does, and with each video's preprocessing
overlapping the next one's decode); written to frames_batch-cpu.json.

    python -m benchmarks.bench_frames [--sizes 720p 1080p] [--gops 12 60 250] [--repeats 5]
    python -m benchmarks.bench_frames --only-batch

Clips are generated once with PyAV and cached under $PLLAVA_FAST_BENCH_CACHE (default
/tmp/pllava_fast_bench). Writes benchmarks/results/frames_decode-cpu.json.
"""
from __future__ import annotations

import argparse
import os
import pathlib

import av
import numpy as np

from pllava_fast.ops.frames import yuv_to_rgb
from pllava_fast.original import clip_processor, decode_every_frame, original_decode, original_preprocess
from pllava_fast.preprocess import frames_to_pixel_values
from pllava_fast.video import read_video, read_videos

from .harness import command_line, time_interleaved, write_results

CACHE = pathlib.Path(os.environ.get("PLLAVA_FAST_BENCH_CACHE", "/tmp/pllava_fast_bench"))
SIZES = {"720p": (1280, 720), "1080p": (1920, 1080)}
PRESETS = {"no_bframes": "ultrafast", "bframes": "veryfast"}
VARIANTS = {
    "plan only": dict(workers=1, skip_nonref=False),
    "+ skip nonref": dict(workers=1, skip_nonref=True),
    "+ 2 workers": dict(workers=2, skip_nonref=False),
    "default": dict(),
    "2 workers x auto": dict(workers=2, skip_nonref=True, threads=os.cpu_count() or 1),
}


def bench_clip(gop: int, seconds: float = 60, size=(1280, 720), fps: int = 30,
               preset: str = "veryfast") -> str:
    """A textured, panning h264 clip with a moving box and a fixed keyframe interval."""
    w, h = size
    path = CACHE / f"h264_{preset}_{w}x{h}_{seconds:g}s_{fps}fps_gop{gop}.mp4"
    if path.exists():
        return str(path)
    CACHE.mkdir(parents=True, exist_ok=True)
    # smooth random texture (upsampled coarse noise, like natural images) plus grain
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
        s.codec_context.options = {"preset": preset, "crf": "23",
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


def _same_as_decord(path: str, num_frames: int) -> None:
    """Every variant's pictures equal decord's, or the timing compares different work."""
    want = np.stack([np.asarray(im) for im in original_decode(path, num_frames)])
    for name, kw in VARIANTS.items():
        v = read_video(path, num_frames, **kw)
        got = yuv_to_rgb(v.y, v.u, v.v, v.color_matrix, v.color_range == "full").numpy()
        assert np.array_equal(got, want), (path, name)


def decode_records(sizes, gops, num_frames, repeats, seconds, every_frame_sizes):
    records = []
    for size_name in sizes:
        for kind, preset in PRESETS.items():
            for gop in gops:
                path = bench_clip(gop, seconds, SIZES[size_name], preset=preset)
                _same_as_decord(path, num_frames)
                fns = {"decord get_batch (original)": lambda: original_decode(path, num_frames)}
                if size_name in every_frame_sizes:
                    fns["every frame (weaker baseline)"] = lambda: decode_every_frame(path,
                                                                                      num_frames)
                for name, kw in VARIANTS.items():
                    fns[f"read_video: {name}"] = (lambda kw: lambda: read_video(
                        path, num_frames, **kw))(kw)
                t = time_interleaved(fns, warmup=1, repeats=repeats)
                base = t["decord get_batch (original)"]["median_s"]
                plan = t["read_video: plan only"]["median_s"]
                stats = {}
                read_video(path, num_frames, stats=stats)
                rec = {"name": f"decode/{size_name}/{kind}/gop{gop}", "size": size_name,
                       "bframes": kind == "bframes", "x264_preset": preset,
                       "keyframe_interval": gop, "sampled": num_frames, "seconds": seconds,
                       "baseline": "decord 0.6.0 VideoReader + get_batch", "frames_identical": True,
                       "default_stats": stats, "times_s": t,
                       "speedup_vs_decord": {k: base / v["median_s"] for k, v in t.items()},
                       "lever_gain_vs_plan_only": {k: plan / v["median_s"] for k, v in t.items()
                                                   if k.startswith("read_video")}}
                records.append(rec)
                print(f"{rec['name']:<32} decord {base * 1e3:7.0f} ms  " + "  ".join(
                    f"{k.replace('read_video: ', '')} x{v:.2f}"
                    for k, v in rec["speedup_vs_decord"].items() if k != "decord get_batch (original)"),
                    flush=True)
    return records


def preprocess_records(sizes, num_frames, repeats, seconds, image_size=336):
    processor, records = clip_processor(image_size), []
    for size_name in sizes:
        path = bench_clip(60, seconds, SIZES[size_name], preset="veryfast")
        fns = {"decord + PIL + CLIPImageProcessor (original)": lambda: original_preprocess(
                   original_decode(path, num_frames), image_size, processor),
               "read_video + frames_to_pixel_values": lambda: frames_to_pixel_values(
                   read_video(path, num_frames), image_size=image_size)}
        t = time_interleaved(fns, warmup=1, repeats=repeats)
        base, ours = (v["median_s"] for v in t.values())
        records.append({"name": f"decode+preprocess/{size_name}/bframes/gop60", "times_s": t,
                        "baseline_s": base, "ours_s": ours, "speedup": base / ours,
                        "dtype": "float32", "image_size": image_size})
        print(f"decode+preprocess {size_name}: original {base * 1e3:.0f} ms, ours "
              f"{ours * 1e3:.0f} ms, x{base / ours:.2f}", flush=True)
    return records


# the batch: both presets, short and long keyframe intervals (720p, 60 s)
BATCH = (("veryfast", 12), ("ultrafast", 60), ("veryfast", 250), ("ultrafast", 250))


def batch_records(num_frames, repeats, seconds, image_size=336):
    processor = clip_processor(image_size)
    paths = [bench_clip(gop, seconds, SIZES["720p"], preset=preset) for preset, gop in BATCH]

    def pixels(videos):
        return [frames_to_pixel_values(v, image_size=image_size) for v in videos]

    fns = {
        "decord + PIL + CLIPImageProcessor, one by one (original)": lambda: [
            original_preprocess(original_decode(p, num_frames), image_size, processor)
            for p in paths],
        "read_video + frames_to_pixel_values, one by one": lambda: pixels(
            read_video(p, num_frames) for p in paths),
        "read_videos prefetch 1 (preprocess overlaps the next decode)": lambda: pixels(
            read_videos(paths, num_frames, prefetch=1)),
        "read_videos prefetch 3, then preprocess (VideoPipeline.video_decode)": lambda: pixels(
            list(read_videos(paths, num_frames, prefetch=3))),
        "read_videos prefetch 2, one decoder per video": lambda: pixels(
            read_videos(paths, num_frames, prefetch=2, workers=1)),
    }
    t = time_interleaved(fns, warmup=1, repeats=repeats)
    names = list(t)
    base, one_by_one = t[names[0]]["median_s"], t[names[1]]["median_s"]
    rec = {"name": f"batch/720p/{len(paths)} clips decode+preprocess", "times_s": t,
           "clips": [f"{preset} gop{gop}" for preset, gop in BATCH], "baseline_s": base,
           "speedup_vs_original": {n: base / v["median_s"] for n, v in t.items()},
           "gain_vs_one_by_one": {n: one_by_one / v["median_s"] for n, v in t.items()},
           "dtype": "float32", "image_size": image_size}
    for n, v in t.items():
        print(f"batch {n}: {v['median_s'] * 1e3:.0f} ms, x{base / v['median_s']:.2f} vs original, "
              f"x{one_by_one / v['median_s']:.2f} vs ours one by one", flush=True)
    return [rec]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--gops", type=int, nargs="+", default=[12, 60, 250])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--every-frame-sizes", nargs="*", default=["720p"],
                    help="sizes that also time the decode-every-frame baseline (slow)")
    ap.add_argument("--preprocess", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--batch", action=argparse.BooleanOptionalAction, default=True,
                    help="also the batch-mode overlap (frames_batch-cpu.json)")
    ap.add_argument("--only-batch", action="store_true", help="only the batch-mode overlap")
    args = ap.parse_args(argv)
    command = command_line(argv)
    if args.batch or args.only_batch:
        path = write_results("frames_batch", batch_records(args.frames, args.repeats,
                                                           args.seconds),
                             device="cpu", dtype="float32", cores=os.cpu_count(),
                             repeats=args.repeats, command=command)
        print(f"wrote {path}")
    if args.only_batch:
        return
    records = decode_records(args.sizes, args.gops, args.frames, args.repeats, args.seconds,
                             set(args.every_frame_sizes))
    if args.preprocess:
        records += preprocess_records(args.sizes, args.frames, args.repeats, args.seconds)
    path = write_results("frames_decode", records, device="cpu", dtype="uint8",
                         cores=os.cpu_count(), repeats=args.repeats,
                         command=command)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
