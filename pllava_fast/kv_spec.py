"""KV-cache settings: one validated ``KVCacheSpec``, built once and passed on (no torch import).

Kinds:

* ``"model-dtype"`` (default): transformers' ``DynamicCache`` in the model's dtype (bf16 on GPU,
  fp32 on CPU); the answers are the original's.
* ``"int8"`` / ``"int4"``: ``quantized_cache.QuantizedKVCache`` (per-group codes, a full-precision
  recent window), read by ``pllava_fast.ops.decode_attention``.
* ``"fp8"``: the same cache with float8 e4m3 codes, symmetric per token group (vLLM / SGLang's
  fp8 KV; Hopper and Ada convert it natively), the int8 size with a float's dynamic range.
* ``"unquantized"``: the quantized cache's layout and decode path with the codes stored in the
  model dtype (for exactness tests).

``from_pretrained``, ``VideoPipeline``, ``patch`` and the CLI's ``--kv-*`` flags all make one spec
(``KVCacheSpec.of(kind, options)``), which checks every value when it is made; ``generate()``
builds a fresh cache from it per call (``kv_cache.make_cache(spec, config)``). This module imports
nothing heavy, so the CLI checks the flags before torch loads.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from .checks import flag, is_int

DEFAULT_KIND = "model-dtype"
CACHE_KINDS = ("model-dtype", "int8", "int4", "fp8")  # the public kinds (CLI choices)
_BITS = {"unquantized": 16, "int8": 8, "int4": 4, "fp8": 8}
# QuantizedKVCache's keyword options
OPTIONS = ("window", "group_size", "block", "key_quant")
_RENAMED = {"bf16": "model-dtype"}
KEY_QUANT = ("token", "channel")


def check_options(*, bits: int, group_size: int, window: int, block: int, key_quant: str) -> None:
    """ValueError naming the first option a quantized cache cannot be built with."""
    if bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, got {bits!r}")
    for name, value in (("group_size", group_size), ("window", window), ("block", block)):
        # bool is an int; a float would reach the kernels as a size
        if not is_int(value):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if group_size < 2 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 2, got {group_size}")
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if key_quant not in KEY_QUANT:
        raise ValueError(f"key_quant must be one of {KEY_QUANT}, got {key_quant!r}")


@dataclasses.dataclass(frozen=True)
class KVCacheSpec:
    """What cache ``generate()`` gets: the kind and, for the quantized kinds, its options.

    Args:
        kind: "model-dtype" | "int8" | "int4" | "fp8" | "unquantized" (see the module docstring).
        window: most recent tokens kept in full precision (quantized kinds).
        group_size: channels per scale group, a power of two.
        block: tokens quantized at a time, and the token group of per-channel key scales.
        key_quant: "token" (per-token groups) or "channel" (KIVI-style keys; not with fp8).
    """

    kind: str = DEFAULT_KIND
    window: int = 128
    group_size: int = 64
    block: int = 32
    key_quant: str = "token"

    def __post_init__(self):
        if not isinstance(self.kind, str):
            raise ValueError(f"kv_cache must be one of {CACHE_KINDS}, got {self.kind!r}")
        if self.kind in _RENAMED:
            raise ValueError(f"kv_cache {self.kind!r} is now called {_RENAMED[self.kind]!r} (the "
                             "cache keeps the model's dtype)")
        if self.kind != DEFAULT_KIND and self.kind not in _BITS:
            raise ValueError(f"kv_cache must be one of {CACHE_KINDS}, got {self.kind!r} "
                             f"(unknown cache kind)")
        check_options(bits=_BITS.get(self.kind, 16), group_size=self.group_size,
                      window=self.window, block=self.block, key_quant=self.key_quant)
        if self.fp8 and self.key_quant != "token":
            raise ValueError("fp8 codes are per token group: key_quant='channel' needs int8 or "
                             "int4")

    @classmethod
    def of(cls, kind=DEFAULT_KIND, options: Mapping | None = None) -> "KVCacheSpec":
        """A spec from a kind (or a spec) and QuantizedKVCache options (quantized kinds only)."""
        if isinstance(kind, KVCacheSpec):
            if options:
                raise ValueError("pass kv_cache_options or a KVCacheSpec, not both")
            return kind
        if options is None:
            options = {}
        if not isinstance(options, Mapping):
            raise ValueError(f"kv_cache_options must be a dict, got {type(options).__name__}")
        options = dict(options)
        if not isinstance(kind, str):
            raise ValueError(f"kv_cache must be one of {CACHE_KINDS}, got {kind!r}")
        if options and kind == DEFAULT_KIND:
            raise ValueError(f"kv_cache_options {sorted(options)} apply to the quantized caches "
                             "only: pass kv_cache='int8', 'int4' or 'fp8'")
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown kv_cache_options {unknown}; expected some of {OPTIONS}")
        try:
            return cls(kind, **options)
        except ValueError as exc:
            if not options:
                raise
            raise ValueError(f"bad kv_cache_options {options}: {exc}") from None

    @property
    def quantized(self) -> bool:
        """True when ``generate()`` needs a cache of ours (and pllava-fast attention)."""
        return self.kind != DEFAULT_KIND

    @property
    def bits(self) -> int | None:
        return _BITS.get(self.kind)

    @property
    def fp8(self) -> bool:
        """True when the 8-bit codes are float8 e4m3 (symmetric) rather than uint8."""
        return self.kind == "fp8"

    def check_compile(self, compile) -> bool:
        """``compile`` as a bool (ValueError unless it is one), checked against this spec: the
        compiled loop needs a static cache (``check_static``)."""
        compile = flag("compile", compile)
        if compile:
            self.check_static()
        return compile

    def check_static(self) -> None:
        """ValueError unless the compiled loop's static cache can hold this spec: per-channel
        key scales (KIVI) quantize whole blocks, which only the dynamic cache does."""
        if self.key_quant == "channel":
            raise ValueError("compile=True needs a static cache, and key_quant='channel' is only "
                             "in the dynamic one: use key_quant='token' or compile=False")

    def options(self) -> dict:
        """The options that differ from the defaults (what a user passed)."""
        default = KVCacheSpec()
        return {k: getattr(self, k) for k in OPTIONS if getattr(self, k) != getattr(default, k)}



def bytes_per_token(kind: str, num_layers: int, num_kv_heads: int, head_dim: int, *,
                    group_size: int = 64, block: int = 32, key_quant: str = "token",
                    dtype_bytes: int = 2) -> float:
    """Bytes one token occupies across all layers (K and V) at steady state, excluding the window."""
    if kind in (DEFAULT_KIND, "unquantized"):
        per_head = 2 * head_dim * dtype_bytes
    elif kind in ("int8", "int4", "fp8"):
        codes = head_dim * _BITS[kind] // 8
        groups = -(-head_dim // group_size)
        v_scales = 2 * 4 * groups
        k_scales = 2 * 4 * head_dim / block if key_quant == "channel" else v_scales
        per_head = 2 * codes + v_scales + k_scales
    else:
        raise ValueError(f"unknown cache kind {kind!r}; expected one of {CACHE_KINDS}")
    return float(per_head * num_kv_heads * num_layers)
