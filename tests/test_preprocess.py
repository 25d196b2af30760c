"""frames_to_pixel_values / pllava_fast::frames_to_tensor against PLLaVA's own preprocessing.

Reference: PyAV rgb24 frames -> PllavaProcessor.resize_crop_longshort (transformers' resize, i.e.
Pillow BICUBIC) -> transformers' CLIPImageProcessorPil (shortest edge 336, center crop 336).
YUV -> RGB is checked against FFmpeg's own rgb24 conversion (swscale) on clips made with PyAV.
"""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
PIL = pytest.importorskip("PIL.Image")
transformers = pytest.importorskip("transformers")

from transformers.image_transforms import get_resize_output_image_size, resize  # noqa: E402
from transformers.image_utils import ChannelDimension, PILImageResampling  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

from pllava_fast import _ext, ops  # noqa: E402
from pllava_fast.ops.frames import frames_to_tensor_torch, yuv_to_rgb  # noqa: E402
from pllava_fast.preprocess import frames_to_pixel_values, pllava_geometry  # noqa: E402
from pllava_fast.testing import mux_frames  # noqa: E402

CLIP = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
STD = torch.tensor(ops.CLIP_STD)[None, :, None, None]
HAS_C = _ext.available()


# ---------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------
def pllava_reference(videos, clip_resolution=336):
    """PllavaProcessor's resize_crop_longshort + CLIP, on lists of HxWx3 uint8 frames."""
    last = ChannelDimension.LAST
    sizes = [v[0].shape[:2] for v in videos]
    rates = [max(s) / min(s) for s in sizes]
    min_rate = min(rates)
    ref_size = sizes[rates.index(min_rate)]
    short = max(min(s) for s in sizes)
    longest = min(640, max(max(s) for s in sizes))
    short = max(min(short, int(longest / min_rate)), clip_resolution)
    out = (int(short * min_rate), short) if ref_size[0] > ref_size[1] else (short, int(short * min_rate))
    pixel_values = []
    for frames in videos:
        resized = []
        for f in frames:
            size = get_resize_output_image_size(f, size=short, default_to_square=False,
                                                max_size=9999, input_data_format=last)
            if min(size) < clip_resolution:
                size = get_resize_output_image_size(f, size=short, default_to_square=False,
                                                    input_data_format=last)
            resized.append(resize(f, size=size, resample=PILImageResampling.BICUBIC,
                                  input_data_format=last))
        h, w = resized[0].shape[:2]
        overhead = (max(h, w) - max(out)) // 2
        cut = slice(overhead // 2, overhead // 2 + max(out))
        cropped = [r[cut] if h > w else r[:, cut] for r in resized]
        pixel_values.append(np.stack(CLIP(cropped, return_tensors="np")["pixel_values"]))
    return torch.from_numpy(np.concatenate(pixel_values))


def assert_pixels_close(ours, ref):
    """Within 1/255 on >= 99.9% of values and 3/255 everywhere, in 0..255 units."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    diff = ((ours.float() - ref.float()) * STD * 255).abs()
    frac = (diff <= 1.0 + 1e-3).float().mean().item()
    assert frac >= 0.999, f"only {frac:.5f} of values within 1/255 (max {diff.max():.2f}/255)"
    assert diff.max().item() <= 3.0 + 1e-3, f"max difference {diff.max():.2f}/255"


# ---------------------------------------------------------------------------------------------
# Clips made with PyAV
# ---------------------------------------------------------------------------------------------
def _content(h, w, n, seed):
    """Smooth gradients, moving shapes and some texture: something like video, not noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for i in range(n):
        r = 127 + 120 * np.sin(xx / max(w, 1) * 6.3 + i * 0.7)
        g = 127 + 120 * np.cos(yy / max(h, 1) * 4.1 - i * 0.3)
        b = (xx + yy + 9 * i) % 256
        img = np.stack([r, g, b], -1)
        cy, cx, rad = h * (0.3 + 0.05 * i), w * (0.4 + 0.04 * i), min(h, w) / 4
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2] = (250, 30, 60)
        img += rng.normal(0, 6, img.shape)
        frames.append(np.clip(img, 0, 255).astype(np.uint8))
    return frames


def make_clip(h, w, n=2, colorspace=None, seed=0):
    """An h264 yuv420p mp4 in memory; colorspace None (untagged) | "bt601" | "bt709"."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        if colorspace is not None:
            stream.codec_context.colorspace = 1 if colorspace == "bt709" else 6
            stream.codec_context.color_range = 1
        mux_frames(container, stream, _content(h, w, n, seed))
    return buf.getvalue()


def _plane(frame, i, h, w):
    p = frame.planes[i]
    return np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:h, :w].copy()


def decode(data):
    """[(rgb24 via swscale, (y, u, v) planes, frame.colorspace)] for every frame."""
    out = []
    with av.open(io.BytesIO(data)) as container:
        for frame in container.decode(video=0):
            h, w = frame.height, frame.width
            planes = (_plane(frame, 0, h, w), _plane(frame, 1, (h + 1) // 2, (w + 1) // 2),
                      _plane(frame, 2, (h + 1) // 2, (w + 1) // 2))
            out.append((frame.to_ndarray(format="rgb24"), planes, frame.colorspace))
    return out


@pytest.fixture(scope="module")
def clips():
    cache = {}

    def get(h, w, n=2, colorspace=None):
        key = (h, w, n, colorspace)
        if key not in cache:
            # x264 needs even sizes: odd ones are an even clip's frames/planes cropped
            he, we = h + h % 2, w + w % 2
            cache[key] = [
                (rgb[:h, :w], (y[:h, :w], u[:(h + 1) // 2, :(w + 1) // 2],
                               v[:(h + 1) // 2, :(w + 1) // 2]), cs)
                for rgb, (y, u, v), cs in decode(make_clip(he, we, n, colorspace, seed=h + w))]
        return cache[key]

    return get


SHAPES = {
    "landscape": (270, 480),
    "portrait": (480, 270),
    "square": (300, 300),
    "tiny": (48, 64),        # 64x48, upscaled to 448x336
    "odd": (241, 321),
    "large": (1080, 1920),   # downscaled 3x by the first resize
}


# ---------------------------------------------------------------------------------------------
# Pixels against the reference
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SHAPES))
def test_rgb_frames_match_pllava_reference(clips, name):
    h, w = SHAPES[name]
    rgb = np.stack([f[0] for f in clips(h, w, n=2)])
    ref = pllava_reference([list(rgb)])
    ours = frames_to_pixel_values(torch.from_numpy(rgb))
    assert ours.shape == (2, 3, 336, 336) and ours.dtype == torch.float32
    assert_pixels_close(ours, ref)


def test_several_videos_per_video_and_joint_geometry(clips):
    a = np.stack([f[0] for f in clips(270, 480)])
    b = np.stack([f[0] for f in clips(480, 270)])
    c = np.stack([f[0] for f in clips(300, 300)])
    separate = torch.cat([pllava_reference([list(x)]) for x in (a, b, c)])
    ours = frames_to_pixel_values([_decoded_rgb(x) for x in (a, b, c)])
    assert_pixels_close(ours, separate)
    joint = pllava_reference([list(a), list(b), list(c)])
    ours_joint = frames_to_pixel_values([_decoded_rgb(x) for x in (a, b, c)], joint_geometry=True)
    assert_pixels_close(ours_joint, joint)


def test_geometry_is_pllavas():
    # 720p: short edge 360, long edge capped at 640; CLIP: 597x336, center crop at column 130
    assert pllava_geometry([(720, 1280)]) == [(360, 640, 0, 0, 360, 640, 336, 597, 0, 130, 336)]
    # the shared-aspect crop starts at a quarter of the excess, not at the centre
    g = pllava_geometry([(360, 640), (360, 800)])
    h1, w1, top1, left1, hc, wc = g[1][:6]
    assert (h1, w1, hc, wc) == (360, 800, 360, 640) and left1 == ((800 - 640) // 2) // 2 == 40


# ---------------------------------------------------------------------------------------------
# YUV -> RGB against swscale
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("colorspace", [None, "bt601", "bt709"])
def test_yuv_to_rgb_matches_ffmpeg(clips, colorspace):
    frames = clips(240, 320, n=2, colorspace=colorspace)
    expected_tag = {None: 2, "bt601": 6, "bt709": 1}[colorspace]  # AVCOL_SPC_*
    assert all(f[2] == expected_tag for f in frames)
    matrix = "bt709" if colorspace == "bt709" else "bt601"  # untagged: FFmpeg assumes BT.601
    y, u, v = (torch.from_numpy(np.stack([f[1][i] for f in frames])) for i in range(3))
    ffmpeg_rgb = torch.from_numpy(np.stack([f[0] for f in frames])).int()
    ours = yuv_to_rgb(y, u, v, matrix=matrix)
    diff = (ours.int() - ffmpeg_rgb).abs()
    # the op follows swscale's fixed point: equal here; 3/255 is the contract
    assert diff.max().item() <= 3 and diff.float().mean().item() < 0.05
    # the op's own conversion: identity geometry on a square crop of the planes
    n = 160
    ident = (n, n, 0, 0, n, n, n, n, 0, 0, n)
    sq = ops.frames_to_tensor(y[:, :n, :n].contiguous(), u[:, :n // 2, :n // 2].contiguous(),
                              v[:, :n // 2, :n // 2].contiguous(), geometry=ident, matrix=matrix)
    mean = torch.tensor(ops.CLIP_MEAN)[None, :, None, None]
    back = ((sq * STD + mean) * 255).permute(0, 2, 3, 1)
    assert (back - ffmpeg_rgb[:, :n, :n]).abs().max().item() <= 3 + 1e-3
    # wrong matrix is caught by the test (bt709 vs bt601 differ by far more than 3/255)
    other = yuv_to_rgb(y, u, v, matrix="bt601" if matrix == "bt709" else "bt709")
    assert (other.int() - ffmpeg_rgb).abs().max().item() > 3


@pytest.mark.parametrize("colorspace", [None, "bt601", "bt709"])
def test_yuv_planes_match_ffmpeg_rgb24_then_pllava_reference(clips, colorspace):
    video_mod = pytest.importorskip("pllava_fast.video")
    frames = clips(270, 480, n=2, colorspace=colorspace)
    y, u, v = (torch.from_numpy(np.stack([f[1][i] for f in frames])) for i in range(3))
    vid = video_mod.DecodedVideo(source="clip.mp4", indices=[0, 1], fps=10.0, num_frames_total=2,
                                 pixel_format="yuv420p", y=y, u=u, v=v,
                                 color_matrix="bt709" if colorspace == "bt709" else "bt601",
                                 color_range="limited")
    ref = pllava_reference([[f[0] for f in frames]])
    assert_pixels_close(frames_to_pixel_values(vid), ref)


@pytest.mark.parametrize("colorspace", [None, "bt709"])
def test_yuv_video_equals_rgb_path_of_its_conversion(clips, colorspace):
    video_mod = pytest.importorskip("pllava_fast.video")
    frames = clips(241, 321, n=2, colorspace=colorspace) if colorspace is None else \
        clips(240, 320, n=2, colorspace=colorspace)
    matrix = "bt709" if colorspace == "bt709" else "bt601"
    y, u, v = (torch.from_numpy(np.stack([f[1][i] for f in frames])) for i in range(3))
    vid = video_mod.DecodedVideo(source="clip.mp4", indices=[0, 1], fps=10.0, num_frames_total=2,
                                 pixel_format="yuv420p", y=y, u=u, v=v, color_matrix=matrix,
                                 color_range="limited")
    ours = frames_to_pixel_values(vid)
    via_rgb = frames_to_pixel_values(yuv_to_rgb(y, u, v, matrix=matrix))
    assert torch.equal(ours, via_rgb)


# ---------------------------------------------------------------------------------------------
# The op: opcheck, C++ vs torch, dtypes, inputs, errors
# ---------------------------------------------------------------------------------------------
def _decoded_rgb(rgb):
    video_mod = pytest.importorskip("pllava_fast.video")
    return video_mod.DecodedVideo(source="frames", indices=list(range(len(rgb))), fps=None,
                                  num_frames_total=len(rgb), pixel_format="rgb24",
                                  rgb=torch.from_numpy(rgb))


def _random_yuv(t, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 256, (t, h, w), dtype=torch.uint8, generator=g)
    u = torch.randint(0, 256, (t, (h + 1) // 2, (w + 1) // 2), dtype=torch.uint8, generator=g)
    v = torch.randint(0, 256, (t, (h + 1) // 2, (w + 1) // 2), dtype=torch.uint8, generator=g)
    return y, u, v


def _op_args(frames, u, v, size, matrix=0, full=False, dtype=torch.float32, out=336):
    geom = list(pllava_geometry([size], image_size=out)[0])
    return (frames, u, v, matrix, full, geom, list(ops.CLIP_MEAN), list(ops.CLIP_STD), dtype)


def test_opcheck():
    y, u, v = _random_yuv(2, 45, 61)
    torch.library.opcheck(ops.frames._frames_to_tensor_op, _op_args(y, u, v, (45, 61), out=40))
    rgb = torch.randint(0, 256, (1, 37, 50, 3), dtype=torch.uint8)
    torch.library.opcheck(ops.frames._frames_to_tensor_op,
                          _op_args(rgb, None, None, (37, 50), dtype=torch.bfloat16, out=24))


@pytest.mark.skipif(not HAS_C, reason="pllava_fast._C not built")
@pytest.mark.parametrize("size", [(45, 61), (240, 97), (33, 33), (720, 1280)])
def test_cpp_and_torch_fallback_agree(size):
    y, u, v = _random_yuv(1 if size[0] > 500 else 2, *size, seed=size[0])
    rgb = yuv_to_rgb(y, u, v)
    for frames, planes, matrix, full in ((y, (u, v), 0, False), (y, (u, v), 1, True),
                                         (rgb, (None, None), 0, False)):
        args = _op_args(frames, *planes, size, matrix, full)
        assert torch.equal(_ext.load().frames_to_tensor_cpu(*args), frames_to_tensor_torch(*args))


@pytest.mark.skipif(not HAS_C, reason="pllava_fast._C not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpp_and_torch_fallback_agree_low_precision(dtype):
    y, u, v = _random_yuv(2, 40, 52)
    args = _op_args(y, u, v, (40, 52), 1, False, dtype, out=32)
    ours = _ext.load().frames_to_tensor_cpu(*args)
    assert ours.dtype == dtype and torch.equal(ours, frames_to_tensor_torch(*args))


@pytest.mark.skipif(not HAS_C, reason="pllava_fast._C not built")
def test_portable_cpp_loops_agree_with_torch_fallback():
    """The non-SIMD C++ loops (CPUs without AVX2) give the same pixels."""
    code = (
        "import torch\n"
        "from pllava_fast import _ext, ops\n"
        "from pllava_fast.ops.frames import frames_to_tensor_torch\n"
        "from pllava_fast.preprocess import pllava_geometry\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for h, w in ((45, 61), (241, 321), (720, 1280)):\n"
        "    y = torch.randint(0, 256, (1, h, w), dtype=torch.uint8, generator=g)\n"
        "    u = torch.randint(0, 256, (1, (h + 1) // 2, (w + 1) // 2), dtype=torch.uint8, generator=g)\n"
        "    v = torch.randint(0, 256, (1, (h + 1) // 2, (w + 1) // 2), dtype=torch.uint8, generator=g)\n"
        "    rgb = torch.randint(0, 256, (1, h, w, 3), dtype=torch.uint8, generator=g)\n"
        "    geom = list(pllava_geometry([(h, w)])[0])\n"
        "    for args in ((y, u, v, 1, False), (rgb, None, None, 0, False)):\n"
        "        a = (*args, geom, list(ops.CLIP_MEAN), list(ops.CLIP_STD), torch.float32)\n"
        "        assert torch.equal(_ext.load().frames_to_tensor_cpu(*a), frames_to_tensor_torch(*a))\n"
        "print('ok')\n")
    env = dict(os.environ, PLLAVA_FAST_NO_SIMD="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def test_dtypes_round_the_float32_result():
    rgb = torch.randint(0, 256, (1, 90, 120, 3), dtype=torch.uint8)
    full = frames_to_pixel_values(rgb)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(frames_to_pixel_values(rgb, dtype=dtype), full.to(dtype))


def test_input_kinds_agree(clips):
    rgb = np.stack([f[0] for f in clips(270, 480)])
    expected = frames_to_pixel_values(torch.from_numpy(rgb))
    assert torch.equal(frames_to_pixel_values(rgb), expected)
    assert torch.equal(frames_to_pixel_values(list(rgb)), expected)
    assert torch.equal(frames_to_pixel_values([PIL.fromarray(f) for f in rgb]), expected)
    assert torch.equal(frames_to_pixel_values(_decoded_rgb(rgb)), expected)


def test_bad_input_is_reported():
    rgb = torch.zeros(2, 20, 30, 3, dtype=torch.uint8)
    y, u, v = _random_yuv(2, 20, 30)
    geom = pllava_geometry([(20, 30)])[0]
    with pytest.raises(ValueError, match="uint8"):
        ops.frames_to_tensor(rgb.float(), geometry=geom)
    with pytest.raises(ValueError, match=r"\(T, H, W, 3\)"):
        ops.frames_to_tensor(torch.zeros(2, 20, 30, 4, dtype=torch.uint8), geometry=geom)
    with pytest.raises(ValueError, match="u plane"):
        ops.frames_to_tensor(y, u[:, :5], v, geometry=geom)
    with pytest.raises(ValueError, match="both"):
        ops.frames_to_tensor(y, u, None, geometry=geom)
    with pytest.raises(ValueError, match="matrix"):
        ops.frames_to_tensor(y, u, v, geometry=geom, matrix="bt2020")
    with pytest.raises(ValueError, match="dtype"):
        ops.frames_to_tensor(rgb, geometry=geom, dtype=torch.float64)
    with pytest.raises(ValueError, match="frame 1"):
        frames_to_pixel_values([np.zeros((20, 30, 3), np.uint8), np.zeros((21, 30, 3), np.uint8)])
    with pytest.raises(ValueError, match="unsupported frames type"):
        frames_to_pixel_values("video.mp4")
    bad_crop = list(geom)
    bad_crop[2] = 10_000  # top1 outside the resized frame
    with pytest.raises((RuntimeError, ValueError), match="crop"):
        ops.frames_to_tensor(rgb, geometry=bad_crop)


@pytest.mark.skipif(not HAS_C, reason="pllava_fast._C not built")
def test_cpp_checks_name_the_argument():
    y, u, v = _random_yuv(2, 20, 30)
    args = list(_op_args(y, u, v, (20, 30)))
    cases = [
        (2, v[:, :, :7], "v plane"),
        (0, y.float(), "uint8"),
        (5, args[5][:4], "geometry"),
        (7, [1.0, 0.0, 1.0], "std"),
        (8, torch.int32, "dtype"),
        (3, 7, "matrix"),
    ]
    for pos, bad, message in cases:
        bad_args = list(args)
        bad_args[pos] = bad
        with pytest.raises(RuntimeError, match=message):
            _ext.load().frames_to_tensor_cpu(*bad_args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    y, u, v = _random_yuv(3, 720, 1280)
    cpu = frames_to_tensor_torch(*_op_args(y, u, v, (720, 1280), dtype=dtype))
    gpu = ops.frames_to_tensor(y.cuda(), u.cuda(), v.cuda(),
                               geometry=pllava_geometry([(720, 1280)])[0], dtype=dtype)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("name", ["cooking.mp4", "jesse_dance.mp4", "yoga.mp4"])
def test_sample_videos_match_pllava_reference(shared_videos, name):
    video_mod = pytest.importorskip("pllava_fast.video")
    path = str(shared_videos / name)
    planes = video_mod.read_video(path, 4)                  # YUV planes into the op
    rgb = video_mod.read_video(path, 4, keep_yuv=False)     # FFmpeg's rgb24 into PIL + CLIP
    ref = pllava_reference([list(rgb.rgb.numpy())])
    assert_pixels_close(frames_to_pixel_values(planes), ref)
    assert_pixels_close(frames_to_pixel_values(rgb), ref)
