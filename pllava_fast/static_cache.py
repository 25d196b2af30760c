"""Static (fixed-capacity, compileable) quantized KV cache: the quantized kinds' format in buffers
allocated once and written in place, so one decode step can be compiled and captured.

Per layer, for a capacity of T tokens and a window W with flush block K:

* codes (B, Hkv, T, Dc) uint8 (float8_e4m3fn for "fp8", the model dtype for "unquantized"),
  scale / zero (B, Hkv, T, G) fp32: every token is quantized when written, at its own slot. Per-token groups
  make these the very codes ``QuantizedKVLayer`` computes later at its flush;
* a full-precision ring (B, Hkv, W + K, D) holding the newest W + K tokens at slot ``t % (W + K)``;
* ``cumulative_length``, a 0-d tensor (never a Python int, so the length is not baked into a graph).

The dynamic layer's flush (quantize whole blocks once the window reaches W + K) depends only on
the length: ``n_quant(L) = max(0, (L - W) // K) * K``. So nothing moves: decode attention reads the
quantized slots below ``n_quant`` and the ring slots holding tokens ``n_quant <= t < L``, chosen by
the slot mask of ``kv_mask`` (softmax is order-free, and keys carry their rotary position). Keys
quantized per channel (KIVI) need whole blocks and stay with the dynamic cache.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from . import ops
from .kernels.kv_format import dequantize_kv_ref
from .quantized_cache import QuantizedKV


class StaticQuantizedKV(QuantizedKV):
    """The handle a static layer's decode ``update`` returns in place of K and V."""

    def decode_inputs(self, token_mask: Tensor | None = None) -> dict:
        return self.layer.decode_inputs(token_mask)


class StaticQuantizedLayer(CacheLayerMixin):
    """One layer of a ``StaticQuantizedCache`` (format in the module docstring)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, max_cache_len: int, spec):
        super().__init__()
        self.max_cache_len, self.spec = int(max_cache_len), spec
        self.bits, self.group_size = spec.bits, spec.group_size
        self.window, self.block = spec.window, spec.block
        self.ring = spec.window + spec.block
        self.cumulative_length = torch.tensor(0, dtype=torch.long)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        if d % 2:
            raise ValueError(f"the quantized KV cache needs an even head dim, got {d}")
        dev, dt = key_states.device, key_states.dtype
        self.dtype, self.device, self.batch_size, self.head_dim = dt, dev, b, d
        t = self.max_cache_len
        if self.bits == 16:
            code_shape, code_dtype, groups = (b, h, t, d), dt, 0
        else:
            dc = d // 2 if self.bits == 4 else d
            code_dtype = torch.float8_e4m3fn if self.spec.fp8 else torch.uint8
            code_shape, groups = (b, h, t, dc), -(-d // self.group_size)
        self.k_codes = torch.zeros(code_shape, dtype=code_dtype, device=dev)
        self.v_codes = torch.zeros_like(self.k_codes)
        self.k_scale, self.k_zero, self.v_scale, self.v_zero = (
            torch.zeros(b, h, t, groups, dtype=torch.float32, device=dev) for _ in range(4))
        self.keys = torch.zeros(b, h, self.ring, d, dtype=dt, device=dev)  # the ring
        self.values = torch.zeros_like(self.keys)
        self.cumulative_length = self.cumulative_length.to(dev)
        if not torch.compiler.is_compiling():
            # fixed addresses: CUDA graphs replay reads and writes them in place
            for x in self._tensors():
                torch._dynamo.mark_static_address(x)
        self.is_initialized = True

    def _tensors(self):
        return (self.k_codes, self.v_codes, self.k_scale, self.k_zero, self.v_scale, self.v_zero,
                self.keys, self.values, self.cumulative_length)

    def _write(self, x: Tensor, codes, scale, zero, ring, slots: Tensor) -> None:
        b, h, q, d = x.shape
        if self.bits == 16:
            codes.index_copy_(2, slots, x.to(codes.dtype))
        else:
            c, s, z = ops.quantize_kv(x.reshape(-1, d), self.bits, self.group_size, 0,
                                      self.spec.fp8)
            if c.dtype == torch.float8_e4m3fn:  # index_copy_ has no fp8 kernel: copy the bytes
                codes, c = codes.view(torch.uint8), c.view(torch.uint8)
            codes.index_copy_(2, slots, c.view(b, h, q, -1))
            scale.index_copy_(2, slots, s.view(b, h, q, -1))
            zero.index_copy_(2, slots, z.view(b, h, q, -1))
        r = min(q, self.ring)  # q is a shape: plain Python, fixed per graph
        ring.index_copy_(2, slots[q - r:] % self.ring, x[:, :, q - r:])

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        """Write (B, Hkv, q, D) K/V at the cache's length. A prefill (q > 1, only into an empty
        cache) returns them as given; a decode step returns a ``StaticQuantizedKV`` handle."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        if q > 1 and not torch.compiler.is_compiling() and int(self.cumulative_length):
            raise ValueError("a static quantized cache takes a multi-token update only as the "
                             "prefill of an empty cache (reset() it first)")
        slots = torch.arange(q, device=key_states.device) + self.cumulative_length
        self._write(key_states, self.k_codes, self.k_scale, self.k_zero, self.keys, slots)
        self._write(value_states, self.v_codes, self.v_scale, self.v_zero, self.values, slots)
        self.cumulative_length.add_(q)
        if q > 1:
            return key_states, value_states
        handle = StaticQuantizedKV(self)
        return handle, handle

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # a prefill sees its own tokens; a decode step sees the token positions 0..T-1, which
        # decode_inputs turns into slots
        return (query_length, 0) if query_length > 1 else (self.max_cache_len, 0)

    def get_seq_length(self):
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.is_initialized:
            for x in self._tensors()[:-1]:
                x.zero_()
        self.cumulative_length.zero_()

    def _n_quant(self) -> Tensor:
        length = self.cumulative_length
        return torch.clamp((length - self.window) // self.block, min=0) * self.block

    def kv_mask(self, token_mask: Tensor | None) -> Tensor:
        """(B, T) token-position mask (padding and causality) -> (B, T + W + K) slot mask."""
        length, n_quant = self.cumulative_length, self._n_quant()
        if token_mask is None:
            token_mask = torch.ones(self.batch_size, self.max_cache_len, dtype=torch.bool,
                                    device=length.device)
        j = torch.arange(self.max_cache_len, device=length.device)
        quant = token_mask & (j < n_quant)
        s = torch.arange(self.ring, device=length.device)
        held = length - 1 - torch.remainder(length - 1 - s, self.ring)  # token in ring slot s
        ok = (held >= n_quant) & (held >= 0)
        window = token_mask.gather(1, held.clamp(min=0).expand(token_mask.shape[0], -1)) & ok
        return torch.cat([quant, window], 1)

    def decode_inputs(self, token_mask: Tensor | None = None) -> dict:
        """Keyword arguments of ``pllava_fast.ops.decode_attention``: the whole buffers and the
        slot mask that picks the live slots."""
        empty = self.keys.new_empty(0, dtype=torch.float32)
        scales = ((self.k_scale, self.k_zero, self.v_scale, self.v_zero) if self.bits != 16
                  else (empty,) * 4)
        return dict(k_codes=self.k_codes, k_scale=scales[0], k_zero=scales[1],
                    v_codes=self.v_codes, v_scale=scales[2], v_zero=scales[3], k_win=self.keys,
                    v_win=self.values, kv_mask=self.kv_mask(token_mask), bits=self.bits,
                    group_size=self.group_size, key_block=0)

    def dequantize(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """The (B, Hkv, L, D) K and V so far (eager only): quantized tokens dequantized, the
        window's from the ring."""
        dtype = dtype or self.dtype
        length, n_quant = int(self.cumulative_length), int(self._n_quant())
        tokens = torch.arange(n_quant, length, device=self.keys.device) % self.ring
        out = []
        for codes, scale, zero, ring in ((self.k_codes, self.k_scale, self.k_zero, self.keys),
                                         (self.v_codes, self.v_scale, self.v_zero, self.values)):
            c = codes[:, :, :n_quant]
            q = c.to(dtype) if self.bits == 16 else dequantize_kv_ref(
                c, scale[:, :, :n_quant], zero[:, :, :n_quant], self.bits, self.head_dim,
                self.group_size).to(dtype)
            out.append(torch.cat([q, ring[:, :, tokens].to(dtype)], 2))
        return out[0], out[1]


class StaticQuantizedCache(Cache):
    """A transformers ``Cache`` of ``StaticQuantizedLayer``, one per decoder layer of
    ``config``, ``max_cache_len`` tokens each, in the format of ``spec`` (a quantized KVCacheSpec)."""

    def __init__(self, config, max_cache_len: int, spec):
        spec.check_static()  # once for the cache, not per layer
        n = config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[StaticQuantizedLayer(max_cache_len, spec) for _ in range(n)])
