"""The one op registry of pllava-fast, split by op family.

Every public op is a ``torch.library`` custom op in the ``pllava_fast::`` namespace with a fake
(meta) implementation, so ``torch.compile`` and ``torch.export`` trace through it. Dispatch rule:
CUDA tensors run the Triton kernel (or the CUDA extension); CPU tensors run a vectorised torch or
C++ implementation, never the Triton interpreter. Each file reads: validating public wrapper
(``ValueError`` naming the problem) -> custom op -> CUDA registration -> fake -> CPU implementation.

* ``pooling``: ``pool_visual_tokens`` (act + PLLaVA's adaptive 3-D pool, fused)
* ``norms``: ``token_norms``, ``norm_stats``, ``token_norm_stats``
* ``frames``: ``frames_to_tensor`` (decoded frames -> model input, csrc/)
* ``kv_quant``: ``quantize_kv``; ``kv_attention``: ``decode_attention``
"""
from ..kernels.adaptive import ACTIVATIONS, apply_activation
from .kv_attention import decode_attention
from .frames import CLIP_MEAN, CLIP_STD, COLOR_MATRICES, FRAME_DTYPES, frames_to_tensor
from .kv_quant import KV_BITS, quantize_kv
from .norms import TokenNormStats, norm_stats, token_norm_stats, token_norms
from .pooling import pool_visual_tokens

__all__ = ["ACTIVATIONS", "CLIP_MEAN", "CLIP_STD", "COLOR_MATRICES", "FRAME_DTYPES", "KV_BITS",
           "TokenNormStats", "apply_activation", "decode_attention", "frames_to_tensor",
           "norm_stats", "pool_visual_tokens", "quantize_kv", "token_norm_stats", "token_norms"]
