"""pytest-benchmark: 16 PLLaVA-sampled frames of a 10 s 360p h264 clip at keyframe intervals 12,
60 and 250, decoding every frame (decord/vLLM-style) vs ``read_video``.

    pytest benchmarks/test_frames.py --benchmark-only --benchmark-group-by=group

The full-size run (60 s 720p, results JSON) is ``python -m benchmarks.bench_frames``.
"""
import numpy as np
import pytest

from pllava_fast.video import read_video

from .bench_frames import bench_clip, decode_every_frame

SECONDS, SIZE, FRAMES = 10, (640, 360), 16


@pytest.fixture(scope="module", params=[12, 60, 250], ids=lambda g: f"gop{g}")
def clip(request):
    return request.param, bench_clip(request.param, SECONDS, SIZE)


def test_read_video_matches_every_frame_decode(clip):
    _, path = clip
    video = read_video(path, FRAMES)
    kept = decode_every_frame(path, FRAMES)
    for t, i in enumerate(video.indices):
        for plane, want in zip((video.y, video.u, video.v), kept[i]):
            assert np.array_equal(plane[t].numpy(), want)


@pytest.mark.parametrize("reader", ["every_frame", "read_video"])
def test_decode_sampled_frames(benchmark, clip, reader):
    gop, path = clip
    benchmark.group = f"decode {FRAMES} frames of {SECONDS}s {SIZE[1]}p h264, keyframe every {gop}"
    fn = {"every_frame": lambda: decode_every_frame(path, FRAMES),
          "read_video": lambda: read_video(path, FRAMES)}[reader]
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
