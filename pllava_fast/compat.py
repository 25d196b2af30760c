"""The one place that knows how transformers versions differ (5.17 on the GPU machines, 5.24 here).

* 5.24 renamed the ``past_key_values`` keyword to ``cache`` (the old name warns until 5.40);
  5.17 only knows ``past_key_values``. The rename reached the causal LMs' forward and
  ``generate()`` together.
* ``no_init_weights`` moved from ``transformers.modeling_utils`` to ``transformers.initialization``.
* 5.24's ``CLIPVisionModel`` keeps its modules directly on the model; earlier 5.x under
  ``.vision_model``.
"""
from __future__ import annotations

import inspect

from torch import nn


def cache_kwarg_name(module: nn.Module) -> str:
    """The keyword the installed transformers uses for the KV cache in ``module.forward``."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def generate_cache_kwarg(model) -> str:
    """``generate()``'s keyword for a KV cache ("cache" from 5.24, else "past_key_values")."""
    return cache_kwarg_name(getattr(model, "language_model", None) or model)


def cache_length(cache) -> int:
    """Tokens already held by a transformers Cache (0 for None)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy tuple of (k, v)


def no_init_weights():
    """transformers' context manager that skips random weight init."""
    try:
        from transformers.initialization import no_init_weights as ctx
    except ImportError:  # older 5.x
        from transformers.modeling_utils import no_init_weights as ctx
    return ctx()


def clip_transformer(vision_tower: nn.Module) -> nn.Module:
    """The CLIP transformer (embeddings, pre_layrnorm, encoder) of a ``CLIPVisionModel``."""
    return getattr(vision_tower, "vision_model", vision_tower)
