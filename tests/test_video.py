"""Frame sampling and decoding: PLLaVA's index rules, and frames equal to PyAV's own full
sequential decode at the same indices (``numbering="presentation"``), for clips made here with
PyAV and the shared samples. Default-mode (decord) numbering: tests/test_video_decord.py."""
import functools
import io
import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

from pllava_fast import video as _video
from pllava_fast.testing import add_clip_stream, mux_frames
from pllava_fast.video import DecodedVideo, VideoDecodeError, sample_indices

# these tests hold the presentation-exact numbering to PyAV's own sequential decode
read_video = functools.partial(_video.read_video, numbering="presentation")
read_videos = functools.partial(_video.read_videos, numbering="presentation")


# ------------------------------------------------------------------------------------------
# sample_indices against PLLaVA's two rules, written out independently
# ------------------------------------------------------------------------------------------

def _pllava_chat_rule(n, k):
    seg = float(n - 1) / k
    first = int(seg / 2)
    return [first + int(np.round(seg * i)) for i in range(k)]


def _pllava_eval_rule(n, k, fps, bound):
    t0, t1 = bound if bound else (-100000, 100000)
    lo = max(0, round(t0 * fps))
    hi = min(round(t1 * fps), n - 1)
    seg = float(hi - lo) / k
    return [int(lo + seg / 2 + np.round(seg * i)) for i in range(k)]


@pytest.mark.parametrize("k", [1, 4, 8, 16, 32])
def test_sample_indices_matches_pllava_rules(k):
    for n in range(1, 501):
        assert sample_indices(n, k) == _pllava_chat_rule(n, k), (n, k)
        assert sample_indices(n, k, fps=25.0) == _pllava_eval_rule(n, k, 25.0, None), (n, k)
        for fps, bound in ((25.0, (0.3, 3.7)), (29.97, (1.0, 100.0)), (10.0, (0.0, 0.5))):
            if round(bound[0] * fps) > n - 1:
                continue
            got = sample_indices(n, k, fps=fps, start=bound[0], end=bound[1])
            assert got == _pllava_eval_rule(n, k, fps, bound), (n, k, fps, bound)


def test_sample_indices_errors():
    with pytest.raises(ValueError, match="num_frames_total"):
        sample_indices(0, 4)
    with pytest.raises(ValueError, match="num_segments"):
        sample_indices(10, 0)
    with pytest.raises(ValueError, match="fps"):
        sample_indices(10, 4, start=1.0)
    with pytest.raises(ValueError, match="before start"):
        sample_indices(100, 4, fps=25, start=2.0, end=1.0)
    with pytest.raises(ValueError, match="outside the clip"):
        sample_indices(100, 4, fps=25, start=10.0)
    with pytest.raises(ValueError, match=">= 0"):
        sample_indices(100, 4, fps=25, start=-1.0, end=1.0)


# ------------------------------------------------------------------------------------------
# clips made with PyAV, and PyAV's own sequential decode as the reference
# ------------------------------------------------------------------------------------------

def _pattern(i, w, h):
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 3 + i * 7) % 256, (yy * 5 + i * 11) % 256, (xx + yy + i * 13) % 256], -1)
    x0, y0 = (i * 5) % max(w - 8, 1), (i * 3) % max(h - 8, 1)
    img[y0:y0 + 8, x0:x0 + 8] = 255
    return img.astype(np.uint8)


def make_clip(path, n=24, size=(64, 48), *, codec="libx264", pix_fmt="yuv420p", gop=12,
              rate=25, pts_ms=None, rotation=None, options=None, x264=""):
    """Write a clip with ``n`` distinct frames; ``pts_ms`` gives variable frame times."""
    w, h = size
    with av.open(str(path), "w") as c:
        s = add_clip_stream(c, size, codec=codec, rate=rate, pix_fmt=pix_fmt, keyint=gop,
                            x264=x264, vfr=pts_ms is not None, rotation=rotation, options=options)
        mux_frames(c, s, (_pattern(i, w, h) for i in range(n)), pts_ms)
    return str(path)


def _planes(frame):
    return [np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width]
            for p in frame.planes]


def reference(source, indices):
    """PyAV's full sequential decode: frame objects' data at the given positions."""
    want = set(indices)
    out, count = {}, 0
    with av.open(source) as c:
        for frame in c.decode(video=0):
            if count in want:
                out[count] = frame
            count += 1
    return out, count


def assert_matches_reference(video: DecodedVideo, source, *, turns=0):
    ref, count = reference(source, video.indices)
    assert video.num_frames_total == count
    assert len(video) == len(video.indices)
    for t, i in enumerate(video.indices):
        frame = ref[i]
        if video.pixel_format == "yuv420p":
            if frame.format.name == "nv12":
                frame = frame.reformat(format="yuv420p")
            for got, want in zip((video.y, video.u, video.v), _planes(frame)):
                np.testing.assert_array_equal(got[t].numpy(), np.rot90(want, turns))
        else:
            rng = int(frame.color_range)
            want = frame.to_ndarray(format="rgb24", src_color_range=rng if rng else None)
            np.testing.assert_array_equal(video.rgb[t].numpy(), np.rot90(want, turns))


CASES = {
    # name: (make_clip kwargs, file name, num_frames)
    "gop1": (dict(n=40, gop=1), "gop1.mp4", 3),
    "gop1_8": (dict(n=40, gop=1), "gop1.mp4", 8),
    "gop12": (dict(n=150, gop=12), "gop12.mp4", 4),
    "gop12_16": (dict(n=150, gop=12), "gop12.mp4", 16),
    "gop250": (dict(n=60, gop=250), "gop250.mp4", 16),
    "open_gop": (dict(n=120, gop=12, x264=":open-gop=1"), "open_gop.mp4", 6),
    "one_frame": (dict(n=1), "one.mp4", 16),
    "three_frames": (dict(n=3), "three.mp4", 8),
    "vfr": (dict(n=90, gop=12, pts_ms=list(np.cumsum([0] + [13, 40, 27, 90, 33] * 18)[:90])),
            "vfr.mp4", 8),
    "portrait": (dict(n=30, size=(48, 64)), "portrait.mov", 8),
    "odd_vp9": (dict(n=40, size=(321, 241), codec="libvpx-vp9", gop=10), "odd.webm", 3),
    "odd_mpeg4_avi": (dict(n=40, size=(321, 241), codec="mpeg4", gop=10), "odd.avi", 3),
    "mkv_hevc": (dict(n=50, codec="libx265", gop=10, options={"x265-params": "log-level=0"}),
                 "hevc.mkv", 3),
    "vp8": (dict(n=40, codec="libvpx", gop=10), "vp8.webm", 3),
    "yuvj420p": (dict(n=30, codec="mjpeg", pix_fmt="yuvj420p"), "mjpeg.avi", 3),
    "mkv_h264": (dict(n=60, gop=12), "h264.mkv", 3),
    "mpegts": (dict(n=60, gop=12), "h264.ts", 3),
    "avi_h264_bframes": (dict(n=60, gop=12), "h264.avi", 5),  # AVI stores no pts: counted
    "yuv444p": (dict(n=30, pix_fmt="yuv444p", size=(65, 49)), "yuv444.mp4", 8),
    "yuv420p10le": (dict(n=30, pix_fmt="yuv420p10le"), "tenbit.mp4", 8),
    "gray": (dict(n=30, codec="ffv1", pix_fmt="gray"), "gray.mkv", 8),
    "gif": (dict(n=20, codec="gif", pix_fmt="rgb8", rate=10), "anim.gif", 8),
}


# cases whose sampling gaps exceed the keyframe interval: the reader must seek there
SEEKS = {"gop1", "gop12", "open_gop", "vfr", "odd_vp9", "odd_mpeg4_avi", "mkv_hevc", "vp8",
         "yuvj420p", "mkv_h264", "mpegts"}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    cache = {}

    def get(name):
        kwargs, fname, _ = CASES[name]
        path = root / fname
        if fname not in cache:
            cache[fname] = make_clip(path, **kwargs)
        return cache[fname]
    return get


@pytest.mark.parametrize("name", list(CASES))
def test_frames_equal_sequential_decode(clips, name):
    path = clips(name)
    stats = {}
    video = read_video(path, CASES[name][2], stats=stats)
    assert_matches_reference(video, path)
    assert video.indices == sample_indices(video.num_frames_total, CASES[name][2])
    if name in SEEKS:
        assert stats["mode"] == "seek" and stats["seeks"] > 0
    if name == "gop12":
        assert stats["packets_decoded"] < video.num_frames_total // 2
    if name == "gop250":
        assert stats["seeks"] == 0
    if name == "avi_h264_bframes":
        assert stats["mode"] == "count"
    if name == "gif":
        assert stats["mode"] == "forward"


def test_keep_yuv_false_and_formats(clips):
    path = clips("gop12")
    assert read_video(path, 4).pixel_format == "yuv420p"
    video = read_video(path, 4, keep_yuv=False)
    assert video.pixel_format == "rgb24" and video.y is None
    assert video.rgb.shape == (4, 48, 64, 3) and video.rgb.dtype == torch.uint8
    assert_matches_reference(video, path)
    jpeg = read_video(clips("yuvj420p"), 4)
    assert (jpeg.pixel_format, jpeg.color_range) == ("yuv420p", "full")
    for name in ("yuv444p", "yuv420p10le", "gray", "gif"):
        assert read_video(clips(name), 2).pixel_format == "rgb24", name


def test_nv12_planes_deinterleaved():
    from pllava_fast.video import frame_to_yuv420
    h, w = 6, 10
    rng = np.random.default_rng(1)
    nv12 = rng.integers(0, 256, (h * 3 // 2, w), dtype=np.uint8)
    y, u, v = frame_to_yuv420(av.VideoFrame.from_ndarray(nv12, format="nv12"))
    np.testing.assert_array_equal(y, nv12[:h])
    np.testing.assert_array_equal(u, nv12[h:, 0::2])
    np.testing.assert_array_equal(v, nv12[h:, 1::2])


def test_yuv_plane_shapes_odd_size(clips):
    video = read_video(clips("odd_vp9"), 4)
    assert video.pixel_format == "yuv420p"
    assert (video.height, video.width) == (241, 321)
    assert video.y.shape == (4, 241, 321)
    assert video.u.shape == video.v.shape == (4, 121, 161)
    assert all(t.is_contiguous() for t in (video.y, video.u, video.v))
    assert (video.color_matrix, video.color_range) == ("bt601", "limited")


def test_vfr_indices_are_presentation_positions(clips):
    path = clips("vfr")
    video = read_video(path, 8)
    with av.open(path) as c:
        assert float(c.streams.video[0].average_rate) != 25.0  # really variable
    assert_matches_reference(video, path)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation(tmp_path, rotation):
    path = make_clip(tmp_path / f"rot{rotation}.mp4", n=30, size=(64, 48), rotation=rotation)
    with av.open(path) as c:
        stored = next(c.decode(video=0)).rotation
    turns = int(round(stored / 90)) % 4
    assert turns == (rotation // 90) % 4
    upright = read_video(path, 4)
    assert_matches_reference(upright, path, turns=turns)
    raw = read_video(path, 4, rotate=False)
    assert_matches_reference(raw, path)
    assert_matches_reference(read_video(path, 4, keep_yuv=False), path, turns=turns)
    if rotation != 180:
        assert (upright.height, upright.width) == (64, 48)
        assert upright.u.shape[1:] == (32, 24)


def test_shared_videos(shared_videos):
    for name in ("cooking.mp4", "jesse_dance.mp4", "yoga.mp4"):
        path = str(shared_videos / name)
        assert_matches_reference(read_video(path, 16), path)
    dog = read_video(str(shared_videos / "dog.png"))
    want = np.asarray(Image.open(shared_videos / "dog.png").convert("RGB"))
    assert dog.indices == [0] and dog.num_frames_total == 1
    np.testing.assert_array_equal(dog.rgb[0].numpy(), want)


def test_time_bounds(clips):
    path = clips("gop12")  # 150 frames at 25 fps
    video = read_video(path, 4, start=1.0, end=4.0)
    assert video.fps == 25.0
    assert video.indices == _pllava_eval_rule(150, 4, 25.0, (1.0, 4.0))
    assert_matches_reference(video, path)
    with pytest.raises(ValueError, match="outside the clip"):
        read_video(path, 4, start=100.0, end=200.0)


def test_bytes_and_file_objects(clips):
    path = clips("gop12")
    want = read_video(path, 8)
    data = open(path, "rb").read()
    for src in (data, io.BytesIO(data)):
        got = read_video(src, 8)
        assert got.indices == want.indices
        assert torch.equal(got.y, want.y) and torch.equal(got.v, want.v)
    with open(path, "rb") as f:
        assert torch.equal(read_video(f, 8).u, want.u)

    class Pipe:  # read-only, no seeking
        def __init__(self, data):
            self._f = io.BytesIO(data)

        def read(self, n=-1):
            return self._f.read(n)

        def seekable(self):
            return False
    assert torch.equal(read_video(Pipe(data), 8).y, want.y)


def test_missing_frame_count_is_counted(clips):
    path = clips("vp8")  # webm lists no frame count
    with av.open(path) as c:
        assert not c.streams.video[0].frames
    assert read_video(path, 4).num_frames_total == 40


def test_images_and_frame_folders(tmp_path):
    img = _pattern(3, 30, 20)
    Image.fromarray(img).save(tmp_path / "still.png")
    still = read_video(str(tmp_path / "still.png"), 16)
    assert len(still) == 1 and still.pixel_format == "rgb24"
    np.testing.assert_array_equal(still.rgb[0].numpy(), img)
    from_bytes = read_video((tmp_path / "still.png").read_bytes())
    assert torch.equal(from_bytes.rgb, still.rgb)
    with open(tmp_path / "still.png", "rb") as f:
        assert torch.equal(read_video(f).rgb, still.rgb)
    with pytest.raises(VideoDecodeError, match="still.png.*video is required"):
        read_video(str(tmp_path / "still.png"), require_video=True)

    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90 degrees clockwise to display
    Image.fromarray(img).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "phone.jpg") as im:
        raw_jpeg = np.asarray(im.convert("RGB"))
    upright = read_video(str(tmp_path / "phone.jpg"))
    np.testing.assert_array_equal(upright.rgb[0].numpy(), np.rot90(raw_jpeg, -1))
    np.testing.assert_array_equal(read_video(str(tmp_path / "phone.jpg"), rotate=False).rgb[0],
                                  raw_jpeg)

    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(1, 13):  # frame_2 must sort before frame_10
        Image.fromarray(_pattern(i, 30, 20)).save(folder / f"frame_{i}.png")
    video = read_video(str(folder), 4, fps=3.0)
    assert video.indices == sample_indices(12, 4) and video.num_frames_total == 12
    for t, i in enumerate(video.indices):
        np.testing.assert_array_equal(video.rgb[t].numpy(), _pattern(i + 1, 30, 20))
    bounded = read_video(str(folder), 4, fps=3.0, start=1.0, end=3.0)
    assert bounded.indices == _pllava_eval_rule(12, 4, 3.0, (1.0, 3.0))


def test_errors(tmp_path, clips):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        read_video(str(tmp_path / "nope.mp4"))
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(VideoDecodeError, match="notes.mp4"):
        read_video(str(text))
    # moov at the end: a cut file has no index at all
    data = open(clips("gop12"), "rb").read()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(VideoDecodeError, match="cut.mp4"):
        read_video(str(cut))
    # index first (faststart): the index lists frames the file no longer holds
    fast = tmp_path / "fast.mp4"
    with av.open(str(fast), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(30):
            for p in s.encode(av.VideoFrame.from_ndarray(_pattern(i, 64, 48), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = fast.read_bytes()
    (tmp_path / "fast_cut.mp4").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(VideoDecodeError, match="fast_cut.mp4.*truncated"):
        read_video(str(tmp_path / "fast_cut.mp4"))
    garbled = bytearray(open(clips("gop12"), "rb").read())
    garbled[:64] = os.urandom(64)
    (tmp_path / "garbled.mp4").write_bytes(bytes(garbled))
    with pytest.raises(VideoDecodeError, match="garbled.mp4"):
        read_video(str(tmp_path / "garbled.mp4"))
    audio = tmp_path / "audio.m4a"
    with av.open(str(audio), "w") as c:
        s = c.add_stream("aac", rate=16000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with pytest.raises(VideoDecodeError, match="audio.m4a.*no video stream"):
        read_video(str(audio))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VideoDecodeError, match="empty.*no image frames"):
        read_video(str(empty))
    with pytest.raises(TypeError):
        read_video(12345)


def test_read_videos_prefetch_in_order(clips, tmp_path):
    paths = [clips("gop12"), clips("gop1"), clips("three_frames")]
    for prefetch in (0, 1, 2):
        got = list(read_videos(paths, 4, prefetch=prefetch))
        assert [v.source for v in got] == paths
        for v, p in zip(got, paths):
            assert torch.equal(v.y, read_video(p, 4).y)
    bad = list(paths)
    bad.insert(1, str(tmp_path / "missing.mp4"))
    it = read_videos(bad, 4, prefetch=2)
    assert next(it).source == paths[0]
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        next(it)


def test_hwaccel_is_checked_up_front(clips):
    path = clips("gop12")
    with pytest.raises(ValueError, match="hwaccel must be one of"):
        _video.read_video(path, 4, hwaccel="nvdec")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU|offers only"):
            _video.read_video(path, 4, hwaccel="cuda")


@pytest.mark.cuda
def test_hwaccel_cuda_gives_the_software_pictures(clips):
    # NVDEC's h264 output is the standard's, bit for bit: the same planes as FFmpeg's decoder
    path = clips("gop12")
    soft = _video.read_video(path, 8)
    hard = _video.read_video(path, 8, hwaccel="cuda")
    assert hard.indices == soft.indices and hard.pixel_format == soft.pixel_format
    for name in ("y", "u", "v", "rgb"):
        a, b = getattr(soft, name), getattr(hard, name)
        assert (a is None and b is None) or torch.equal(a, b), name
