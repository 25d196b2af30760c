"""``pllava_fast::quantize_kv``: int8 / int4 / fp8 codes of KV rows (format:
``kernels/kv_format.py``).

Wrapper (validates) -> custom op (CUDA: the Triton kernels of ``kernels/kv_quant.py``; fp8, and
CPU: the plain-torch format definition) -> fake. Inside a CPU torch.compile graph the wrapper
traces the definition instead (a handful of elementwise ops that inductor fuses) unless the
last of several groups is short.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..checks import is_int, power_of_two
from ..kernels import kv_format
from ._common import TRITON_DTYPES, in_cpu_graph

KV_BITS = (4, 8, 16)


def quantize_kv(x: Tensor, bits: int = 4, group_size: int = 64, key_block: int = 0,
                fp8: bool = False):
    """Asymmetric int8 / int4, or symmetric fp8 (e4m3, ``fp8=True`` with ``bits=8``),
    quantization of KV rows (format in ``kernels/kv_format.py``).

    Args:
        x: (N, D) floating, one row per (sequence, head, token).
        bits: 8 or 4 (int4 packs two codes per byte). D must be even.
        group_size: channels per scale group (power of two), for token groups.
        key_block: 0 for token groups; else KIVI-style per-channel groups over ``key_block``
            consecutive rows (a power of two dividing N).

    Returns:
        codes (N, D or D // 2) uint8 (float8_e4m3fn for fp8), scale and zero float32:
        (N, ceil(D / group_size)) for token groups, (N // key_block, D) for channel groups.
    """
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x must be a floating (N, D) tensor, got {getattr(x, 'dtype', type(x))} "
                         f"{tuple(getattr(x, 'shape', ()))}")
    # bool and float are refused, not truncated: bits=4.0 or key_block=True are mistakes
    if not is_int(bits) or bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    if x.shape[1] == 0 or x.shape[1] % 2:
        raise ValueError(f"KV quantization needs an even head dim >= 2, got {x.shape[1]}")
    group_size = power_of_two("group_size", group_size, minimum=2)
    if not is_int(key_block) or key_block < 0 or (
            key_block and (key_block & (key_block - 1) or x.shape[0] % key_block)):
        raise ValueError(f"key_block must be 0 or a power of two dividing N={x.shape[0]}, "
                         f"got {key_block!r}")
    if not isinstance(fp8, bool) or fp8 and (bits != 8 or key_block):
        raise ValueError(f"fp8 codes are bits=8 with token groups (key_block=0), got fp8={fp8!r} "
                         f"bits={bits} key_block={key_block}")
    args = (x.contiguous(), int(bits), int(group_size), int(key_block), fp8)
    d = x.shape[1]
    partial = not key_block and d > group_size and d % group_size  # several groups, last short
    if in_cpu_graph(x) and not partial:
        # the definition, traced; not with a short last group: there torch 2.13's CPU inductor
        # wrote wrong 8-bit codes for a single row (head dim 80 or 200, groups of 64) once fused
        # with the cache write
        return _quantize_kv_cpu(*args)
    return _quantize_kv_op(*args)


@torch.library.custom_op("pllava_fast::quantize_kv", mutates_args=())
def _quantize_kv_op(x: Tensor, bits: int, group_size: int, key_block: int,
                    fp8: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _quantize_kv_cpu(x, bits, group_size, key_block, fp8)


def _quantize_kv_cpu(x, bits, group_size, key_block, fp8):
    """The format's own definition (plain torch): the CPU implementation, and the GPU's for fp8
    and fp64."""
    if fp8:
        return kv_format.quantize_fp8_ref(x, group_size)
    if key_block:
        return kv_format.quantize_channels_ref(x, bits, key_block)
    return kv_format.quantize_groups_ref(x, bits, group_size)


@_quantize_kv_op.register_kernel("cuda")
def _quantize_kv_cuda(x, bits, group_size, key_block, fp8):
    # imported here: Triton (and its interpreter flag) only matters once a kernel runs
    from ..kernels import kv_quant

    if fp8 or x.dtype not in TRITON_DTYPES:
        # fp8: elementwise torch (the GPU converts to e4m3 natively, Hopper / Ada); fp64: the
        # format's plain-torch definition, on the GPU
        return _quantize_kv_cpu(x, bits, group_size, key_block, fp8)
    if key_block:
        return kv_quant._quantize_channels(x, bits, key_block)
    return kv_quant._quantize_groups(x, bits, group_size)


@_quantize_kv_op.register_fake
def _(x, bits, group_size, key_block, fp8):
    n, d = x.shape
    codes = x.new_empty(n, d // 2 if bits == 4 else d,
                        dtype=torch.float8_e4m3fn if fp8 else torch.uint8)
    shape = (n // key_block, d) if key_block else (n, -(-d // group_size))
    return codes, x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)
