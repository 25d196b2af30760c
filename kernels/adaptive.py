"""The math the pooling kernel shares with its CPU implementation and the reports (torch only).

Imports without Triton, so the CPU paths and the profiling reports use the same definitions as
the kernel in ``pooling.py``:

* activations by transformers' name, in the order of the kernel's ``ACT`` constexpr codes;
* ``torch.nn.AdaptiveAvgPool`` windows: cell ``i`` of an axis of length ``In`` pooled to ``Out``
  covers ``[floor(i * In / Out), ceil((i + 1) * In / Out))``, so windows overlap when
  ``In % Out != 0`` and cells repeat when ``Out > In``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# the kernel's constexpr ACT is the index into this tuple
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "quick_gelu", "identity")


def apply_activation(x: Tensor, act: str) -> Tensor:
    """Plain-torch activation by transformers' name (``gelu`` is the exact erf form)."""
    if act == "gelu":
        return F.gelu(x)
    if act == "gelu_pytorch_tanh":
        return F.gelu(x, approximate="tanh")
    if act == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if act == "identity":
        return x
    raise ValueError(f"unsupported activation {act!r}; expected one of {ACTIVATIONS}")


def pool_windows(size_in: int, size_out: int) -> list[tuple[int, int]]:
    """[start, end) input range of each output cell of adaptive average pooling along one axis."""
    return [((i * size_in) // size_out, -((-(i + 1) * size_in) // size_out))
            for i in range(size_out)]


def max_window(size_in: int, size_out: int) -> int:
    """Largest window along one axis of length size_in pooled to size_out."""
    return max(end - start for start, end in pool_windows(size_in, size_out))


def pooling_matrix(size_in: int, size_out: int, device=None) -> Tensor:
    """(size_out, size_in) fp32 averaging matrix: row i is 1/n over cell i's window."""
    m = torch.zeros(size_out, size_in, dtype=torch.float32)
    for i, (start, end) in enumerate(pool_windows(size_in, size_out)):
        m[i, start:end] = 1.0 / (end - start)
    return m.to(device) if device is not None else m
