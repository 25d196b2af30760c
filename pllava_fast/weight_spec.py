"""Weight-quantization settings: one validated ``WeightSpec`` (no torch import, so the CLI checks
``--weights`` before torch loads); ``weight_quant`` applies it to a model."""
from __future__ import annotations

import dataclasses
from typing import Mapping

from .checks import is_int

WEIGHT_KINDS = ("int8", "int4")
OPTIONS = ("group_size", "lm_head", "embeddings", "vision", "projector")
GROUP_SIZES = (32, 64, 128, 256)


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Which weights become int8 / int4. kind: "int8" | "int4"; group_size: int4 channels per
    scale (``GROUP_SIZES``); lm_head / embeddings / vision / projector: also quantize those."""

    kind: str
    group_size: int = 128
    lm_head: bool = False
    embeddings: bool = False
    vision: bool = False
    projector: bool = False

    def __post_init__(self):
        if self.kind not in WEIGHT_KINDS:
            raise ValueError(f"weights must be one of {WEIGHT_KINDS} or None, got {self.kind!r}")
        if not is_int(self.group_size) or self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")
        for name in OPTIONS[1:]:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"weight option {name} must be True or False, got "
                                 f"{getattr(self, name)!r}")

    @classmethod
    def of(cls, weights, options: Mapping | None = None) -> "WeightSpec | None":
        """A spec from ``weights`` (None, a kind or a spec) and options; None: as stored."""
        if weights is None:
            if options:
                raise ValueError(f"weight_options {sorted(options)} need weights='int8' or 'int4'")
            return None
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(f"weight_options must be a dict, got {type(options).__name__}")
        if isinstance(weights, WeightSpec):
            if options:
                raise ValueError("pass weight_options or a WeightSpec, not both")
            return weights
        unknown = sorted(set(options or {}) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown weight_options {unknown}; expected some of {OPTIONS}")
        return cls(weights, **dict(options or {}))
