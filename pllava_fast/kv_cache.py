"""Fresh KV caches from a ``kv_spec.KVCacheSpec``, and teacher-forced logits to compare them."""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicCache, StaticCache

from .compat import cache_kwarg_name
from .kv_spec import DEFAULT_KIND, KVCacheSpec
from .quantized_cache import QuantizedKVCache
from .static_cache import StaticQuantizedCache


def make_cache(kind, config=None, **opts) -> Cache:
    """A fresh cache for one ``generate()`` call: ``kind`` a ``KVCacheSpec`` or its kind name with
    ``opts`` (see ``KVCacheSpec``; the model-dtype kind takes no options); ``config``: the model's
    config (one layer per decoder layer up front)."""
    if opts and kind == DEFAULT_KIND:
        raise ValueError(f"the {DEFAULT_KIND} cache takes no options, got {sorted(opts)}")
    spec = KVCacheSpec.of(kind, opts)
    if not spec.quantized:
        return DynamicCache(config=config)
    return QuantizedKVCache(config, bits=spec.bits, group_size=spec.group_size,
                            window=spec.window, block=spec.block, key_quant=spec.key_quant,
                            fp8=spec.fp8)


def make_static_cache(kind, config, max_cache_len: int) -> Cache:
    """A fixed-capacity cache of ``max_cache_len`` tokens per sequence for the compiled decode
    loop (``llm_decode``): transformers' ``StaticCache`` for the model-dtype kind, else a
    ``static_cache.StaticQuantizedCache`` (the quantized kinds' format in fixed buffers)."""
    spec = KVCacheSpec.of(kind)
    text = config.get_text_config(decoder=True)
    if not spec.quantized:
        return StaticCache(config=text, max_cache_len=max_cache_len)
    return StaticQuantizedCache(text, max_cache_len, spec)


@torch.no_grad()
def teacher_forced_logits(model, input_ids: Tensor, attention_mask: Tensor, prompt_len: int,
                          cache: Cache) -> Tensor:
    """Prefill ``input_ids[:, :prompt_len]``, then feed the given tokens one at a time.

    Returns (B, T - prompt_len, V) next-token logits; two caches compared on the same tokens give
    the per-step argmax agreement, free of the divergence of free-running greedy decoding.
    """
    kw = {cache_kwarg_name(model): cache}
    out = model(input_ids=input_ids[:, :prompt_len], attention_mask=attention_mask[:, :prompt_len],
                **kw)
    logits = [out.logits[:, -1]]
    for t in range(prompt_len, input_ids.shape[1] - 1):
        out = model(input_ids=input_ids[:, t:t + 1], attention_mask=attention_mask[:, :t + 1], **kw)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)
