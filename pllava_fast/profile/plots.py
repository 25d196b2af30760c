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

    # hand-placed axes: constrained layout costs seconds on a 32-panel strip
    fig = Figure(figsize=figsize, dpi=DPI)
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
_PANEL_IN = 0.9 * _CELL_IN   # square panel; the rest of a column is the gap to the next one
_TITLE_IN = 0.25             # a panel title above a row
_GAP_IN = 0.05


def heatmap_figsize(num_frames: int, with_frames: bool = False) -> tuple[float, float]:
    """Figure size (inches) of :func:`plot_heatmaps` for a clip of ``num_frames`` frames."""
    cols = min(num_frames, HEATMAP_COLS)
    strips = math.ceil(num_frames / HEATMAP_COLS)
    strip_h = _TITLE_IN + (2 if with_frames else 1) * (_PANEL_IN + _GAP_IN)
    return cols * _CELL_IN + 1.3, strips * strip_h + 0.5


def plot_heatmaps(
    path,
    grid: np.ndarray,
    top_tokens: Sequence[Mapping],
    title: str,
    frames: np.ndarray | None = None,
    frame_labels: Sequence[str] | None = None,
) -> tuple[int, int]:
    """Per-frame token-norm heatmaps (log colour scale shared by all frames), top tokens circled.

    Frames run left to right, ``HEATMAP_COLS`` per strip, strips top to bottom.

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
    fig_w, fig_h = heatmap_figsize(t_len, with_frames)
    fig = _figure((fig_w, fig_h))
    fig.suptitle(title, fontsize=12, y=1 - 0.12 / fig_h, va="top")

    def add_axes(x_in, y_in, w_in, h_in):
        return fig.add_axes((x_in / fig_w, y_in / fig_h, w_in / fig_w, h_in / fig_h))

    positive = grid[grid > 0]
    vmax = float(grid.max()) if grid.size else 1.0
    vmin = float(positive.min()) if positive.size else vmax / 10
    if not vmin < vmax:  # constant grid: give LogNorm a non-empty range
        vmin, vmax = vmax / 2 if vmax > 0 else 0.5, vmax if vmax > 0 else 1.0
    norm = LogNorm(vmin=vmin, vmax=vmax)
    by_frame: dict[int, list[tuple[int, Mapping]]] = {}
    for rank, tok in enumerate(top_tokens, 1):
        by_frame.setdefault(int(tok["frame"]), []).append((rank, tok))
    radius = max(0.45, max(h, w) / 20)
    image = None
    top_y = fig_h - 0.45
    strip_h = _TITLE_IN + (2 if with_frames else 1) * (_PANEL_IN + _GAP_IN)
    for t in range(t_len):
        strip, col = divmod(t, HEATMAP_COLS)
        x = 0.1 + col * _CELL_IN
        y = top_y - strip * strip_h - _TITLE_IN - _PANEL_IN
        label = frame_labels[t] if frame_labels is not None else f"frame {t}"
        targets = []
        if with_frames:
            ax_img = add_axes(x, y, _PANEL_IN, _PANEL_IN)
            ax_img.imshow(frames[t], extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="bilinear")
            ax_img.set_title(label, fontsize=8)
            targets.append(ax_img)
            y -= _PANEL_IN + _GAP_IN
        ax = add_axes(x, y, _PANEL_IN, _PANEL_IN)
        image = ax.imshow(np.clip(grid[t], vmin, None), cmap="magma", norm=norm,
                          interpolation="nearest")
        if not with_frames:
            ax.set_title(label, fontsize=8)
        targets.append(ax)
        for target in targets:
            target.set_axis_off()
            for rank, tok in by_frame.get(t, []):
                r, c = int(tok["row"]), int(tok["col"])
                target.add_patch(_circle((c, r), radius))
                target.annotate(str(rank), (c, r), xytext=(4, 4), textcoords="offset points",
                                color="cyan", fontsize=7, fontweight="bold")
    if image is not None:
        bottom = top_y - math.ceil(t_len / HEATMAP_COLS) * strip_h
        cax = add_axes(0.1 + min(t_len, HEATMAP_COLS) * _CELL_IN + 0.1, bottom + _GAP_IN, 0.18,
                       top_y - _TITLE_IN - bottom - _GAP_IN)
        cbar = fig.colorbar(image, cax=cax)
        _plain_log_ticks(cbar.ax.yaxis, vmin, vmax)
        cbar.ax.tick_params(which="both", labelsize=7)
        cbar.set_label("token L2 norm (log scale)")
    return _save(fig, path)


def _plain_log_ticks(axis, lo: float, hi: float) -> None:
    """Plain numbers (0.5, 20, 300) on a log axis; minor ticks labelled only when the range spans
    less than a decade (it then has at most one major tick)."""
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    axis.set_major_formatter(FormatStrFormatter("%.3g"))
    axis.set_minor_formatter(FormatStrFormatter("%.3g") if hi < 10 * lo else NullFormatter())


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
    fig.subplots_adjust(left=0.065, right=0.985, bottom=0.11, top=0.93, wspace=0.2)
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
    x_lo, x_hi = ax.get_xlim()
    _plain_log_ticks(ax.xaxis, x_lo, x_hi)
    y_lo, y_hi = ax.get_ylim()
    _plain_log_ticks(ax.yaxis, y_lo, y_hi)
    ax.tick_params(which="minor", labelsize=7)
    ax.set_xlabel("token L2 norm (log)")
    ax.set_ylabel("fraction of tokens (log)")
    ax.plot([], [], color="gray", linestyle="--", label="median")
    ax.plot([], [], color="gray", linestyle=":", label=f"{k:g} x median")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(True, which="major", alpha=0.3)


# ---------------------------------------------------------------------------------------------
# Per-frame max / median curves
# ---------------------------------------------------------------------------------------------
CURVES_FIGSIZE = (12.0, 7.0)


def plot_curves(path, per_frame: Mapping[str, Mapping[str, Sequence[float]]]) -> tuple[int, int]:
    """Per-frame max and median norms (top; log scale when they span more than a decade) and their
    ratio, the dominance (bottom). Legends sit to the right, outside the data.

    Args:
        per_frame: point name -> {"x": frame positions, "max": [...], "median": [...],
            "dominance": [...]}; ``x`` is in units of the model's input frames so that pooled
            frames (each the average of a window of input frames) sit at their window's centre.
    """
    fig = _figure(CURVES_FIGSIZE)
    ax_n, ax_d = fig.subplots(2, 1, sharex=True)
    fig.subplots_adjust(left=0.07, right=0.74, bottom=0.08, top=0.95, hspace=0.18)
    values = []
    for name, series in per_frame.items():
        color = _COLORS.get(name)
        label = POINT_LABELS.get(name, name)
        x = np.asarray(series["x"], dtype=np.float64)
        ax_n.plot(x, series["max"], "-o", color=color, markersize=3, label=f"{label}: max")
        ax_n.plot(x, series["median"], "--s", color=color, markersize=3, alpha=0.7,
                  label=f"{label}: median")
        values += [v for v in (*series["max"], *series["median"]) if v is not None and v > 0]
        dom = [np.nan if d is None else d for d in series["dominance"]]
        ax_d.plot(x, dom, "-o", color=color, markersize=3, label=label)
    if values and max(values) > 10 * min(values):
        ax_n.set_yscale("log")
        _plain_log_ticks(ax_n.yaxis, *ax_n.get_ylim())
    ax_n.set_ylabel("token L2 norm")
    ax_n.set_title("per-frame max (solid) and median (dashed) token norm", fontsize=11)
    ax_n.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax_n.grid(True, alpha=0.3)
    ax_d.set_ylabel("max / median")
    ax_d.set_xlabel("frame (model input frames; pooled frames at their window centre)")
    ax_d.set_title("per-frame dominance ratio (max / median)", fontsize=11)
    ax_d.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax_d.grid(True, alpha=0.3)
    return _save(fig, path)
