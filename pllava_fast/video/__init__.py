"""Frame sampling and video decoding: PLLaVA's frame-index rules and a PyAV reader that decodes
only the sampled frames and hands back raw YUV planes (colour conversion happens in the batched
preprocessing op, not here).

Conventions of ``read_video``:

* Frame index ``i`` is, by default (``numbering="decord"``), the picture decord 0.6.0's
  ``get_batch`` returns for index i, so PLLaVA's indices pick the original's frames
  (``decord_order``). With ``numbering="presentation"`` it is the i-th frame of PyAV's full
  sequential decode of the first video stream, i.e. the frame with the i-th smallest pts
  (frames the decoder drops, such as an edit list's pre-roll, are not counted). For variable
  frame rate,
  indices count frames, not time; ``fps`` is the stream's average rate, used only for the
  time-bound rule, as PLLaVA does with decord's average fps.
* Frame count: one demux pass reads every packet of the stream (no decoding; about 70 ms for
  60 s of 720p h264 here) and counts them, so a missing or wrong container count does not
  matter. Where packets carry no usable pts (AVI with B-frames, raw streams) or the decoder's
  output disagrees with the packet table, frames are counted by decoding the whole stream
  (one full decode; a second, shorter one if the packet count was off).
* Seeking: the same pass gives each frame's decode position and keyframe. A greedy plan starts
  a new run at a target's keyframe only when that decodes fewer frames (plus a small per-seek
  cost) than decoding on; long GOPs therefore become one forward pass. Each run ends by
  draining the decoder, so no packet past the last target is decoded. Every output frame is
  checked against the table; a mismatch falls back to counting.
* Pixels: 8-bit 4:2:0 (yuv420p, yuvj420p, nv12) tagged BT.601/BT.709 or untagged stay Y/U/V
  planes (untagged = BT.601 limited range, yuvj = full range, as FFmpeg assumes). Any other
  format (4:4:4, 4:2:2, 10-bit, gray, palette/GIF, other matrices) becomes rgb24 through
  swscale with the stream's matrix and range. Images are read with PIL as rgb24.
* Rotation: the display matrix (``VideoFrame.rotation``) in quarter turns, applied to the planes
  as FFmpeg's autorotate would (flips in the matrix are ignored); EXIF orientation for images.

Modules: ``sampling`` (PLLaVA's indices), ``sources`` (what can be read), ``table`` (the demux
pass), ``decode`` (seek plans), ``frames`` (``DecodedVideo`` and pixel formats), ``read``
(``read_video`` / ``read_videos``).
"""
import importlib

# public name -> submodule; loaded on first use, so ``pllava_fast.video.extensions`` (and the
# CLI's checks) import without torch
_EXPORTS = {
    "DecodedVideo": "frames", "VideoDecodeError": "frames", "frame_to_rgb": "frames", "NUMBERINGS": "read",
    "frame_to_yuv420": "frames", "read_video": "read", "read_videos": "read",
    "sample_indices": "sampling", "frame_files": "sources", "IMAGE_EXTENSIONS": "extensions",
    "MEDIA_EXTENSIONS": "extensions", "VIDEO_EXTENSIONS": "extensions",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
