"""What the op families share: the dtypes the Triton kernels take, the token-tensor checks and
when a wrapper traces its implementation instead of calling its op."""
from __future__ import annotations

import torch
from torch import Tensor

# dtypes the Triton kernels take (fp32 accumulation); others (fp64) stay on the torch path
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def in_cpu_graph(t: Tensor) -> bool:
    """True while torch.compile traces a call on CPU tensor ``t``: there a wrapper may return its
    plain-torch implementation, which inductor fuses with the graph around it, where the custom
    op would stay one opaque call with its own dispatch cost."""
    return t.device.type == "cpu" and torch.compiler.is_compiling()


def check_tokens(x, layout: str) -> None:
    """ValueError unless ``x`` is a non-empty floating 3-d tensor (``layout`` names its dims)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape {layout}, got rank {x.dim()} shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be floating point, got dtype {x.dtype}")
