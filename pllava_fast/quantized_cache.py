"""Quantized KV cache: int8 / int4 / fp8 codes with per-group scales and a full-precision recent
window.

Per layer and per (sequence, KV head), the cache holds

* a quantized part, oldest tokens first: codes (B, Hkv, Tq, D or D/2) uint8 (float8_e4m3fn with
  ``fp8=True``) plus float32 scale and zero per token group of ``group_size`` channels (values,
  and keys by default), or per channel over blocks of ``block`` tokens for keys with
  ``key_quant="channel"`` (KIVI);
* a window (B, Hkv, W, D) of the most recent tokens in the model dtype. Once it holds
  ``window + block`` tokens, the oldest multiple of ``block`` tokens are quantized, so the newest
  ``window`` tokens always stay exact.

``bits=16`` runs the same code path with the "quantized" part stored unquantized (exactness tests).
Prefill attention sees the full-precision K/V; later calls hand the attention function a
``QuantizedKV`` handle instead of tensors, read by ``pllava_fast.ops.decode_attention`` (installed
with ``pllava_fast.attention.install_attention``). Built from a ``kv_spec.KVCacheSpec``::

    cache = make_cache(KVCacheSpec("int4", window=128, group_size=128), model.config)
    model.generate(..., cache=cache)
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from . import ops
from .kernels.kv_format import dequantize_kv_ref
from .kv_spec import check_options

class _Buffer:
    """A tensor growing along dim 2 with doubling capacity (amortised O(1) appends)."""

    def __init__(self):
        self.data: Tensor | None = None
        self.length = 0

    def view(self) -> Tensor:
        return self.data[:, :, : self.length]

    def append(self, x: Tensor) -> None:
        n = x.shape[2]
        if self.data is None:
            self.data = torch.empty((*x.shape[:2], max(n, 16), *x.shape[3:]), dtype=x.dtype, device=x.device)
        elif self.length + n > self.data.shape[2]:
            cap = max(self.length + n, 2 * self.data.shape[2])
            grown = self.data.new_empty((*self.data.shape[:2], cap, *self.data.shape[3:]))
            grown[:, :, : self.length] = self.view()
            self.data = grown
        self.data[:, :, self.length: self.length + n] = x
        self.length += n

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)

    def apply(self, fn) -> None:
        """Replace the storage by ``fn(valid part)`` (batch reorder / select / repeat)."""
        if self.data is not None:
            self.data = fn(self.view()).contiguous()
            self.length = self.data.shape[2]


class QuantizedKV:
    """What a quantized layer's ``update`` returns in place of K and V: a handle on the layer.

    Read by ``pllava_fast.attention``; any other attention implementation fails with a clear error.
    """

    def __init__(self, layer: "QuantizedKVLayer"):
        self.layer = layer

    def __getattr__(self, name):
        raise AttributeError(
            f"QuantizedKV has no attribute {name!r}: a QuantizedKVCache needs the pllava_fast attention "
            "(call pllava_fast.attention.install_attention(model) before generate)")

    def decode_inputs(self, token_mask: Tensor | None = None) -> dict:
        """Keyword arguments of ``pllava_fast.ops.decode_attention``; ``token_mask`` (B, L) bool
        marks the keys each sequence may see (padding)."""
        return {**self.layer.decode_inputs(), "kv_mask": token_mask}

    def dequantize(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        return self.layer.dequantize(dtype)


class QuantizedKVLayer(CacheLayerMixin):
    """One layer of a ``QuantizedKVCache`` (see the module docstring for the format)."""

    is_compileable = False
    is_sliding = False
    # crop is supported, but dropping into the quantized part is not a lossless rollback
    is_croppable = False

    def __init__(self, bits: int = 4, group_size: int = 64, window: int = 128, block: int = 32,
                 key_quant: str = "token", fp8: bool = False):
        super().__init__()
        self.bits, self.group_size, self.window, self.block = bits, group_size, window, block
        self.fp8 = fp8
        self.key_block = block if key_quant == "channel" else 0
        self._reset_storage()

    def _reset_storage(self):
        self.k_codes, self.k_scale, self.k_zero = _Buffer(), _Buffer(), _Buffer()
        self.v_codes, self.v_scale, self.v_zero = _Buffer(), _Buffer(), _Buffer()
        self.n_quant = 0

    def __repr__(self):
        return (f"QuantizedKVLayer(bits={self.bits}, fp8={self.fp8}, group_size={self.group_size}, "
                f"window={self.window}, block={self.block}, key_block={self.key_block}, "
                f"tokens={self.get_seq_length()})")

    def _buffers(self):
        return (self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero)

    # -- transformers CacheLayerMixin ---------------------------------------------------------
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        if key_states.shape[-1] % 2:
            raise ValueError(f"the quantized KV cache needs an even head dim, got {key_states.shape[-1]}")
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size = key_states.shape[0]
        self.keys = key_states[:, :, :0]
        self.values = value_states[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        """Append (B, Hkv, q, D) K/V. Returns them as given for the first (prefill) call, the
        window tensors while nothing is quantized yet, else a ``QuantizedKV`` handle (twice)."""
        first = not self.is_initialized or self.get_seq_length() == 0
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self._flush()
        if first:
            return key_states, value_states
        if self.n_quant == 0:
            return self.keys, self.values
        handle = QuantizedKV(self)
        return handle, handle

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.n_quant + self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self._reset_storage()

    def offload(self):
        raise NotImplementedError("QuantizedKVLayer does not support offloading")

    def prefetch(self):
        raise NotImplementedError("QuantizedKVLayer does not support offloading")

    def _batch_apply(self, fn) -> None:
        if not self.is_initialized:
            return
        for buf in self._buffers():
            buf.apply(fn)
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.batch_size = self.keys.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._batch_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._batch_apply(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (negative, as transformers' layers), or keep
        the first ``tokens_to_remove`` tokens (non-negative, legacy)."""
        if not self.is_initialized:
            return
        total = self.get_seq_length()
        keep = total + tokens_to_remove if tokens_to_remove < 0 else min(tokens_to_remove, total)
        keep = max(keep, 0)
        if keep >= self.n_quant:
            self.keys = self.keys[:, :, : keep - self.n_quant]
            self.values = self.values[:, :, : keep - self.n_quant]
            return
        # per-channel key scales cover whole blocks: requantizing a partial block would change
        # the tokens kept, so they go back to the window dequantized
        base = keep // self.key_block * self.key_block if self.key_block else keep
        k, v = self.dequantize(self.dtype, quantized_only=True)
        self.keys, self.values = k[:, :, base:keep], v[:, :, base:keep]
        self.n_quant = base
        rows = base // self.key_block if self.key_block else base
        self.k_codes.truncate(base), self.v_codes.truncate(base)
        self.v_scale.truncate(base), self.v_zero.truncate(base)
        self.k_scale.truncate(rows), self.k_zero.truncate(rows)

    # -- quantized storage --------------------------------------------------------------------
    def _flush(self) -> None:
        w = self.keys.shape[2]
        if w < self.window + self.block:
            return
        n = (w - self.window) // self.block * self.block
        k_old, v_old = self.keys[:, :, :n], self.values[:, :, :n]
        self.keys, self.values = self.keys[:, :, n:].contiguous(), self.values[:, :, n:].contiguous()
        self._append_quantized(k_old, v_old)

    def _append_quantized(self, k: Tensor, v: Tensor) -> None:
        b, h, n, d = k.shape
        if self.bits == 16:
            self.k_codes.append(k)
            self.v_codes.append(v)
        else:
            kq = ops.quantize_kv(k.reshape(-1, d), self.bits, self.group_size, self.key_block,
                                 self.fp8)
            vq = ops.quantize_kv(v.reshape(-1, d), self.bits, self.group_size, 0, self.fp8)
            for buf, t in zip(self._buffers(), (*kq, *vq)):
                buf.append(t.view(b, h, -1, t.shape[-1]))
        self.n_quant += n

    def decode_inputs(self) -> dict:
        """Keyword arguments of ``pllava_fast.ops.decode_attention`` for this layer's state."""
        empty = self.keys.new_empty(0, dtype=torch.float32)
        scales = ((self.k_scale.view(), self.k_zero.view(), self.v_scale.view(), self.v_zero.view())
                  if self.bits != 16 else (empty,) * 4)
        return dict(k_codes=self.k_codes.view(), k_scale=scales[0], k_zero=scales[1],
                    v_codes=self.v_codes.view(), v_scale=scales[2], v_zero=scales[3],
                    k_win=self.keys, v_win=self.values, bits=self.bits,
                    group_size=self.group_size, key_block=self.key_block)

    def dequantize(self, dtype: torch.dtype | None = None, quantized_only: bool = False):
        """Full (B, Hkv, T, D) K and V (quantized part dequantized, then the window); for the
        rare multi-token step over a quantized cache, never for single-token decode."""
        dtype = dtype or self.dtype
        d = self.keys.shape[-1]
        if self.n_quant:
            if self.bits == 16:
                kq, vq = self.k_codes.view(), self.v_codes.view()
            else:
                kq = dequantize_kv_ref(self.k_codes.view(), self.k_scale.view(), self.k_zero.view(),
                                       self.bits, d, self.group_size, self.key_block)
                vq = dequantize_kv_ref(self.v_codes.view(), self.v_scale.view(), self.v_zero.view(),
                                       self.bits, d, self.group_size)
        else:
            kq, vq = self.keys[:, :, :0], self.values[:, :, :0]
        if quantized_only:
            return kq.to(dtype), vq.to(dtype)
        return (torch.cat([kq.to(dtype), self.keys.to(dtype)], dim=2),
                torch.cat([vq.to(dtype), self.values.to(dtype)], dim=2))

    def nbytes(self) -> int:
        """Bytes held for the valid tokens (codes, scales, window), excluding spare capacity."""
        if not self.is_initialized:
            return 0
        total = self.keys.nbytes + self.values.nbytes
        for buf in self._buffers():
            if buf.data is not None:
                total += buf.view().nbytes
        return total


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` of ``QuantizedKVLayer``; pass as ``generate(past_key_values=...)``.

    Args:
        config: the (text) model config, to create one layer per decoder layer up front; without
            it layers are created as ``update`` first reaches them.
        bits: 4, 8, or 16 (no quantization, same code path).
        fp8: with ``bits=8``, float8 e4m3 codes (symmetric per token group) instead of uint8.
        group_size: channels per scale group, a power of two (32 / 64 / 128).
        window: most recent tokens kept in full precision (default 128).
        block: tokens quantized at a time once the window overflows (and, for per-channel keys,
            the token group of a key scale); a power of two.
        key_quant: "token" (per-token groups, like values) or "channel" (KIVI keys).
    """

    def __init__(self, config=None, *, bits: int = 4, group_size: int = 64, window: int = 128,
                 block: int = 32, key_quant: str = "token", fp8: bool = False,
                 num_layers: int | None = None):
        check_options(bits=bits, group_size=group_size, window=window, block=block,
                      key_quant=key_quant)
        if fp8 and (bits != 8 or key_quant != "token"):
            raise ValueError(f"fp8 codes are bits=8 with key_quant='token', got bits={bits} "
                             f"key_quant={key_quant!r}")
        self.bits, self.group_size, self.window, self.block, self.key_quant = (
            bits, group_size, window, block, key_quant)
        self.fp8 = fp8
        factory = functools.partial(QuantizedKVLayer, bits=bits, group_size=group_size,
                                    window=window, block=block, key_quant=key_quant, fp8=fp8)
        if config is not None and num_layers is None:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        if num_layers is not None:
            super().__init__(layers=[factory() for _ in range(num_layers)])
        else:
            super().__init__(layer_class_to_replicate=factory)

    def nbytes(self) -> int:
        """Bytes held by all layers for the valid tokens."""
        return sum(layer.nbytes() for layer in self.layers)
