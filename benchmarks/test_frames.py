"""pytest-benchmark: 16 PLLaVA-sampled frames of a 10 s 360p h264 clip (B-frames) at keyframe
intervals 12, 60 and 250: decord's get_batch (the original), decoding every frame (weaker,
labelled) and ``read_video``.

    pytest benchmarks/test_frames.py --benchmark-only --benchmark-group-by=group

The full-size run (60 s 720p / 1080p, both encoder presets, the levers, results JSON) is
``python -m benchmarks.bench_frames``.
"""
import numpy as np
import pytest

from pllava_fast.ops.frames import yuv_to_rgb
from pllava_fast.original import decode_every_frame, original_decode
from pllava_fast.video import read_video

from .bench_frames import bench_clip
from .harness import bench

SECONDS, SIZE, FRAMES = 10, (640, 360), 16


@pytest.fixture(scope="module", params=[12, 60, 250], ids=lambda g: f"gop{g}")
def clip(request):
    return request.param, bench_clip(request.param, SECONDS, SIZE)


def test_read_video_matches_decord(clip):
    _, path = clip
    v = read_video(path, FRAMES)
    want = np.stack([np.asarray(im) for im in original_decode(path, FRAMES)])
    got = yuv_to_rgb(v.y, v.u, v.v, v.color_matrix, v.color_range == "full").numpy()
    assert np.array_equal(got, want)


@pytest.mark.parametrize("reader", ["decord_get_batch", "every_frame", "read_video"])
def test_decode_sampled_frames(benchmark, clip, reader):
    gop, path = clip
    benchmark.group = f"decode {FRAMES} frames of {SECONDS}s {SIZE[1]}p h264, keyframe every {gop}"
    fn = {"decord_get_batch": lambda: original_decode(path, FRAMES),
          "every_frame": lambda: decode_every_frame(path, FRAMES),
          "read_video": lambda: read_video(path, FRAMES)}[reader]
    bench(benchmark, fn, rounds=3)
