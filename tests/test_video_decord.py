"""read_video's default numbering against decord 0.6.0 itself (the original PLLaVA's decoder):
the same frame count, the same sampled indices and identical pixels, on clips with edit-list
pre-roll, B-frames, variable frame rate, open GOPs, odd sizes and rotation, and the shared videos.
"""

import av
import numpy as np
import pytest
import torch

from pllava_fast.ops.frames import yuv_to_rgb
from pllava_fast.testing import add_clip_stream, mux_frames
from pllava_fast.video import read_video, sample_indices

decord = pytest.importorskip("decord")


def _texture(w, h, seed=0):
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (h // 8 + 2, (w + 256) // 8 + 2, 3)).astype(np.uint8)
    return np.kron(coarse, np.ones((8, 8, 1), np.uint8))[:h, :w + 256]


def _encode(path, n=60, size=(160, 96), *, keyint=20, preset="veryfast", x264="", pts_ms=None,
            rotation=None, codec="libx264"):
    w, h = size
    tex = _texture(w, h)
    with av.open(str(path), "w") as c:
        s = add_clip_stream(c, size, codec=codec, keyint=keyint, preset=preset, x264=x264,
                            vfr=pts_ms is not None, rotation=rotation)
        mux_frames(c, s, (_numbered(tex, i, w) for i in range(n)), pts_ms)
    return str(path)


def _numbered(tex, i, w):
    img = tex[:, (3 * i) % 256:(3 * i) % 256 + w].copy()
    for b in range(6):  # the frame number in binary: every frame is distinct
        img[:8, 8 * b:8 * b + 8] = 255 * ((i >> b) & 1)
    return img


def _preroll(src, path, shift=3, from_key=0):
    """Copy the packets with timestamps shifted so the first ``shift`` frames have negative pts
    (what ``ffmpeg -ss X -c copy`` makes): the mp4 muxer writes an edit list, and the demuxer
    flags those packets discard (pre-roll)."""
    with av.open(src) as ic, av.open(str(path), "w") as oc:
        ist = ic.streams.video[0]
        ost = oc.add_stream_from_template(ist)
        packets = [p for p in ic.demux(ist) if p.size]
        keys = [i for i, p in enumerate(packets) if p.is_keyframe]
        packets = packets[keys[from_key]:]
        base, step = min(p.pts for p in packets), packets[0].duration or 512
        for p in packets:
            p.pts, p.dts = p.pts - base - shift * step, p.dts - base - shift * step
            p.stream = ost
            oc.mux(p)
    return str(path)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("decord")
    bframes = _encode(d / "bframes.mp4")
    rng = np.random.default_rng(1)
    vfr = [0] + [int(x) for x in np.cumsum(rng.integers(15, 70, 59))]
    return {
        "no_bframes": _encode(d / "ultrafast.mp4", preset="ultrafast"),
        "bframes": bframes,
        "bframes_long_gop": _encode(d / "medium_g250.mp4", n=120, keyint=250, preset="medium"),
        "preroll": _preroll(bframes, d / "preroll.mp4", 3),
        "preroll_later_gop": _preroll(bframes, d / "preroll_key1.mp4", 2, from_key=1),
        "vfr": _encode(d / "vfr.mp4", pts_ms=vfr),
        "open_gop": _encode(d / "open_gop.mp4", preset="medium", x264=":open-gop=1:bframes=3"),
        "odd_size": _encode(d / "odd.mp4", size=(162, 94)),
        "rotated": _encode(d / "rot90.mp4", rotation=90),
        "short": _encode(d / "short.mp4", n=7),
        "mkv": _encode(d / "bframes.mkv"),
    }


def _decord_batch(path, k):
    vr = decord.VideoReader(str(path))
    idx = sample_indices(len(vr), k)
    return len(vr), idx, vr.get_batch(idx).asnumpy()


def _check(path, k=16):
    n, idx, want = _decord_batch(path, k)
    stats = {}
    rgb = read_video(path, k, keep_yuv=False, stats=stats)
    assert (rgb.num_frames_total, rgb.indices, rgb.numbering) == (n, idx, "decord")
    np.testing.assert_array_equal(rgb.rgb.numpy(), want)
    yuv = read_video(path, k)  # the default path: YUV planes, converted inside the op
    if yuv.pixel_format == "yuv420p":
        got = yuv_to_rgb(yuv.y, yuv.u, yuv.v, yuv.color_matrix, yuv.color_range == "full")
        np.testing.assert_array_equal(got.numpy(), want)
    return stats


@pytest.mark.parametrize("name", ["no_bframes", "bframes", "bframes_long_gop", "preroll",
                                  "preroll_later_gop", "vfr", "open_gop", "odd_size", "rotated",
                                  "short", "mkv"])
@pytest.mark.parametrize("k", [8, 16])
def test_default_frames_equal_decord(clips, name, k):
    _check(clips[name], k)


def test_shared_videos_equal_decord(shared_videos):
    for name in ("cooking.mp4", "jesse_dance.mp4", "yoga.mp4"):
        _check(shared_videos / name)
    # cooking.mp4 has a pre-roll packet: decord counts 160 frames, a sequential decode 159,
    # and the original's 16 indices are those of 160
    cooking = read_video(shared_videos / "cooking.mp4", 16)
    assert cooking.num_frames_total == 160 and cooking.indices == sample_indices(160, 16)
    assert read_video(shared_videos / "cooking.mp4", 16, numbering="presentation"
                      ).num_frames_total == 159


def test_levers_keep_the_pixels(clips):
    """Skipping non-reference frames and decoding keyframe ranges concurrently change the work,
    not the frames."""
    for name in ("bframes", "bframes_long_gop", "preroll_later_gop", "open_gop"):
        ref = read_video(clips[name], 16, workers=1, skip_nonref=False)
        for workers, skip in ((1, True), (2, False), (2, True)):
            got = read_video(clips[name], 16, workers=workers, skip_nonref=skip)
            assert got.frames == ref.frames
            for plane in ("y", "u", "v"):
                assert torch.equal(getattr(got, plane), getattr(ref, plane)), (name, workers, skip)


def test_numbering_option_is_checked(clips):
    with pytest.raises(ValueError, match="numbering"):
        read_video(clips["bframes"], 4, numbering="pts")
    with pytest.raises(ValueError, match="workers"):
        read_video(clips["bframes"], 4, workers=0)
