"""Drop-in acceleration of an existing model object: ``patch(model)`` / ``unpatch(model)``.

``patch`` takes a ``pllava_fast.PllavaForConditionalGeneration`` or a transformers
``LlavaForConditionalGeneration`` and returns the same object with

* the attention backend (``pllava_fast.attention``; "auto": flash-attn when usable on CUDA, else
  torch SDPA; it also reads quantized KV caches);
* the KV-cache format (``kv_spec.KVCacheSpec``): "model-dtype" keeps transformers' DynamicCache
  (answers unchanged), "int8" / "int4" make every ``generate()`` call that passes no cache use a
  quantized one;
* on a PLLaVA model, ``num_frames`` / ``pooling_shape`` overrides of its config.

On a transformers Llava (an image model) it also turns on PLLaVA's parameter-free video mode: the
Llava's projector is replaced by a ``PllavaProjector`` over its own ``linear_1`` / ``linear_2``
(shared, not copied), so the frames of each video go through the vision tower as a batch of
images and their tokens are pooled over (T, H, W) to ``pooling_shape``: t*h*w LLM tokens per
video. transformers' Llava checks that the number of image tokens in ``input_ids`` equals the
number of visual features, so ``build_video_inputs`` (also installed as
``model.build_video_inputs``) writes that many.

``unpatch(model)`` restores everything ``patch`` changed. The user's ``generate()`` code keeps
working in both states.
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import torch
from torch import Tensor

from .attention import resolve_attention
from .checks import int_tuple, positive_int
from .compat import generate_cache_kwarg
from .kv_cache import make_cache
from .kv_spec import KVCacheSpec
from .model import PllavaForConditionalGeneration
from .preprocess import frames_to_pixel_values
from .projector import PllavaProjector, VideoPooling, repeat_short_clips
from .video.frames import DecodedVideo
from .weight_quant import WeightSpec, check_weights, quantize_weights
from .video.read import read_video

__all__ = ["patch", "unpatch", "is_patched", "build_video_inputs"]

_STATE = "_pllava_fast_patch"


def _is_hf_llava(model) -> bool:
    from transformers import LlavaForConditionalGeneration

    return isinstance(model, LlavaForConditionalGeneration)


def is_patched(model) -> bool:
    return _STATE in vars(model)


def patch(model, *, pooling: bool = True, kv_cache="model-dtype", attention: str | None = "auto",
          pooling_shape: Sequence[int] | None = None, num_frames: int | None = None,
          kv_cache_options: Mapping | None = None, compile: bool = False, weights=None,
          weight_options: Mapping | None = None):
    """Install pllava-fast's projector, attention backend and KV cache in ``model``; return it.

    Args:
        model: ``PllavaForConditionalGeneration`` or transformers ``LlavaForConditionalGeneration``.
        pooling: on a Llava, turn on video mode (PLLaVA's pooling projector).
        kv_cache: a ``KVCacheSpec`` or its kind: "model-dtype" (transformers' DynamicCache:
            identical answers), "int8", "int4" or "fp8".
        attention: "auto", "sdpa", "eager", "flash_attention_2", or None to leave it.
        pooling_shape: (t, h, w) visual-token grid per video; default: the PLLaVA model's own, or
            for a Llava (num_frames, ceil(H/2), ceil(W/2)) of its (H, W) patch grid.
        num_frames: frames per video (default: the PLLaVA model's own; 16 for a Llava).
        kv_cache_options: QuantizedKVCache options for "int8" / "int4": ``window`` (recent tokens
            kept in full precision), ``group_size``, ``block``, ``key_quant`` ("token" or
            "channel"); checked here (ValueError), rejected with "model-dtype".
        compile: on a PLLaVA model, greedy ``generate()`` runs the compiled static-cache loop
            (``pllava_fast.llm_decode``); not for a transformers Llava.
        weights / weight_options: "int8" / "int4" weight-only LLM linears through torchao
            (``weight_quant``), in place: unlike the rest, ``unpatch`` cannot undo it (the
            float weights are gone; reload the model).

    Patching twice replaces the first patch; ``unpatch`` restores the original model.
    """
    spec = KVCacheSpec.of(kv_cache, kv_cache_options)
    weight_spec = WeightSpec.of(weights, weight_options)
    if weight_spec is not None:
        param = next(model.parameters())
        check_weights(weight_spec, param.device, param.dtype)
    compile = spec.check_compile(compile)
    if num_frames is not None:
        num_frames = positive_int("num_frames", num_frames)
    if pooling_shape is not None:
        pooling_shape = int_tuple("pooling_shape", pooling_shape, 3)
    hf_llava = _is_hf_llava(model)
    if not hf_llava and not isinstance(model, PllavaForConditionalGeneration):
        raise ValueError(f"patch() takes a PllavaForConditionalGeneration or a transformers "
                         f"LlavaForConditionalGeneration, got {type(model).__name__}")
    name = resolve_attention(attention)
    if is_patched(model):
        unpatch(model)
    state = {"attrs": [], "attention": None, "kv_cache_spec": spec}
    setattr(model, _STATE, state)
    try:
        if hf_llava:
            if pooling:
                _llava_video_mode(model, state, pooling_shape, num_frames)
        else:
            config = model.config
            if num_frames is not None:
                _set(state, config, "num_frames", num_frames)
            if pooling_shape is not None:
                _set(state, config, "pooling_shape", list(pooling_shape))
        _set_attention(model, state, name, spec)
        if compile and hf_llava:
            raise ValueError("compile=True is for PLLaVA models (PllavaForConditionalGeneration);"
                             " a transformers Llava keeps its own generate()")
        if not hf_llava:
            # a PLLaVA model's own generate() reads both: the patch's values replace the load's
            _set(state, model, "kv_cache_spec", spec)
            _set(state, model, "compile_decode", compile)
        elif spec.quantized:
            _install_cache(model, state, spec)
        if weight_spec is not None:
            quantize_weights(model, weight_spec)  # last: nothing after it can fail and unpatch
    except Exception:
        unpatch(model)
        raise
    return model


def unpatch(model):
    """Undo ``patch``: original projector, config values, attention backend, generate()."""
    state = vars(model).pop(_STATE, None)
    if state is None:
        return model
    for obj, key, value, existed in reversed(state["attrs"]):
        if existed:
            setattr(obj, key, value)
        else:
            delattr(obj, key)
    if state["attention"] is not None:
        _apply_attention(model, state["attention"])
    return model


def _set(state, obj, key, value):
    """``setattr`` remembered for ``unpatch`` (configs define __eq__ without __hash__, so the
    (object, key, old value) records are kept in a list)."""
    # instance attributes and submodules are restored; what came from the class (generate) is
    # removed again, so the class's own shows through
    existed = key in vars(obj) or key in vars(obj).get("_modules", {})
    state["attrs"].append((obj, key, getattr(obj, key, None), existed))
    setattr(obj, key, value)


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
    num_frames = num_frames or 16
    if pooling_shape is None:
        pooling_shape = (num_frames, (grid + 1) // 2, (grid + 1) // 2)
    video = VideoPooling(num_frames, (grid, grid), tuple(pooling_shape))
    video_projector = PllavaProjector(
        projector.linear_1.in_features, projector.linear_1.out_features,
        config.projector_hidden_act, video, linear_1=projector.linear_1,
        linear_2=projector.linear_2, act_module=projector.act)
    _set(state, inner, "multi_modal_projector", video_projector)
    _set(state, model, "build_video_inputs", functools.partial(build_video_inputs, model))


def _language_model(model):
    if _is_hf_llava(model):
        return model.model.language_model  # the text model (transformers 5 has no shortcut)
    return model.language_model


def _apply_attention(model, name):
    lm = _language_model(model)
    if hasattr(lm, "set_attn_implementation"):
        lm.set_attn_implementation(name)
    else:  # the LM reads its config at every forward
        lm.config._attn_implementation = name


def _set_attention(model, state, name, spec: KVCacheSpec):
    previous = getattr(_language_model(model).config, "_attn_implementation", None)
    if spec.quantized and not str(name or previous).startswith("pllava_fast"):
        raise ValueError(f"kv_cache={spec.kind!r} needs pllava-fast attention (attention='auto', "
                         f"'sdpa' or 'flash_attention_2'), got attention={name or previous!r}")
    if name is None or previous == name:
        return
    try:
        _apply_attention(model, name)
    except (ValueError, ImportError) as exc:
        raise ValueError(f"attention backend {name!r} is not available for this model: {exc}") from exc
    state["attention"] = previous


def _install_cache(model, state, spec: KVCacheSpec):
    """Make a transformers Llava's generate() calls that pass no cache use a fresh cache of
    ``spec`` (a PLLaVA model's own generate() builds it from ``kv_cache_spec``)."""
    original = model.generate
    keyword = generate_cache_kwarg(model)

    @functools.wraps(original)
    def generate(*args, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is None:
            kwargs[keyword] = make_cache(spec, model.config)
        return original(*args, **kwargs)

    _set(state, model, "generate", generate)


# -- inputs for a Llava in video mode ------------------------------------------------------------
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
    inner, projector, vcfg, config = _llava_parts(model)
    if not isinstance(projector, PllavaProjector):
        raise ValueError("the model is not in video mode: call pllava_fast.patch(model) first")
    num_frames = projector.video.num_frames
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
            video = read_video(video, num_frames=num_frames)
        if isinstance(video, Tensor) and video.dim() == 4 and video.is_floating_point():
            values = video.to(device, dtype)  # already model input (T, 3, S, S)
        else:
            values = frames_to_pixel_values(video, device=device, dtype=dtype,
                                            image_size=vcfg.image_size)
        pixels.append(repeat_short_clips(values, [values.shape[0]], num_frames))
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
