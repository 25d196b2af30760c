"""PNG plots of visual-token norms for the profile report (matplotlib, headless).

Figures are built with ``matplotlib.figure.Figure`` on the Agg canvas (no pyplot, no global state,
no display needed) and saved at a fixed size: a figure of ``(w, h)`` inches is ``(100 w, 100 h)``
pixels, so readers and tests can rely on the sizes returned by the ``*_figsize`` helpers.

Point names are those of :mod:`pllava_fast.profile`: ``vision`` (vision feature layer output),
``projector`` (projector output before pooling), ``pooled`` (visual tokens fed to the LLM).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

DPI = 100
HEATMAP_COLS = 8            # frames per strip row; longer clips wrap onto further rows
_CELL_IN = 1.9              # inches per frame panel
_COLORS = {"vision": "#1f77b4", "projector": "#d62728", "pooled": "#2ca02c"}
POINT_LABELS = {
    "vision": "vision feature layer",
    "projector": "projector output, before pooling",
    "pooled": "pooled tokens fed to the LLM",
}


def _figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> tuple[int, int]:
    path = Path(path)
    fig.savefig(path, dpi=DPI, facecolor="white")  # no bbox_inches="tight": keeps the size fixed
    w, h = fig.get_size_inches()
    return int(round(w * DPI)), int(round(h * DPI))


def pixel_size(figsize) -> tuple[int, int]:
    """(width, height) in pixels of a saved figure of ``figsize`` inches."""
    return int(round(figsize[0] * DPI)), int(round(figsize[1] * DPI))


# ---------------------------------------------------------------------------------------------
# Per-frame heatmaps, laid out as a frame strip
# ---------------------------------------------------------------------------------------------
def heatmap_figsize(num_frames: int, with_frames: bool = False) -> tuple[float, float]:
    """Figure size (inches) of :func:`plot_heatmaps` for a clip of ``num_frames`` frames."""
    cols = min(num_frames, HEATMAP_COLS)
    strips = math.ceil(num_frames / HEATMAP_COLS)
    # square panels come out ~0.9 _CELL_IN wide (colorbar, padding); a titled row needs ~0.3 in
    side = 0.9 * _CELL_IN
    row_h = 2 * side + 0.35 if with_frames else side + 0.3
    return cols * _CELL_IN + 1.2, strips * row_h + 0.6


def plot_heatmaps(
    path,
    grid: np.ndarray,
    top_tokens: Sequence[Mapping],
    title: str,
    frames: np.ndarray | None = None,
    frame_labels: Sequence[str] | None = None,
) -> tuple[int, int]:
    """Per-frame token-norm heatmaps (log colour scale shared by all frames), top tokens circled.

    Args:
        grid: (T, H, W) token norms.
        top_tokens: dicts with ``frame``, ``row``, ``col`` (and ``norm``), largest first; each is
            circled and numbered by rank on its frame.
        frames: optional (T, h, w, 3) uint8 images drawn above their heatmaps (the model's input
            frames, so a token's (row, col) is the same place in both).
        frame_labels: per-frame panel titles (default ``frame t``).

    Returns the saved PNG's (width, height) in pixels.
    """
    from matplotlib.colors import LogNorm

    grid = np.asarray(grid, dtype=np.float64)
    t_len, h, w = grid.shape
    with_frames = frames is not None
    fig = _figure(heatmap_figsize(t_len, with_frames))
    fig.suptitle(title, fontsize=12)
    cols = min(t_len, HEATMAP_COLS)
    strips = math.ceil(t_len / HEATMAP_COLS)
    rows_per_strip = 2 if with_frames else 1
    axes = fig.subplots(strips * rows_per_strip, cols, squeeze=False)
    positive = grid[grid > 0]
    vmax = float(grid.max()) if grid.size else 1.0
    vmin = float(positive.min()) if positive.size else vmax / 10
    if not vmin < vmax:  # constant grid: give LogNorm a non-empty range
        vmin, vmax = vmax / 2 if vmax > 0 else 0.5, vmax if vmax > 0 else 1.0
    norm = LogNorm(vmin=vmin, vmax=vmax)
    by_frame: dict[int, list[tuple[int, Mapping]]] = {}
    for rank, tok in enumerate(top_tokens, 1):
        by_frame.setdefault(int(tok["frame"]), []).append((rank, tok))
    image = None
    for ax in axes.flat:
        ax.set_axis_off()
    for t in range(t_len):
        strip, col = divmod(t, HEATMAP_COLS)
        label = frame_labels[t] if frame_labels is not None else f"frame {t}"
        if with_frames:
            ax_img = axes[strip * 2, col]
            ax_img.imshow(frames[t], extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
            ax_img.set_title(label, fontsize=8)
        ax = axes[strip * rows_per_strip + rows_per_strip - 1, col]
        image = ax.imshow(np.clip(grid[t], vmin, None), cmap="magma", norm=norm,
                          interpolation="nearest")
        if not with_frames:
            ax.set_title(label, fontsize=8)
        for rank, tok in by_frame.get(t, []):
            r, c = int(tok["row"]), int(tok["col"])
            for target in ([ax_img, ax] if with_frames else [ax]):
                target.add_patch(_circle((c, r), max(0.45, max(h, w) / 20)))
                target.annotate(str(rank), (c, r), xytext=(3, 3), textcoords="offset points",
                                color="cyan", fontsize=7, fontweight="bold")
    if image is not None:
        cbar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, pad=0.01)
        cbar.set_label("token L2 norm (log scale)")
    return _save(fig, path)


def _circle(center, radius):
    from matplotlib.patches import Circle

    return Circle(center, radius=radius, fill=False, edgecolor="cyan", linewidth=1.4)


# ---------------------------------------------------------------------------------------------
# Histogram before vs after pooling
# ---------------------------------------------------------------------------------------------
HISTOGRAM_FIGSIZE = (13.0, 4.8)


def plot_histogram(path, norms: Mapping[str, np.ndarray], k: float) -> tuple[int, int]:
    """Log-scale norm histograms: left the vision layer, right the projector before vs after pooling.

    Bins are log-spaced, counts are fractions of each point's tokens on a log axis (so a handful of
    outliers stays visible next to thousands of ordinary tokens); dashed lines mark each point's
    median, dotted lines ``k`` x median.
    """
    fig = _figure(HISTOGRAM_FIGSIZE)
    ax_v, ax_p = fig.subplots(1, 2)
    _hist_panel(ax_v, {p: norms[p] for p in ("vision",) if p in norms}, k,
                "vision feature layer output")
    _hist_panel(ax_p, {p: norms[p] for p in ("projector", "pooled") if p in norms}, k,
                "projector output: before vs after pooling")
    return _save(fig, path)


def _hist_panel(ax, series: Mapping[str, np.ndarray], k: float, title: str) -> None:
    ax.set_title(title, fontsize=11)
    values = [np.asarray(v, dtype=np.float64).ravel() for v in series.values()]
    positive = np.concatenate([v[v > 0] for v in values]) if values else np.empty(0)
    if positive.size == 0:
        ax.text(0.5, 0.5, "no positive norms", ha="center", transform=ax.transAxes)
        return
    lo, hi = positive.min(), positive.max()
    if hi <= lo:
        lo, hi = lo / 1.5, hi * 1.5
    bins = np.geomspace(lo, hi * 1.0001, 60)
    for name, v in zip(series, values):
        v = v[v > 0]
        color = _COLORS.get(name)
        ax.hist(v, bins=bins, weights=np.full(v.size, 1.0 / v.size), histtype="stepfilled",
                alpha=0.35, color=color, edgecolor=color, linewidth=1.2,
                label=f"{POINT_LABELS.get(name, name)} ({v.size} tokens)")
        med = float(np.median(v))
        ax.axvline(med, color=color, linestyle="--", linewidth=1)
        ax.axvline(k * med, color=color, linestyle=":", linewidth=1.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("token L2 norm (log)")
    ax.set_ylabel("fraction of tokens (log)")
    ax.plot([], [], color="gray", linestyle="--", label="median")
    ax.plot([], [], color="gray", linestyle=":", label=f"{k:g} x median")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, which="major", alpha=0.3)


# ---------------------------------------------------------------------------------------------
# Per-frame max / median curves
# ---------------------------------------------------------------------------------------------
CURVES_FIGSIZE = (11.0, 7.0)


def plot_curves(path, per_frame: Mapping[str, Mapping[str, Sequence[float]]]) -> tuple[int, int]:
    """Per-frame max and median norms (top, log) and their ratio, the dominance (bottom).

    Args:
        per_frame: point name -> {"x": frame positions, "max": [...], "median": [...],
            "dominance": [...]}; ``x`` is in units of the model's input frames so that pooled
            frames (each the average of a window of input frames) sit at their window's centre.
    """
    fig = _figure(CURVES_FIGSIZE)
    ax_n, ax_d = fig.subplots(2, 1, sharex=True)
    for name, series in per_frame.items():
        color = _COLORS.get(name)
        label = POINT_LABELS.get(name, name)
        x = np.asarray(series["x"], dtype=np.float64)
        ax_n.plot(x, series["max"], "-o", color=color, markersize=3, label=f"{label}: max")
        ax_n.plot(x, series["median"], "--s", color=color, markersize=3, alpha=0.7,
                  label=f"{label}: median")
        dom = [np.nan if d is None else d for d in series["dominance"]]
        ax_d.plot(x, dom, "-o", color=color, markersize=3, label=label)
    ax_n.set_yscale("log")
    ax_n.set_ylabel("token L2 norm (log)")
    ax_n.set_title("per-frame max and median token norm", fontsize=11)
    ax_n.legend(fontsize=7, ncol=3, loc="best")
    ax_n.grid(True, alpha=0.3)
    ax_d.set_ylabel("max / median")
    ax_d.set_xlabel("frame (model input frames; pooled frames at their window centre)")
    ax_d.set_title("per-frame dominance ratio", fontsize=11)
    ax_d.legend(fontsize=8, loc="best")
    ax_d.grid(True, alpha=0.3)
    return _save(fig, path)
