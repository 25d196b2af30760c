"""Preprocessing benchmark (b): 16 decoded 720p frames -> (16, 3, 336, 336) model input.

* from RGB: PLLaVA's path (transformers' PIL resize + PllavaProcessor's crop, then
  CLIPImageProcessorPil) vs ``frames_to_pixel_values`` on the (T, H, W, 3) uint8 frames;
* from YUV planes: FFmpeg's swscale rgb24 conversion + the same PIL path vs the op on the
  decoder's yuv420p planes (on CUDA: the planes uploaded from pinned memory, timed).

Both sides produce the same pixels (tests/test_preprocess.py). Run:

    python -m benchmarks.bench_preprocess [--device cpu|cuda] [--frames 16] [--repeats 10]

Writes benchmarks/results/frames_preprocess-<device>.json.
"""
from __future__ import annotations

import argparse
import io

import av
import numpy as np
import PIL.Image
import torch
from transformers.image_transforms import get_resize_output_image_size, resize
from transformers.image_utils import ChannelDimension, PILImageResampling
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from pllava_fast import _ext
from pllava_fast.preprocess import frames_to_pixel_values, pllava_geometry
from pllava_fast.testing import mux_frames
from pllava_fast.video import DecodedVideo

from .harness import compare, write_results

CLIP = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})


def decoded_frames(num_frames: int = 16, size=(1280, 720)):
    """Frames of a short textured h264 clip: (list of av.VideoFrame yuv420p, rgb24 (T,H,W,3),
    (y, u, v) planes as uint8 tensors)."""
    w, h = size
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (h // 16 + 2, w // 16 + 2, 3), dtype=np.uint8)
    base = np.asarray(PIL.Image.fromarray(coarse).resize((w, h), PIL.Image.BILINEAR))
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"preset": "ultrafast", "crf": "20"}
        mux_frames(c, s, [np.clip(np.roll(base, 8 * i, axis=1) + rng.normal(0, 5, base.shape),
                                  0, 255).astype(np.uint8) for i in range(num_frames)])
    buf.seek(0)
    with av.open(buf) as c:
        frames = list(c.decode(video=0))

    def plane(f, i, ph, pw):
        p = f.planes[i]
        return np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:ph, :pw]

    rgb = np.stack([f.to_ndarray(format="rgb24") for f in frames])
    ch, cw = (h + 1) // 2, (w + 1) // 2
    planes = tuple(torch.from_numpy(np.stack([plane(f, i, ph, pw) for f in frames]))
                   for i, (ph, pw) in enumerate([(h, w), (ch, cw), (ch, cw)]))
    return frames, rgb, planes


def pllava_pil_preprocess(frames_rgb) -> np.ndarray:
    """PLLaVA's preprocessing of one video, as the original runs it (PIL, frame by frame)."""
    last = ChannelDimension.LAST
    h, w = frames_rgb[0].shape[:2]
    g = pllava_geometry([(h, w)])[0]  # the shared-size arithmetic; the pixels are PIL's
    short = min(g[0], g[1])
    out = []
    for f in frames_rgb:
        size = get_resize_output_image_size(f, size=short, default_to_square=False, max_size=9999,
                                            input_data_format=last)
        r = resize(f, size=size, resample=PILImageResampling.BICUBIC, input_data_format=last)
        out.append(r[g[2]:g[2] + g[4], g[3]:g[3] + g[5]])
    return CLIP(out, return_tensors="np")["pixel_values"]


def make_cases(num_frames: int = 16, device: str = "cpu", dtype=torch.float32):
    """{name: (baseline, ours, extra)} for the RGB and the YUV starting points."""
    av_frames, rgb, (y, u, v) = decoded_frames(num_frames)
    rgb_t = torch.from_numpy(rgb)
    video = DecodedVideo(source="bench.mp4", indices=list(range(num_frames)), fps=30.0,
                                   num_frames_total=num_frames, pixel_format="yuv420p",
                                   y=y, u=u, v=v, color_matrix="bt601", color_range="limited")
    if device == "cuda":
        y, u, v = (p.pin_memory() for p in (y, u, v))
        video.y, video.u, video.v = y, u, v
        rgb_t = rgb_t.pin_memory()

    def base_rgb():
        return pllava_pil_preprocess(list(rgb))

    def ours_rgb():
        return frames_to_pixel_values(rgb_t, device=device, dtype=dtype)

    def base_yuv():
        return pllava_pil_preprocess([f.to_ndarray(format="rgb24") for f in av_frames])

    def ours_yuv():
        return frames_to_pixel_values(video, device=device, dtype=dtype)

    out_bytes = num_frames * 3 * 336 * 336 * torch.empty((), dtype=dtype).element_size()
    rgb_bytes = rgb.nbytes
    yuv_bytes = y.numel() + u.numel() + v.numel()
    return {
        "from_rgb": (base_rgb, ours_rgb, {"input": f"rgb24 {tuple(rgb.shape)}",
                                          "bytes_moved": rgb_bytes + out_bytes}),
        "from_yuv": (base_yuv, ours_yuv, {"input": f"yuv420p planes {tuple(y.shape)}",
                                          "bytes_moved": yuv_bytes + out_bytes}),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    records = []
    for name, (base, ours, extra) in make_cases(args.frames, args.device, dtype).items():
        bytes_moved = extra.pop("bytes_moved")
        rec = compare(f"preprocess_{name}", base, ours, device=args.device, repeats=args.repeats,
                      bytes_moved=bytes_moved, frames=args.frames, frame_size="1280x720",
                      output=f"({args.frames}, 3, 336, 336) {args.dtype}",
                      baseline_impl="swscale rgb24 + " * (name == "from_yuv")
                      + "PIL bicubic resize/crop + CLIPImageProcessorPil",
                      ours_impl="pllava_fast::frames_to_tensor (" + ("C++" if _ext.available() else
                                                               "torch fallback") + ")",
                      target=">= 5x on CPU, >= 20x on CUDA incl. YUV upload", **extra)
        rec["frames_per_s_ours"] = args.frames / rec["ours_s"]
        rec["frames_per_s_baseline"] = args.frames / rec["baseline_s"]
        records.append(rec)
        print(f"{name}: baseline {rec['baseline_s'] * 1e3:.1f} ms, ours {rec['ours_s'] * 1e3:.1f} ms, "
              f"{rec['speedup']:.1f}x")
    path = write_results("frames_preprocess", records, device=args.device, dtype=dtype,
                         threads=torch.get_num_threads())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
