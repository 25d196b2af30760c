"""Drop-in acceleration of an existing model object: ``patch(model)`` / ``unpatch(model)``.

``patch`` takes a ``pllava_fast.PllavaForConditionalGeneration`` or a transformers
``LlavaForConditionalGeneration`` and returns the same object with

* the fast projector: linear_1 -> fused (activation + adaptive 3-D average pool) -> linear_2,
  sharing the model's own weights (no copy);
* the attention backend (``pllava_fast.attention``; "auto": flash-attn when usable on CUDA, else
  torch SDPA; it also reads quantized KV caches);
* the KV-cache format: "bf16" keeps transformers' DynamicCache (answers unchanged), "int8" / "int4"
  make every ``generate()`` call that passes no cache use ``pllava_fast.kv_cache``'s quantized one.

On a transformers Llava (an image model) it also turns on PLLaVA's parameter-free video mode: the
frames of each video go through the vision tower as a batch of images and their tokens are pooled
over (T, H, W) to ``pooling_shape``, so each video costs t*h*w LLM tokens. transformers' Llava
checks that the number of image tokens in ``input_ids`` equals the number of visual features, so
``build_video_inputs`` (also installed as ``model.build_video_inputs``) writes that many.

``unpatch(model)`` restores everything ``patch`` changed. The user's ``generate()`` code keeps
working in both states.
"""
from __future__ import annotations

import functools
import math
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["patch", "unpatch", "is_patched", "build_video_inputs", "resolve_attention",
           "check_kv_cache_options", "VideoPoolingProjector"]

_STATE = "_pllava_fast_patch"
KV_CACHE_KINDS = ("bf16", "int8", "int4")
# QuantizedKVCache's keyword options (see pllava_fast.kv_cache)
KV_CACHE_OPTIONS = ("window", "group_size", "block", "key_quant")
ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2", None)


def _is_hf_llava(model) -> bool:
    try:
        from transformers import LlavaForConditionalGeneration
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, LlavaForConditionalGeneration)


def _is_pllava(model) -> bool:
    from .model import PllavaForConditionalGeneration

    return isinstance(model, PllavaForConditionalGeneration)


def check_kv_cache_options(kv_cache: str, options: Mapping | None, config=None) -> dict:
    """Validate a KV-cache kind and its QuantizedKVCache options; returns the options as a dict.

    ``options`` may hold ``window``, ``group_size``, ``block`` and ``key_quant`` (int8 / int4
    only: the bf16 cache takes none). One cache is built here, so a bad value fails with a
    ValueError when the model is set up, not at the first ``generate()``.
    """
    if kv_cache not in KV_CACHE_KINDS:
        raise ValueError(f"kv_cache must be one of {KV_CACHE_KINDS}, got {kv_cache!r}")
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"kv_cache_options must be a dict, got {type(options).__name__}")
    options = dict(options)
    if not options:
        return options
    if kv_cache == "bf16":
        raise ValueError(f"kv_cache_options {sorted(options)} apply to the quantized caches only: "
                         "pass kv_cache='int8' or 'int4'")
    unknown = sorted(set(options) - set(KV_CACHE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown kv_cache_options {unknown}; expected some of {KV_CACHE_OPTIONS}")
    for key in ("window", "group_size", "block"):
        value = options.get(key)
        # bool is an int; a float would reach the kernels as a size
        if key in options and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"kv_cache_options[{key!r}] must be an int, got {value!r}")
    from .kv_cache import make_cache

    try:
        make_cache(kv_cache, config=config, **options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad kv_cache_options {options}: {exc}") from exc
    return options


def resolve_attention(attention: str | None) -> str | None:
    """The attention implementation name to install in the language model.

    "auto" / "sdpa" / "flash_attention_2" -> pllava-fast's registered attention (per call: flash-attn
    when usable on CUDA, else torch SDPA; "sdpa" / "flash_attention_2" force one), which also reads
    quantized KV caches; "eager" -> transformers' eager attention; None -> leave it.
    """
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {attention!r}")
    if attention in (None, "eager"):
        return attention
    from .attention import ATTENTION_NAMES, register

    register()
    return ATTENTION_NAMES[{"auto": "auto", "sdpa": "sdpa", "flash_attention_2": "flash"}[attention]]


class VideoPoolingProjector(nn.Module):
    """PLLaVA's projector over a Llava projector's own ``linear_1`` / ``linear_2`` (shared).

    forward: image features (B*T, H*W, D_vision), frames of each video consecutive ->
    (B, t*h*w, D_llm). Pooling runs between the activation and linear_2, which is exact because
    each pooled cell is a convex average and linear_2 is affine.
    """

    def __init__(self, projector: nn.Module, act_name: str, frame_shape: Sequence[int],
                 pooling_shape: Sequence[int], num_frames: int):
        super().__init__()
        self.linear_1, self.linear_2 = projector.linear_1, projector.linear_2
        # an activation the fused op does not know runs as a module before an identity pool
        self.fused_act = act_name if act_name in ops.ACTIVATIONS else "identity"
        self.act = nn.Identity() if act_name in ops.ACTIVATIONS else projector.act
        self.frame_shape = tuple(int(v) for v in frame_shape)
        self.pooling_shape = tuple(int(v) for v in pooling_shape)
        self.num_frames = int(num_frames)

    def forward(self, features: Tensor) -> Tensor:
        if features.shape[0] % self.num_frames:
            raise ValueError(
                f"video mode got {features.shape[0]} frames, not a multiple of num_frames="
                f"{self.num_frames}; build inputs with build_video_inputs")
        hidden = self.act(self.linear_1(features))
        pooled = ops.pool_visual_tokens(hidden, self.num_frames, self.frame_shape,
                                        self.pooling_shape, act=self.fused_act)
        return self.linear_2(pooled)

    @property
    def num_visual_tokens(self) -> int:
        return math.prod(self.pooling_shape)

    def extra_repr(self) -> str:
        return (f"num_frames={self.num_frames}, frame_shape={self.frame_shape}, "
                f"pooling_shape={self.pooling_shape}")


def is_patched(model) -> bool:
    return _STATE in vars(model)


def patch(model, *, pooling: bool = True, kv_cache: str = "bf16", attention: str | None = "auto",
          pooling_shape: Sequence[int] | None = None, num_frames: int | None = None,
          kv_cache_options: Mapping | None = None):
    """Install pllava-fast's projector, attention backend and KV cache in ``model``; return it.

    Args:
        model: ``PllavaForConditionalGeneration`` or transformers ``LlavaForConditionalGeneration``.
        pooling: install the fused pooling projector (on a Llava: turn on video mode).
        kv_cache: "bf16" (transformers' DynamicCache: identical answers), "int8" or "int4".
        attention: "auto", "sdpa", "eager", "flash_attention_2", or None to leave it.
        pooling_shape: (t, h, w) visual-token grid per video; default: the PLLaVA model's own, or
            for a Llava (num_frames, ceil(H/2), ceil(W/2)) of its (H, W) patch grid.
        num_frames: frames per video (default: the PLLaVA model's own; 16 for a Llava).
        kv_cache_options: QuantizedKVCache options for "int8" / "int4": ``window`` (recent tokens
            kept in full precision), ``group_size``, ``block``, ``key_quant`` ("token" or
            "channel"); checked here (ValueError), rejected with "bf16".

    Patching twice replaces the first patch; ``unpatch`` restores the original model.
    """
    kv_cache_options = check_kv_cache_options(kv_cache, kv_cache_options,
                                              getattr(model, "config", None))
    if num_frames is not None and int(num_frames) <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if pooling_shape is not None:
        pooling_shape = ops._as_triple("pooling_shape", pooling_shape)
    hf_llava = _is_hf_llava(model)
    if not hf_llava and not _is_pllava(model):
        raise ValueError(f"patch() takes a PllavaForConditionalGeneration or a transformers "
                         f"LlavaForConditionalGeneration, got {type(model).__name__}")
    if is_patched(model):
        unpatch(model)
    state = {"config": [], "modules": [], "attention": None}
    setattr(model, _STATE, state)
    try:
        if hf_llava:
            if pooling:
                _llava_video_mode(model, state, pooling_shape, num_frames)
        else:
            _pllava_pooling(model, state, pooling_shape, num_frames)
        _set_attention(model, state, resolve_attention(attention), kv_cache)
        if kv_cache != "bf16":
            _install_cache(model, kv_cache, kv_cache_options)
        state["kv_cache"] = kv_cache
        state["kv_cache_options"] = kv_cache_options
    except Exception:
        unpatch(model)
        raise
    return model


def unpatch(model):
    """Undo ``patch``: original projector, config values, attention backend, generate()."""
    state = vars(model).pop(_STATE, None)
    if state is None:
        return model
    for owner, name, module in reversed(state["modules"]):
        setattr(owner, name, module)
    for obj, key, value in reversed(state["config"]):
        setattr(obj, key, value)
    if state["attention"] is not None:
        _apply_attention(model, state["attention"])
    for name in ("generate", "build_video_inputs"):
        vars(model).pop(name, None)
    return model


def _remember(state, obj, key):
    # configs define __eq__ without __hash__: keep (object, key, old value) triples in a list
    state["config"].append((obj, key, getattr(obj, key)))


def _pllava_pooling(model, state, pooling_shape, num_frames):
    """The PLLaVA model's projector is already the fused one; apply the shape overrides."""
    config, projector = model.config, model.multi_modal_projector
    if num_frames is not None:
        _remember(state, config, "num_frames")
        config.num_frames = int(num_frames)
    if pooling_shape is not None:
        _remember(state, config, "pooling_shape")
        _remember(state, projector, "pooling_shape")
        config.pooling_shape = list(pooling_shape)
        projector.pooling_shape = tuple(pooling_shape)


def _llava_parts(model):
    """(the module owning the projector, the projector, the vision config, the LLaVA config)."""
    inner = getattr(model, "model", model)
    return inner, inner.multi_modal_projector, model.config.vision_config, model.config


def _llava_video_mode(model, state, pooling_shape, num_frames):
    inner, projector, vcfg, config = _llava_parts(model)
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError("video mode needs a single vision_feature_layer, got "
                         f"{config.vision_feature_layer!r}")
    if config.vision_feature_select_strategy != "default":
        raise ValueError("video mode needs vision_feature_select_strategy='default' (CLS dropped): "
                         "the pooled grid is the patch grid")
    grid = vcfg.image_size // vcfg.patch_size
    num_frames = int(num_frames or 16)
    if pooling_shape is None:
        pooling_shape = (num_frames, (grid + 1) // 2, (grid + 1) // 2)
    video_projector = VideoPoolingProjector(
        projector, config.projector_hidden_act, (grid, grid), pooling_shape, num_frames)
    state["modules"].append((inner, "multi_modal_projector", projector))
    inner.multi_modal_projector = video_projector
    model.build_video_inputs = functools.partial(build_video_inputs, model)


def _language_model(model):
    if _is_hf_llava(model):
        return model.model.language_model  # the text model (transformers 5 has no shortcut)
    return model.language_model


def _current_attention(model):
    return getattr(_language_model(model).config, "_attn_implementation", None)


def _apply_attention(model, name):
    lm = _language_model(model)
    if hasattr(lm, "set_attn_implementation"):
        lm.set_attn_implementation(name)
    else:  # the LM reads its config at every forward
        lm.config._attn_implementation = name


def _set_attention(model, state, name, kv_cache):
    previous = _current_attention(model)
    if kv_cache != "bf16" and not str(name or previous).startswith("pllava_fast"):
        raise ValueError(f"kv_cache={kv_cache!r} needs pllava-fast attention (attention='auto', "
                         f"'sdpa' or 'flash_attention_2'), got attention={name or previous!r}")
    if name is None or previous == name:
        return
    try:
        _apply_attention(model, name)
    except (ValueError, ImportError) as exc:
        raise ValueError(f"attention backend {name!r} is not available for this model: {exc}") from exc
    state["attention"] = previous


def _install_cache(model, kind, options=None):
    """Make generate() calls that pass no cache use a quantized KV cache of ``kind`` built with
    ``options`` (QuantizedKVCache keywords, already checked by ``check_kv_cache_options``)."""
    options = dict(options or {})
    from .kv_cache import make_cache
    from .pipeline import generate_cache_kwarg

    original = model.generate
    keyword = generate_cache_kwarg(model)

    @functools.wraps(original)
    def generate(*args, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is None:
            kwargs[keyword] = make_cache(kind, config=model.config, **options)
        return original(*args, **kwargs)

    model.generate = generate


# -- inputs for a Llava in video mode ------------------------------------------------------------
def _repeat_short_clip(frames: Tensor, num_frames: int) -> Tensor:
    """PLLaVA's rule: an image is repeated; n < num_frames frames repeat_interleave to num_frames."""
    n = frames.shape[0]
    if n == num_frames:
        return frames
    if n > num_frames:
        raise ValueError(f"a video has {n} frames but the model is in video mode with "
                         f"num_frames={num_frames}; sample {num_frames} frames")
    return frames.repeat_interleave(num_frames // n + 1, dim=0)[:num_frames]


def build_video_inputs(model, tokenizer, videos, prompts, *, device=None, dtype=None) -> dict:
    """Inputs for a transformers Llava patched into video mode.

    Args:
        videos: one entry per prompt: a DecodedVideo, a path (read with ``pllava_fast.video``),
            a (T, H, W, 3) uint8 tensor/array, a list of PIL images / HxWx3 uint8 arrays, or
            already preprocessed frames (T, 3, S, S) float.
        prompts: one string (for all videos) or one per video, each with one ``<image>``
            placeholder (the tokenizer's image token), e.g. "USER: <image>\\nWhat happens?
            ASSISTANT:".

    Returns ``input_ids`` / ``attention_mask`` (left padded; each placeholder expanded to the
    pooled token count t*h*w) and ``pixel_values`` (B*num_frames, 3, S, S), ready for
    ``model.generate(**inputs)``.
    """
    from .video import DecodedVideo, read_video

    inner, projector, vcfg, config = _llava_parts(model)
    if not isinstance(projector, VideoPoolingProjector):
        raise ValueError("the model is not in video mode: call pllava_fast.patch(model) first")
    if isinstance(videos, (str, DecodedVideo, Tensor)):
        videos = [videos]
    videos = list(videos)
    if isinstance(prompts, str):
        prompts = [prompts] * len(videos)
    if len(prompts) != len(videos):
        raise ValueError(f"got {len(videos)} videos but {len(prompts)} prompts")
    param = next(model.parameters())
    device = param.device if device is None else torch.device(device)
    dtype = param.dtype if dtype is None else dtype
    pixels = []
    for video in videos:
        if isinstance(video, str):
            video = read_video(video, num_frames=projector.num_frames)
        if isinstance(video, Tensor) and video.dim() == 4 and video.is_floating_point():
            values = video.to(device, dtype)  # already model input (T, 3, S, S)
        else:
            from .preprocess import frames_to_pixel_values

            values = frames_to_pixel_values(video, device=device, dtype=dtype, image_size=vcfg.image_size)
        pixels.append(_repeat_short_clip(values, projector.num_frames))
    image_token = config.image_token_id if hasattr(config, "image_token_id") else config.image_token_index
    ids = []
    for prompt in prompts:
        row = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if row.count(image_token) != 1:
            raise ValueError(f"each prompt needs exactly one image token (id {image_token}), "
                             f"found {row.count(image_token)} in {prompt!r}")
        at = row.index(image_token)
        ids.append(row[:at] + [image_token] * projector.num_visual_tokens + row[at + 1:])
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else 0
    longest = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), longest), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, longest - len(row):] = torch.tensor(row)
        attention_mask[i, longest - len(row):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "pixel_values": torch.cat(pixels)}
