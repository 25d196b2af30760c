"""Statistics of a grid of token norms: per frame and overall, the top tokens, and what pooling
does to the outliers. Medians are the standard median (mean of the two middle values for an even
count); std is the population std."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import Tensor

from .. import ops
from ..kernels.adaptive import pool_windows


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
