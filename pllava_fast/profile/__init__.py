"""Profiling high-norm visual tokens: per-token L2 norms at three points of the visual pipeline,
their statistics, ``report.json`` / ``report.md`` and PNG plots, and the ``profile`` subcommand.

Points (names used throughout the report):

``vision``
    the vision tower's ``vision_feature_layer`` output, CLS dropped: a (T, H, W) grid per video
    (T = sampled frames, H x W = the patch grid, 24 x 24 for CLIP ViT-L/14-336).
``projector``
    the projector output in PLLaVA's original order, ``linear_2(act(linear_1(x)))`` on every
    token before pooling: (num_frames, H, W). Computed only here (the fast path never builds it).
``pooled``
    the pooled visual tokens fed to the LLM (the projector's real forward): (t, h, w) =
    ``pooling_shape``.

Norms come from ``pllava_fast.ops.token_norms`` (a Triton kernel on CUDA). Statistics use the
standard median (mean of the two middle values for an even count) and the population std.

Modules: ``statistics`` (grid statistics), ``capture`` (norms from the model, ``NormRecorder``),
``report`` (JSON / Markdown / PNG), ``plots`` (matplotlib figures).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import Tensor

from ..preprocess import frames_to_pixel_values
from ..inputs import expand_sources
from ..video.read import read_video
from .capture import POINTS, NormRecorder, TokenNorms, capture_token_norms, norms_from_features
from .report import (SCHEMA, SCHEMA_VERSION, _prepare_out_dir, _versions, _write_json,
                     build_report, model_info, render_summary_markdown, summary_row, write_report)
from .statistics import grid_statistics, pooling_effect

__all__ = ["NormRecorder", "POINTS", "SCHEMA", "SCHEMA_VERSION", "TokenNorms", "build_report",
           "capture_token_norms", "grid_statistics", "model_info", "norms_from_features",
           "pooling_effect", "profile_video", "profile_videos", "write_report"]


def _read_frames(source, num_frames: int):
    """A path / DecodedVideo / (T, H, W, 3) uint8 frames -> (decoded input, info dict)."""
    if isinstance(source, (str, os.PathLike)):
        path = str(source)
        try:
            video = read_video(path, num_frames)
        except (FileNotFoundError, PermissionError):
            raise
        except Exception as exc:  # decoder errors come in many types; name the file once
            msg = str(exc).replace(f"{path}: ", "", 1)
            raise ValueError(f"cannot read video {path}: {msg}") from exc
    else:
        video = source
    if hasattr(video, "num_frames_total"):  # a DecodedVideo
        info = {"source": str(video.source), "frame_indices": [int(i) for i in video.indices],
                "fps": video.fps, "num_frames_total": int(video.num_frames_total),
                "height": int(video.height), "width": int(video.width)}
    else:
        video = torch.as_tensor(video)
        if video.dim() != 4 or video.shape[-1] != 3 or video.dtype != torch.uint8:
            raise ValueError(f"frames must be a (T, H, W, 3) uint8 array, got {video.dtype} "
                             f"{tuple(video.shape)}")
        info = {"source": "<frames>", "frame_indices": list(range(video.shape[0])), "fps": None,
                "num_frames_total": int(video.shape[0]), "height": int(video.shape[1]),
                "width": int(video.shape[2])}
    info["num_frames_sampled"] = len(info["frame_indices"])
    return video, info


def _thumbnails(pixel_values: Tensor) -> Tensor:
    """(T, 3, S, S) model input -> (T, S, S, 3) uint8 for display (per-frame min-max stretch, so it
    does not depend on the normalisation constants)."""
    x = pixel_values.detach().float().cpu()
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-6)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters())
    return param.device, param.dtype


def profile_video(model, video, *, out_dir=None, num_frames: int | None = None, k: float = 5.0,
                  top: int = 10, plots: bool = True, model_name: str | None = None) -> dict:
    """Profile the visual-token norms of one video.

    Args:
        model: a PLLaVA model (``PllavaForConditionalGeneration``; e.g. ``testing.tiny_pllava()[0]``).
        video: a path, a ``DecodedVideo``, or (T, H, W, 3) uint8 frames.
        out_dir: when given, report.json, report.md and the PNGs are written there.
        num_frames: frames to sample (default ``model.config.num_frames``).
        k: outlier threshold in multiples of the median.
        top: number of top tokens listed per point.
        plots: write the PNGs (only with out_dir).
        model_name: what the report calls the model (default: its config's path/name).

    Returns the report dict (the content of report.json, see the README for the schema).
    """
    if out_dir is not None:
        _prepare_out_dir(out_dir)  # fail before the expensive part
    num_frames = int(num_frames or model.config.num_frames)
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    sources = expand_sources(video)
    if len(sources) != 1:
        raise ValueError(f"{video} holds {len(sources)} videos: use profile_videos for several")
    source = sources[0]
    timing = {}
    t0 = time.perf_counter()
    decoded, info = _read_frames(source, num_frames)
    device, dtype = _model_device_dtype(model)
    pixel_values = frames_to_pixel_values(
        decoded, device=device, dtype=dtype, image_size=int(model.config.vision_config.image_size))
    timing["decode_preprocess"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    (norms,) = capture_token_norms(model, pixel_values, [pixel_values.shape[0]])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timing["capture"] = time.perf_counter() - t0
    report = build_report(norms, k=k, top=top, video=info, model=model_info(model, model_name),
                          config={"num_frames": num_frames})
    report["timing_s"] = timing
    if out_dir is not None:
        report = write_report(report, norms, out_dir, _thumbnails(pixel_values), plots=plots)
    return report


def _unique_names(sources) -> list[str]:
    names, seen = [], {}
    for i, s in enumerate(sources):
        base = Path(str(s)).stem if isinstance(s, (str, os.PathLike)) else f"video{i}"
        base = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in base) or f"video{i}"
        n = seen.get(base, 0)
        seen[base] = n + 1
        names.append(base if n == 0 else f"{base}_{n + 1}")
    return names


def profile_videos(model, videos, out_dir, *, num_frames: int | None = None, k: float = 5.0,
                   top: int = 10, plots: bool = True, model_name: str | None = None) -> dict:
    """Profile several videos (paths, folders, DecodedVideos or frame arrays): one report per video
    in ``out_dir/<video name>/`` plus ``summary.json`` and ``summary.md`` in out_dir.

    Returns the summary dict (content of summary.json)."""
    sources = expand_sources(videos)
    out = _prepare_out_dir(out_dir)
    rows = []
    for name, source in zip(_unique_names(sources), sources):
        report = profile_video(model, source, out_dir=out / name, num_frames=num_frames, k=k,
                               top=top, plots=plots, model_name=model_name)
        rows.append(summary_row(name, report))
    summary = {
        "schema": "pllava-fast/profile-summary",
        "schema_version": SCHEMA_VERSION,
        "model": model_info(model, model_name),
        "config": {"k": float(k), "top": int(top),
                   "num_frames": int(num_frames or model.config.num_frames)},
        "versions": _versions(),
        "videos": rows,
    }
    _write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(render_summary_markdown(summary), encoding="utf-8")
    return summary
