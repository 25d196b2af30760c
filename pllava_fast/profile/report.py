"""Reports: ``report.json`` (schema ``pllava-fast/profile-report``), ``report.md``, the PNG
plots and the multi-video summary."""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Mapping

from torch import Tensor

from ..kernels.adaptive import pool_windows
from . import plots as figures
from .capture import POINTS, TokenNorms
from .statistics import grid_statistics, pooling_effect

SCHEMA = "pllava-fast/profile-report"
SCHEMA_VERSION = 1


def _versions() -> dict:
    import importlib.metadata as md

    from .. import __version__

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
        title = (f"{figures.POINT_LABELS[point]}: token norms {tuple(grid.shape)}; "
                 f"max/median {_fmt(dom)}")
        title += f"; top {len(pts[point]['top_tokens'])} tokens circled"
        record(f"heatmaps_{point}", figures.plot_heatmaps(
            out_dir / f"heatmaps_{point}.png", grid, pts[point]["top_tokens"], title,
            frames=frames, frame_labels=labels))
    record("histogram", figures.plot_histogram(
        out_dir / "histogram.png", {p: norms.as_dict()[p].numpy() for p in POINTS}, k))
    n_in = norms.projector.shape[0]
    curves = {}
    for point in POINTS:
        pf = pts[point]["per_frame"]
        x = (_frame_positions(len(pf), n_in) if point == "pooled" else list(range(len(pf))))
        curves[point] = {"x": x, "max": [f["max"] for f in pf], "median": [f["median"] for f in pf],
                         "dominance": [f["dominance"] for f in pf]}
    record("curves", figures.plot_curves(out_dir / "curves.png", curves))
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
