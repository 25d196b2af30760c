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
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from . import ops
from .preprocess import frames_to_pixel_values

POINTS = ("vision", "projector", "pooled")
SCHEMA = "pllava-fast/profile-report"
SCHEMA_VERSION = 1
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".ts", ".gif")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# ---------------------------------------------------------------------------------------------
# Statistics of a norm grid
# ---------------------------------------------------------------------------------------------
def _ratio(num: float, den: float) -> float | None:
    """num / den, or None (JSON null) when den is 0."""
    return float(num / den) if den > 0 else None


def _row_stats(x: Tensor, k: float) -> dict[str, Tensor]:
    """Statistics of each row of x (R, n) fp32 norms -> dict of (R,) tensors. Mean, max and the
    count above k x median come from the norm-statistics op (one Triton pass on CUDA)."""
    med = torch.quantile(x, 0.5, dim=1)
    st = ops.norm_stats(x, k * med)
    return {
        "mean": st.mean,
        "median": med,
        "std": x.double().std(dim=1, correction=0),
        "min": x.amin(dim=1),
        "max": st.max,
        "count_above_k": st.count_above,
        "fraction_above_k": st.count_above.double() / x.shape[1],
    }


def _row_dict(stats: Mapping[str, Tensor], i: int) -> dict:
    out = {key: (int(v[i]) if key == "count_above_k" else float(v[i])) for key, v in stats.items()}
    out["dominance"] = _ratio(out["max"], out["median"])
    return out


def pool_windows(in_size: int, out_size: int) -> list[tuple[int, int]]:
    """[start, end) input ranges of each output cell of adaptive average pooling (as torch)."""
    return [((i * in_size) // out_size, -((-(i + 1) * in_size) // out_size))
            for i in range(out_size)]


def grid_statistics(norms: Tensor, k: float = 5.0, top: int = 10,
                    source_grid: Sequence[int] | None = None) -> dict:
    """Statistics of one (T, H, W) grid of token norms.

    Args:
        norms: (T, H, W) non-negative norms (any float dtype or device).
        k: tokens above ``k`` x median count as outliers (``fraction_above_k``).
        top: how many of the largest tokens to list.
        source_grid: (T, H, W) of the grid this one was adaptively pooled from; each top token
            then also names the input window it averages (``window``: [start, end) per axis).

    Returns a dict: ``grid`` [T, H, W]; ``overall`` and ``per_frame`` (a list, one per frame) with
    mean / median / std / min / max / dominance (max / median; null if the median is 0) /
    count_above_k / fraction_above_k (per frame relative to that frame's own median);
    ``top_tokens`` largest first as {rank, frame, row, col, norm, ratio_to_median} (ties: lower
    flat index first).
    """
    if not isinstance(norms, Tensor) or norms.dim() != 3 or norms.numel() == 0:
        raise ValueError(f"norms must be a non-empty (T, H, W) tensor, got "
                         f"{getattr(norms, 'shape', type(norms).__name__)}")
    if not k > 0:
        raise ValueError(f"k must be positive, got {k}")
    if int(top) < 0:
        raise ValueError(f"top must be >= 0, got {top}")
    g = norms.detach().float()
    t_len, h, w = g.shape
    overall = _row_dict(_row_stats(g.reshape(1, -1), k), 0)
    per_frame_stats = _row_stats(g.reshape(t_len, -1), k)
    per_frame = [{"frame": t, **_row_dict(per_frame_stats, t)} for t in range(t_len)]
    flat = g.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices[: int(top)].cpu()
    flat = flat.cpu()
    windows = None
    if source_grid is not None:
        windows = [pool_windows(int(i), int(o)) for i, o in zip(source_grid, (t_len, h, w))]
    top_tokens = []
    for rank, idx in enumerate(order.tolist(), 1):
        t, rem = divmod(idx, h * w)
        r, c = divmod(rem, w)
        tok = {"rank": rank, "frame": t, "row": r, "col": c, "norm": float(flat[idx]),
               "ratio_to_median": _ratio(float(flat[idx]), overall["median"])}
        if windows is not None:
            tok["window"] = {"frames": list(windows[0][t]), "rows": list(windows[1][r]),
                             "cols": list(windows[2][c])}
        top_tokens.append(tok)
    return {"grid": [t_len, h, w], "k": float(k), "overall": overall, "per_frame": per_frame,
            "top_tokens": top_tokens}


def pooling_effect(before: Mapping, after: Mapping) -> dict:
    """How pooling changes the outliers, from the ``grid_statistics`` of the projector output
    (before) and of the pooled tokens (after): dominance before / after, the drop (before - after),
    the factor (before / after), and the outlier fractions."""
    db, da = before["overall"]["dominance"], after["overall"]["dominance"]
    return {
        "before": "projector",
        "after": "pooled",
        "dominance_before": db,
        "dominance_after": da,
        "dominance_drop": None if db is None or da is None else db - da,
        "dominance_factor": None if db is None or not da else db / da,
        "max_before": before["overall"]["max"],
        "max_after": after["overall"]["max"],
        "fraction_above_k_before": before["overall"]["fraction_above_k"],
        "fraction_above_k_after": after["overall"]["fraction_above_k"],
    }


# ---------------------------------------------------------------------------------------------
# Capturing the norms from the model
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class TokenNorms:
    """Norm grids of one video: point name -> (T, H, W) fp32 CPU tensor (see module docstring)."""

    vision: Tensor
    projector: Tensor
    pooled: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        return {p: getattr(self, p) for p in POINTS}


def _frame_shape(model, tokens_per_frame: int) -> tuple[int, int]:
    shape = getattr(model.config, "frame_shape", None)
    if shape is not None and int(shape[0]) * int(shape[1]) == tokens_per_frame:
        return int(shape[0]), int(shape[1])
    side = math.isqrt(tokens_per_frame)
    if side * side != tokens_per_frame:
        raise ValueError(f"cannot lay out {tokens_per_frame} tokens per frame as a grid; set "
                         "config.frame_shape")
    return side, side


def _activate(projector, x: Tensor) -> Tensor:
    act = projector.act
    return ops.apply_activation(x, act) if isinstance(act, str) else act(x)


def _grid_norms(x: Tensor, grid: Sequence[int]) -> Tensor:
    """(..., C) tokens -> fp32 CPU norms shaped ``grid``."""
    return ops.token_norms(x.reshape(1, -1, x.shape[-1])).reshape(*grid).cpu()


@torch.no_grad()
def norms_from_features(model, features: Tensor,
                        frames_per_video: Sequence[int] | None = None) -> list[TokenNorms]:
    """Token norms at the three points, from vision features.

    Args:
        model: a PLLaVA model (``prepare_video_frames``, ``multi_modal_projector``, ``config``).
        features: (sum of frames, H*W, D_vision), the output of ``model.vision_features``.
        frames_per_video: frames of each video in ``features`` (default: all ``num_frames``).

    Returns one :class:`TokenNorms` per video.
    """
    if not isinstance(features, Tensor) or features.dim() != 3:
        raise ValueError(f"features must be a (frames, H*W, D) tensor, got "
                         f"{getattr(features, 'shape', type(features).__name__)}")
    cfg = model.config
    num_frames = int(cfg.num_frames)
    if frames_per_video is None:
        if features.shape[0] % num_frames:
            raise ValueError(f"{features.shape[0]} frames are not a multiple of num_frames="
                             f"{num_frames}; pass frames_per_video")
        frames_per_video = [num_frames] * (features.shape[0] // num_frames)
    frames_per_video = [int(n) for n in frames_per_video]
    if sum(frames_per_video) != features.shape[0] or min(frames_per_video, default=0) <= 0:
        raise ValueError(f"frames_per_video {frames_per_video} does not add up to the "
                         f"{features.shape[0]} frames of features")
    out = []
    for feats in torch.split(features, frames_per_video):
        prepared = model.prepare_video_frames(feats, [feats.shape[0]])
        pooled = model.multi_modal_projector(prepared, num_frames)
        out.append(_video_norms(model, feats, prepared, pooled[0]))
    return out


def _video_norms(model, vision: Tensor, prepared: Tensor, pooled: Tensor) -> TokenNorms:
    """One video's norm grids: vision (T, H*W, D_v) features, the projector's input prepared
    (num_frames, H*W, D_v) and its pooled output (t*h*w, D_llm). Adds the original-order
    projector pass linear_2(act(linear_1(prepared)))."""
    projector = model.multi_modal_projector
    h, w = _frame_shape(model, vision.shape[1])
    full = projector.linear_2(_activate(projector, projector.linear_1(prepared)))
    return TokenNorms(
        vision=_grid_norms(vision, (vision.shape[0], h, w)),
        projector=_grid_norms(full, (prepared.shape[0], h, w)),
        pooled=_grid_norms(pooled, _pooled_grid(model, pooled.shape[0], (prepared.shape[0], h, w))),
    )


def _pooled_grid(model, num_tokens: int, source: Sequence[int]) -> tuple[int, int, int]:
    shape = getattr(model.config, "pooling_shape", None)
    if shape is not None and math.prod(int(v) for v in shape) == num_tokens:
        return tuple(int(v) for v in shape)
    if math.prod(source) == num_tokens:  # pooling disabled: tokens keep the input grid
        return tuple(source)
    raise ValueError(f"the projector returned {num_tokens} tokens per video, which matches neither "
                     f"pooling_shape {shape} nor the input grid {tuple(source)}")


@torch.no_grad()
def capture_token_norms(model, pixel_values: Tensor,
                        frames_per_video: Sequence[int] | None = None) -> list[TokenNorms]:
    """Token norms at the three points for (sum of frames, 3, S, S) pixel values: one
    :class:`TokenNorms` per video (runs the vision tower once, the projector twice)."""
    features = model.vision_features(pixel_values)
    return norms_from_features(model, features, frames_per_video)


class NormRecorder:
    """Records the token norms of every video the model's projector sees while the context is
    open, e.g. during ``model.generate(...)`` on real inputs::

        with NormRecorder(model) as rec:
            model.generate(**inputs, pixel_values=pv, max_new_tokens=64)
        report = build_report(rec.norms[0])

    A forward hook on ``model.multi_modal_projector`` reads its input and pooled output and adds
    the original-order projector pass; generation itself is unchanged. Here the ``vision`` point is
    the projector's input, i.e. after PLLaVA's short-clip repeat (num_frames frames per video).
    ``norms``: one :class:`TokenNorms` per video, in call order.
    """

    def __init__(self, model):
        self.model = model
        self.norms: list[TokenNorms] = []
        self._handle = None

    def __enter__(self) -> "NormRecorder":
        self._handle = self.model.multi_modal_projector.register_forward_hook(
            self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @torch.no_grad()
    def _hook(self, module, args, kwargs, output) -> None:
        features = args[0] if args else kwargs["features"]
        num_frames = int(args[1] if len(args) > 1 else kwargs["num_frames"])
        for v, prepared in enumerate(torch.split(features, num_frames)):
            self.norms.append(_video_norms(self.model, prepared, prepared, output[v]))


# ---------------------------------------------------------------------------------------------
# Video input
# ---------------------------------------------------------------------------------------------
def _is_single_video(obj) -> bool:
    return (isinstance(obj, (str, os.PathLike, Tensor)) or hasattr(obj, "num_frames_total")
            or hasattr(obj, "__array_interface__") or not isinstance(obj, Iterable))


def _expand_sources(videos) -> list:
    """Videos to profile, paths checked to exist. A folder holding video files expands to them
    (sorted); a folder of images only is one video (numbered frames, as ``read_video`` reads it).
    In-memory videos (DecodedVideo, frame arrays) pass through."""
    if _is_single_video(videos):
        videos = [videos]
    out = []
    for v in videos:
        if not isinstance(v, (str, os.PathLike)):
            out.append(v)
            continue
        p = Path(v)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file())
            found = [f for f in files if f.suffix.lower() in VIDEO_SUFFIXES]
            if found:
                out.extend(found)
            elif any(f.suffix.lower() in IMAGE_SUFFIXES for f in files):
                out.append(p)
            else:
                raise ValueError(f"no video files ({', '.join(VIDEO_SUFFIXES)}) or image frames "
                                 f"in folder {p}")
        elif not p.exists():
            raise FileNotFoundError(f"video not found: {p}")
        else:
            out.append(p)
    if not out:
        raise ValueError("no videos given: pass at least one video file or folder")
    return out


def _read_frames(source, num_frames: int):
    """A path / DecodedVideo / (T, H, W, 3) uint8 frames -> (decoded input, info dict)."""
    from .video import read_video

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


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------
def _versions() -> dict:
    import importlib.metadata as md

    from . import __version__

    out = {"pllava_fast": __version__, "python": platform.python_version(),
           "platform": platform.platform()}
    for name in ("torch", "transformers", "triton", "av", "numpy", "matplotlib"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def model_info(model, name: str | None = None) -> dict:
    """What the report says about the model (its path or name, and the visual-pipeline config)."""
    cfg = model.config
    param = next(model.parameters(), None)
    vision = getattr(cfg, "vision_config", None)
    text = getattr(cfg, "text_config", None)
    act = getattr(model.multi_modal_projector, "act", None)
    return {
        "name": name or getattr(cfg, "_name_or_path", None) or type(model).__name__,
        "vision_feature_layer": getattr(cfg, "vision_feature_layer", None),
        "image_size": getattr(vision, "image_size", None),
        "patch_size": getattr(vision, "patch_size", None),
        "vision_hidden_size": getattr(vision, "hidden_size", None),
        "text_hidden_size": getattr(text, "hidden_size", None),
        "frame_shape": list(getattr(cfg, "frame_shape", []) or []),
        "pooling_shape": list(getattr(cfg, "pooling_shape", []) or []),
        "num_frames": getattr(cfg, "num_frames", None),
        "projector_act": act if isinstance(act, str) else type(act).__name__,
        "dtype": str(param.dtype).replace("torch.", "") if param is not None else None,
        "device": str(param.device) if param is not None else None,
    }


def build_report(norms: TokenNorms, *, k: float = 5.0, top: int = 10, video: Mapping | None = None,
                 model: Mapping | None = None, config: Mapping | None = None) -> dict:
    """report.json's content (without ``plots`` and ``timing_s``) from one video's norm grids."""
    points = {
        "vision": grid_statistics(norms.vision, k, top),
        "projector": grid_statistics(norms.projector, k, top),
        "pooled": grid_statistics(norms.pooled, k, top, source_grid=tuple(norms.projector.shape)),
    }
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "video": dict(video or {}),
        "model": dict(model or {}),
        "config": {"k": float(k), "top": int(top), **dict(config or {})},
        "versions": _versions(),
        "points": points,
        "pooling": pooling_effect(points["projector"], points["pooled"]),
    }


def _frame_positions(n_out: int, n_in: int) -> list[float]:
    """Centre of each adaptive-pooling window, in input-frame units."""
    return [(s + e - 1) / 2 for s, e in pool_windows(n_in, n_out)]


def write_plots(report: dict, norms: TokenNorms, out_dir, thumbnails: Tensor | None = None) -> dict:
    """Write the PNGs into out_dir; returns {name: {"file", "width", "height"}}."""
    from . import plots

    out_dir = Path(out_dir)
    pts = report["points"]
    k = report["config"]["k"]
    src = report["video"].get("frame_indices")
    written = {}

    def record(name, size):
        written[name] = {"file": f"{name}.png", "width": size[0], "height": size[1]}

    for point in POINTS:
        grid = norms.as_dict()[point].numpy()
        if point == "vision" and src and len(src) == grid.shape[0]:
            labels = [f"frame {t} (#{i})" for t, i in enumerate(src)]
        elif point == "pooled":
            n_in = norms.projector.shape[0]
            labels = [f"t={t} (frames {s}-{e - 1})" if e - s > 1 else f"t={t} (frame {s})"
                      for t, (s, e) in enumerate(pool_windows(n_in, grid.shape[0]))]
        else:
            labels = [f"frame {t}" for t in range(grid.shape[0])]
        frames = None
        if point == "vision" and thumbnails is not None and len(thumbnails) == grid.shape[0]:
            frames = thumbnails.numpy()
        st = pts[point]["overall"]
        dom = st["dominance"]
        title = (f"{plots.POINT_LABELS[point]}: token norms {tuple(grid.shape)}; "
                 f"max/median {_fmt(dom)}")
        title += f"; top {len(pts[point]['top_tokens'])} tokens circled"
        record(f"heatmaps_{point}", plots.plot_heatmaps(
            out_dir / f"heatmaps_{point}.png", grid, pts[point]["top_tokens"], title,
            frames=frames, frame_labels=labels))
    record("histogram", plots.plot_histogram(
        out_dir / "histogram.png", {p: norms.as_dict()[p].numpy() for p in POINTS}, k))
    n_in = norms.projector.shape[0]
    curves = {}
    for point in POINTS:
        pf = pts[point]["per_frame"]
        x = (_frame_positions(len(pf), n_in) if point == "pooled" else list(range(len(pf))))
        curves[point] = {"x": x, "max": [f["max"] for f in pf], "median": [f["median"] for f in pf],
                         "dominance": [f["dominance"] for f in pf]}
    record("curves", plots.plot_curves(out_dir / "curves.png", curves))
    return written


def _fmt(v, digits=3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.4g}"
    return str(v)


def render_markdown(report: dict) -> str:
    """report.md: the key numbers and the embedded plots."""
    v, m, pts, pool = report["video"], report["model"], report["points"], report["pooling"]
    k = report["config"]["k"]
    lines = [
        f"# Visual-token norm profile: {Path(str(v.get('source', 'video'))).name}",
        "",
        f"Model `{m.get('name')}` ({m.get('dtype')}, {m.get('device')}), "
        f"{v.get('num_frames_sampled')} sampled frames {v.get('frame_indices')} of "
        f"{v.get('num_frames_total')}; pooling {m.get('pooling_shape')}; k = {k:g}.",
        "",
        "| point | grid | mean | median | std | max | max/median | "
        f"tokens > {k:g} x median |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for point in POINTS:
        o = pts[point]["overall"]
        lines.append(
            f"| {point} | {'x'.join(map(str, pts[point]['grid']))} | {_fmt(o['mean'])} | "
            f"{_fmt(o['median'])} | {_fmt(o['std'])} | {_fmt(o['max'])} | {_fmt(o['dominance'])} | "
            f"{o['count_above_k']} ({100 * o['fraction_above_k']:.2f}%) |")
    lines += [
        "",
        f"**Pooling effect:** max/median {_fmt(pool['dominance_before'])} before pooling -> "
        f"{_fmt(pool['dominance_after'])} after (drop {_fmt(pool['dominance_drop'])}, "
        f"factor {_fmt(pool['dominance_factor'])}); tokens above {k:g} x median "
        f"{100 * pool['fraction_above_k_before']:.2f}% -> {100 * pool['fraction_above_k_after']:.2f}%.",
        "",
    ]
    for point in ("vision", "pooled"):
        lines += [f"Top tokens, {point}:", "", "| rank | frame | row | col | norm | x median |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for tok in pts[point]["top_tokens"]:
            lines.append(f"| {tok['rank']} | {tok['frame']} | {tok['row']} | {tok['col']} | "
                         f"{_fmt(tok['norm'], 4)} | {_fmt(tok['ratio_to_median'])} |")
        lines.append("")
    plots_ = report.get("plots", {})
    captions = {
        "heatmaps_vision": "Vision feature layer: per-frame token norms (log colour), top tokens circled",
        "heatmaps_projector": "Projector output before pooling",
        "heatmaps_pooled": "Pooled tokens fed to the LLM",
        "histogram": "Norm histograms (log-log): dashed = median, dotted = k x median",
        "curves": "Per-frame max and median norms, and their ratio",
    }
    for name, caption in captions.items():
        if name in plots_:
            lines += [f"### {caption}", "", f"![{name}]({plots_[name]['file']})", ""]
    return "\n".join(lines)


def _prepare_out_dir(out_dir) -> Path:
    """Create out_dir if needed and check that files can be written there."""
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise ValueError(f"output directory {p} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"output directory {p} cannot be created: {exc.strerror or exc}") from exc
    probe = p / ".pllava-fast-write-test"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise PermissionError(f"output directory {p} is not writable: {exc.strerror or exc}") from exc
    return p


def _json_default(obj):
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_report(report: dict, norms: TokenNorms, out_dir, thumbnails: Tensor | None = None,
                 plots: bool = True) -> dict:
    """Write report.json, report.md and (when ``plots``) the PNGs into out_dir; returns the report
    with ``plots`` filled in (and ``timing_s.plots`` when the report has ``timing_s``)."""
    out_dir = _prepare_out_dir(out_dir)
    report = dict(report)
    t0 = time.perf_counter()
    report["plots"] = write_plots(report, norms, out_dir, thumbnails) if plots else {}
    if "timing_s" in report:
        report["timing_s"] = {**report["timing_s"], "plots": time.perf_counter() - t0}
    _write_json(out_dir / "report.json", report)
    (out_dir / "report.md").write_text(render_markdown(report) + "\n", encoding="utf-8")
    return report


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=False, default=_json_default)


# ---------------------------------------------------------------------------------------------
# Python API
# ---------------------------------------------------------------------------------------------
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
    sources = _expand_sources(video)
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


def summary_row(name: str, report: Mapping) -> dict:
    """One line of the summary table."""
    pts, pool = report["points"], report["pooling"]
    top = pts["vision"]["top_tokens"][0] if pts["vision"]["top_tokens"] else None
    return {
        "name": name,
        "video": report["video"].get("source"),
        "report": f"{name}/report.json",
        "frames": report["video"].get("num_frames_sampled"),
        "vision_dominance": pts["vision"]["overall"]["dominance"],
        "projector_dominance": pool["dominance_before"],
        "pooled_dominance": pool["dominance_after"],
        "dominance_drop": pool["dominance_drop"],
        "dominance_factor": pool["dominance_factor"],
        "fraction_above_k_before": pool["fraction_above_k_before"],
        "fraction_above_k_after": pool["fraction_above_k_after"],
        "vision_top_token": top and {kk: top[kk] for kk in ("frame", "row", "col", "norm")},
    }


def render_summary_markdown(summary: Mapping) -> str:
    k = summary["config"]["k"]
    lines = [
        f"# Visual-token norm profile: {len(summary['videos'])} videos",
        "",
        f"Model `{summary['model'].get('name')}`; k = {k:g}. max/median = dominance ratio; "
        "before = projector output before pooling, after = pooled tokens fed to the LLM.",
        "",
        "| video | vision max/median | before pooling | after pooling | drop | "
        f"> {k:g} x median before -> after | top vision token (frame, row, col: norm) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary["videos"]:
        t = r["vision_top_token"]
        top = f"({t['frame']}, {t['row']}, {t['col']}): {_fmt(t['norm'], 4)}" if t else "n/a"
        lines.append(
            f"| [{r['name']}]({r['name']}/report.md) | {_fmt(r['vision_dominance'])} | "
            f"{_fmt(r['projector_dominance'])} | {_fmt(r['pooled_dominance'])} | "
            f"{_fmt(r['dominance_drop'])} | {100 * r['fraction_above_k_before']:.2f}% -> "
            f"{100 * r['fraction_above_k_after']:.2f}% | {top} |")
    return "\n".join(lines) + "\n"


def profile_videos(model, videos, out_dir, *, num_frames: int | None = None, k: float = 5.0,
                   top: int = 10, plots: bool = True, model_name: str | None = None) -> dict:
    """Profile several videos (paths, folders, DecodedVideos or frame arrays): one report per video
    in ``out_dir/<video name>/`` plus ``summary.json`` and ``summary.md`` in out_dir.

    Returns the summary dict (content of summary.json)."""
    sources = _expand_sources(videos)
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


# ---------------------------------------------------------------------------------------------
# CLI: pllava-fast profile VIDEO... [--model DIR] --out DIR
# ---------------------------------------------------------------------------------------------
def configure_parser(p) -> None:
    p.add_argument("videos", nargs="+", metavar="VIDEO",
                   help="video files or folders of videos (one report each)")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="PLLaVA checkpoint directory (default: a tiny random model, for a demo)")
    p.add_argument("--out", metavar="DIR", required=True, help="output directory")
    p.add_argument("--num-frames", type=int, default=None,
                   help="frames sampled per video (default: the model's num_frames)")
    p.add_argument("--k", type=float, default=5.0,
                   help="outlier threshold: tokens above K x median are counted (default 5)")
    p.add_argument("--top", type=int, default=10, help="top tokens listed per point (default 10)")
    p.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--no-plots", action="store_true", help="write report.json/.md only")


def _load_model(args):
    from .pipeline import resolve_dtype

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, device)  # None: bf16 on CUDA, fp32 on CPU
    if args.model is None:
        from .testing import tiny_pllava

        model, _ = tiny_pllava()
        name = "tiny random PLLaVA (pllava_fast.testing)"
    else:
        if not Path(args.model).is_dir():
            raise FileNotFoundError(f"model directory not found: {args.model}")
        from .model import PllavaForConditionalGeneration

        model = PllavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype,
                                                               device=device)
        return model.eval(), str(args.model)
    return model.to(device=device, dtype=dtype).eval(), name


def run(args) -> int:
    try:
        if args.k <= 0:
            raise ValueError(f"--k must be positive, got {args.k}")
        if args.top < 0:
            raise ValueError(f"--top must be >= 0, got {args.top}")
        if args.num_frames is not None and args.num_frames <= 0:
            raise ValueError(f"--num-frames must be positive, got {args.num_frames}")
        sources = _expand_sources(args.videos)
        out = _prepare_out_dir(args.out)
        model, name = _load_model(args)
        kw = dict(num_frames=args.num_frames, k=args.k, top=args.top, plots=not args.no_plots,
                  model_name=name)
        if len(sources) == 1:
            report = profile_video(model, sources[0], out_dir=out, **kw)
            pool = report["pooling"]
            print(f"{sources[0]}: max/median {_fmt(pool['dominance_before'])} before pooling -> "
                  f"{_fmt(pool['dominance_after'])} after; report: {out / 'report.md'}")
        else:
            summary = profile_videos(model, sources, out, **kw)
            for r in summary["videos"]:
                print(f"{r['video']}: max/median {_fmt(r['projector_dominance'])} -> "
                      f"{_fmt(r['pooled_dominance'])}")
            print(f"summary: {out / 'summary.md'}")
    except (OSError, ValueError) as exc:
        print(f"pllava-fast profile: error: {exc}", file=sys.stderr)
        return 1
    return 0
