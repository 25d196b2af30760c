"""Attention backends for the LLM, plugged into transformers' attention registry.

``install_attention(model)`` points the language model's config at a registered attention function
(``"pllava_fast"``, or ``"pllava_fast_sdpa"`` / ``"pllava_fast_fa"`` to force a backend), so the
transformers Llama / Mistral modules run unchanged. Per call:

* K/V from a ``QuantizedKVCache`` (a ``QuantizedKV`` handle): one new token -> the fused
  ``pllava_fast.ops.decode_attention`` over codes + window; several tokens -> SDPA over the
  dequantized cache (chunked prefill, rare).
* plain K/V tensors: flash-attn (``flash_attn_func`` / ``flash_attn_varlen_func`` for left-padded
  prefill) when it is importable, the tensors are fp16/bf16 on CUDA and the mask is plain causal
  (+ padding); otherwise transformers' SDPA path (torch picks its flash kernel on CUDA).

The mask function registered with each name is transformers' ``sdpa_mask`` (boolean 4D masks),
without which transformers would silently drop padding for a custom attention name.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import ops
from .quantized_cache import QuantizedKV

BACKENDS = ("auto", "flash", "sdpa")
# no "flash" in the names: transformers gives any such name its own flash-attn loading path
ATTENTION_NAMES = {"auto": "pllava_fast", "flash": "pllava_fast_fa", "sdpa": "pllava_fast_sdpa"}
# what users call the attention: transformers' names -> our backends ("eager" stays transformers')
ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2", None)
_BACKEND_OF = {"auto": "auto", "sdpa": "sdpa", "flash_attention_2": "flash"}
# the attn_implementation values of from_pretrained that run pllava-fast attention
PLLAVA_ATTENTION = ("sdpa", "flash_attention_2")


@functools.lru_cache(maxsize=None)
def _flash_attn():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        return importlib.import_module("flash_attn")
    except ImportError:  # installed but built for another torch / CUDA
        return None


def flash_available(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" and _flash_attn() is not None


def select_backend(query: Tensor, backend: str = "auto") -> str:
    """The backend a call with these inputs uses: "flash" or "sdpa"."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if backend == "sdpa":
        return "sdpa"
    usable = flash_available(query.device) and query.dtype in (torch.float16, torch.bfloat16)
    if backend == "flash" and not usable:
        raise ValueError(
            f"flash backend needs the flash_attn package and fp16/bf16 CUDA tensors, got "
            f"{query.dtype} on {query.device} (flash_attn importable: {_flash_attn() is not None})")
    return "flash" if usable else "sdpa"


def _is_causal_padding_mask(mask: Tensor, key_valid: Tensor) -> bool:
    """True when a (B, 1, q, q) boolean mask is exactly causal AND key padding."""
    q = mask.shape[-1]
    causal = torch.ones(q, q, dtype=torch.bool, device=mask.device).tril()
    return bool(torch.equal(mask[:, 0], causal[None] & key_valid[:, None, :]))


def _flash_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal):
    """flash-attn for (B, H, L, D) inputs; ``None`` when the mask is not one it can express.

    Unverified: flash-attn cannot be installed on the development machines; tests run this
    against a fake module with flash-attn's signatures.
    """
    fa = _flash_attn()
    b, hq, q_len, d = query.shape
    kv_len = key.shape[2]
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)) and q_len > 1
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # flash layout (B, L, H, D)
    if attention_mask is None:
        if causal and kv_len != q_len:
            return None
        return fa.flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=scaling, causal=causal)
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4 or q_len != kv_len or q_len == 1:
        return None
    key_valid = attention_mask[:, 0, -1, :].expand(b, -1)
    if not _is_causal_padding_mask(attention_mask, key_valid):
        return None
    # left-padded prefill: unpad to variable-length sequences
    seqlens = key_valid.sum(-1, dtype=torch.int32)
    cu = torch.nn.functional.pad(seqlens.cumsum(0, dtype=torch.int32), (1, 0))
    max_len = int(seqlens.max())
    idx = key_valid.flatten().nonzero().squeeze(-1)
    pack = lambda t: t.reshape(b * kv_len, t.shape[2], d).index_select(0, idx)  # noqa: E731
    out = fa.flash_attn_varlen_func(pack(q), pack(k), pack(v), cu, cu, max_len, max_len,
                                    dropout_p=dropout, softmax_scale=scaling, causal=causal)
    full = out.new_zeros(b * q_len, hq, d)
    full.index_copy_(0, idx, out)
    return full.view(b, q_len, hq, d)


def _quantized_forward(module, query, handle: QuantizedKV, attention_mask, dropout, scaling, **kwargs):
    if query.shape[2] == 1:
        kv_mask = None
        if attention_mask is not None:
            if attention_mask.dtype != torch.bool:
                raise ValueError(
                    f"quantized decode needs a boolean attention mask (sdpa_mask), got {attention_mask.dtype}")
            # batch-broadcast masks (size-1 batch dim) are expanded: the op wants (B, L)
            kv_mask = attention_mask[:, 0, -1, :].expand(query.shape[0], -1)
        out = ops.decode_attention(query[:, :, 0], sm_scale=scaling,
                                   **handle.decode_inputs(kv_mask))
        return out[:, None], None
    key, value = handle.dequantize(query.dtype)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def attention_forward(module, query: Tensor, key, value, attention_mask: Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, backend: str = "auto", **kwargs):
    """transformers attention-function contract: (B, Hq, q, D) query, (B, Hkv, L, D) key/value or
    ``QuantizedKV`` handles -> ((B, q, Hq, D) output, None)."""
    if isinstance(key, QuantizedKV):
        return _quantized_forward(module, query, key, attention_mask, dropout, scaling, **kwargs)
    if select_backend(query, backend) == "flash" and not kwargs.get("output_attentions"):
        out = _flash_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal)
        if out is not None:
            return out, None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, is_causal=is_causal, **kwargs)


def register() -> None:
    """Register the attention functions and their mask function with transformers (idempotent)."""
    for backend, name in ATTENTION_NAMES.items():
        AttentionInterface.register(name, functools.partial(attention_forward, backend=backend))
        AttentionMaskInterface.register(name, sdpa_mask)


def resolve_attention(attention: str | None) -> str | None:
    """The attention implementation name to install in a language model.

    "auto" / "sdpa" / "flash_attention_2" -> pllava-fast's registered attention (per call: flash-attn
    when usable on CUDA, else torch SDPA; "sdpa" / "flash_attention_2" force one), which also reads
    quantized KV caches; "eager" -> transformers' eager attention; None -> leave it.
    """
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
    if attention in (None, "eager"):
        return attention
    register()
    return ATTENTION_NAMES[_BACKEND_OF[attention]]


def install_attention(model, backend: str = "auto"):
    """Make ``model``'s language model use pllava-fast attention; returns the model.

    ``model`` is a PLLaVA model (its ``language_model`` is used) or a transformers causal LM.
    ``backend``: "auto" (per call: flash-attn when usable, else SDPA), "flash" or "sdpa" (also
    as transformers calls them: "flash_attention_2" is "flash").
    """
    backend = _BACKEND_OF.get(backend, backend)
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    register()
    lm = getattr(model, "language_model", None) or model
    name = ATTENTION_NAMES[backend]
    if hasattr(lm, "set_attn_implementation"):
        lm.set_attn_implementation(name)
    else:
        lm.config._attn_implementation = name
    return model


register()
