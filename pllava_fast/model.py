"""PllavaForConditionalGeneration: CLIP frames -> pooled visual tokens -> causal LM, on transformers 5.

Reuses transformers' ``CLIPVisionModel`` and ``AutoModelForCausalLM`` (Llama, Mistral; Yi is Llama)
and their ``generate()``. Differences from the original forward, all exact up to float rounding:

* the vision tower runs only up to ``vision_feature_layer`` and keeps only that output;
* the projector pools right after the activation, before linear_2 (see ``projector.py``);
* the short-clip repeat rule is applied per video, so a batch may mix clip lengths.

Prompts hold one ``image_token_index`` per video; it expands in place to the video's
``prod(pooling_shape)`` visual tokens at prefill. ``generate()`` keeps the expanded attention mask
between steps, so left-padded batches and every decoding strategy of GenerationMixin work.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, CLIPVisionModel, GenerationConfig, GenerationMixin
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention import PLLAVA_ATTENTION, install_attention
from .compat import cache_kwarg_name, cache_length, clip_transformer
from .config import PllavaConfig
from .devices import resolve_dtype
from .kv_cache import make_cache
from .kv_spec import KVCacheSpec
from .llm_decode import CompiledDecoder
from .loading import (check_load_arguments, dispatch_model, fast_init, load_into, merge_lora,
                      read_state_dict, save_checkpoint)
from .merge import (merge_visual_tokens, repeat_videos_per_row, split_frames,
                    video_layout)
from .projector import PllavaProjector, repeat_short_clips
from .weight_quant import WeightSpec, check_weights, quantize_weights

_VISION_ATTN = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


@dataclass
class PllavaCausalLMOutput(CausalLMOutputWithPast):
    """The LM's output plus, at prefill, the attention mask of the expanded (merged) sequence."""

    attention_mask: Tensor | None = None


class PllavaForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """PLLaVA video-language model (parameter names as PLLaVA's checkpoints)."""

    config_class = PllavaConfig
    main_input_name = "input_ids"
    base_model_prefix = "pllava"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["CLIPEncoderLayer", "LlamaDecoderLayer", "MistralDecoderLayer"]

    def __init__(self, config: PllavaConfig, attn_implementation: str = "sdpa"):
        super().__init__(config)
        if config.pad_token_id is None:
            raise ValueError("pad_token_id is missing from config.json and text_config: PLLaVA "
                             "embeds the image token as pad, so it needs one")
        vision_config, text_config = config.vision_config, config.text_config
        vision_config._attn_implementation = (
            attn_implementation if attn_implementation in _VISION_ATTN else "sdpa")
        text_config._attn_implementation = attn_implementation
        self.vision_tower = CLIPVisionModel(vision_config)
        self.multi_modal_projector = PllavaProjector(
            vision_config.hidden_size, text_config.hidden_size, config.projector_hidden_act, config)
        self.language_model = AutoModelForCausalLM.from_config(text_config)
        self._cache_kw = cache_kwarg_name(self.language_model)
        self._lm_params = set(inspect.signature(self.language_model.forward).parameters)
        layers = self.vision_model.encoder.layers
        self._layer_kwargs = (
            {"causal_attention_mask": None}
            if "causal_attention_mask" in inspect.signature(layers[0].forward).parameters else {})
        # what generate() builds when it is given no cache (see KVCacheSpec), and whether it
        # decodes greedily with a static cache and a compiled step (llm_decode)
        self.kv_cache_spec = KVCacheSpec()
        self.compile_decode = False
        self._decoder = None
        self.post_init()

    @property
    def vision_model(self) -> nn.Module:
        """The CLIP transformer (embeddings, pre_layrnorm, encoder)."""
        return clip_transformer(self.vision_tower)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path, *, torch_dtype=None, dtype=None, attn_implementation: str = "sdpa",
                        lora_alpha: float = 4.0, device=None, device_map=None, max_memory=None,
                        kv_cache="model-dtype", kv_cache_options: dict | None = None,
                        compile: bool = False, weights=None, weight_options: dict | None = None,
                        **config_overrides):
        """Load a PLLaVA checkpoint directory (config.json + weights, see ``loading.py``).

        Args:
            torch_dtype / dtype: weights dtype: a torch dtype, its name, "auto" (default: bf16 on
                CUDA, fp32 on CPU) or "checkpoint" (the dtype config.json records).
            attn_implementation: "sdpa" (default), "eager", "flash_attention_2", ... passed to the LM.
            lora_alpha: LoRA alpha for peft-saved checkpoints (scale = lora_alpha / r).
            device: where to put the model (not with ``device_map``).
            device_map: place the modules with accelerate instead (see ``loading.dispatch_model``):
                "auto", "balanced", "balanced_low_0", "sequential" or a {module name: device}
                dict, e.g. to split the 34B model over several GPUs.
            max_memory: with ``device_map``: {device: "40GiB", ...} bounds for the automatic maps.
            kv_cache: a ``KVCacheSpec`` or its kind: "model-dtype" (transformers' DynamicCache),
                "int8", "int4" or "fp8": every ``generate()`` given no cache then builds a
                ``QuantizedKVCache``; they need pllava-fast attention ("sdpa" or
                "flash_attention_2" here).
            kv_cache_options: QuantizedKVCache options with a kind: ``window``, ``group_size``,
                ``block``, ``key_quant``.
            compile: greedy ``generate()`` calls prefill eagerly into a static cache of the
                ``kv_cache`` kind and run each decode step compiled (``llm_decode``; CUDA graphs
                on GPU); sampling and beam search then raise (they need compile=False).
            weights / weight_options: "int8" / "int4" weight-only LLM linears through torchao
                (``weight_quant.WeightSpec``: group_size, lm_head, embeddings, vision,
                projector); checked on the device first; "auto" dtype is then bf16 on CPU too
                (torchao's fast CPU path).
            config_overrides: replace config fields (e.g. ``num_frames=4``, ``pooling_shape=...``).
        """
        # every argument is checked before the weights are read: a mistake fails in a moment,
        # not after a 34B load
        spec = KVCacheSpec.of(kv_cache, kv_cache_options)
        check_load_arguments(spec, device=device, device_map=device_map, max_memory=max_memory,
                             attn_implementation=attn_implementation, lora_alpha=lora_alpha,
                             compile=compile, pllava_attention=PLLAVA_ATTENTION)
        weight_spec = WeightSpec.of(weights, weight_options)
        path = os.fspath(path)
        config = PllavaConfig.from_pretrained(path, **config_overrides)
        asked = dtype if dtype is not None else torch_dtype
        dtype = resolve_dtype(asked, device, config)
        if weight_spec is not None and asked in (None, "auto"):
            dtype = torch.bfloat16
        check_weights(weight_spec, _weights_device(device, device_map), dtype)
        state = merge_lora(read_state_dict(path), lora_alpha=lora_alpha)
        with fast_init(dtype):
            model = cls(config, attn_implementation=attn_implementation)
        load_into(model, state, source=f"checkpoint {path!r}", tied=model._tied_names(),
                  optional=model.unused_vision_weights())
        if model._tied_names():
            model.language_model.lm_head.weight = model.language_model.get_input_embeddings().weight
        # params were built in dtype; a blanket .to(dtype) would also round fp32 buffers
        # (rotary inv_freq) that transformers keeps in fp32
        if os.path.isfile(os.path.join(path, "generation_config.json")):
            model.generation_config = GenerationConfig.from_pretrained(path)
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = config.pad_token_id
        model.name_or_path = path
        model.eval()
        if device_map is not None:
            model = dispatch_model(model, device_map, max_memory)
        elif device is not None:
            model = model.to(device)
        if weight_spec is not None:
            quantize_weights(model, weight_spec)
        if spec.quantized:
            install_attention(model, attn_implementation)
        model.kv_cache_spec = spec
        model.compile_decode = compile
        return model

    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate``; with a quantized ``kv_cache_spec`` and no cache given, a
        fresh cache of that spec is passed in. With ``compile_decode``, greedy generation runs in
        ``llm_decode.CompiledDecoder`` (other strategies raise a ValueError naming the option)."""
        given = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        if self.compile_decode and not given:
            return self.decoder(*args, **kwargs)
        if self.kv_cache_spec.quantized and not given:
            kwargs[self._cache_kw] = make_cache(self.kv_cache_spec, self.config)
        return super().generate(*args, **kwargs)

    @property
    def decoder(self) -> CompiledDecoder:
        """The compiled greedy loop for the current ``kv_cache_spec`` (built on first use)."""
        if self._decoder is None or self._decoder.spec != self.kv_cache_spec:
            self._decoder = CompiledDecoder(self, self.kv_cache_spec)
        return self._decoder

    def save_pretrained(self, path, **_):
        """Write config.json, model.safetensors (PLLaVA's names) and generation_config.json."""
        if getattr(self, "_weight_spec", None) is not None:
            raise ValueError(f"a model with weights={self._weight_spec.kind!r} cannot be saved "
                             "(torchao's quantized tensors are not safetensors): save the "
                             "unquantized model and quantize at load time with "
                             "from_pretrained(..., weights=...)")
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self.config.save_pretrained(path)
        self.generation_config.save_pretrained(path)
        save_checkpoint(self, path, tied=self._tied_names())

    def _tied_names(self) -> set[str]:
        tied = getattr(self.config.text_config, "tie_word_embeddings", False)
        return {"language_model.lm_head.weight"} if tied else set()

    def _init_weights(self, module):
        # only tiny test models are built from scratch; the submodels init themselves
        if isinstance(module, nn.Linear) and module in (self.multi_modal_projector.linear_1,
                                                        self.multi_modal_projector.linear_2):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    # ------------------------------------------------------------------ vision
    def _vision_layers_needed(self) -> int:
        n_layers = len(self.vision_model.encoder.layers)
        k = int(self.config.vision_feature_layer)
        if not -(n_layers + 1) <= k <= n_layers:
            raise ValueError(f"vision_feature_layer {k} out of range for a {n_layers}-layer tower")
        return k % (n_layers + 1)  # hidden_states[0] is the embedding output

    def unused_vision_weights(self) -> set[str]:
        """Names of the vision weights no output depends on (layers after vision_feature_layer,
        post_layernorm): a checkpoint may omit them."""
        needed = self._vision_layers_needed()
        prefix = "vision_tower." + ("vision_model." if hasattr(self.vision_tower, "vision_model") else "")
        return {k for k in self.state_dict() if k.startswith(prefix) and (
            k.startswith(prefix + "post_layernorm.") or any(
                k.startswith(f"{prefix}encoder.layers.{i}.")
                for i in range(needed, len(self.vision_model.encoder.layers))))}

    def vision_features(self, pixel_values: Tensor) -> Tensor:
        """(N_frames, 3, S, S) -> (N_frames, H*W, D_vision): CLIP run only up to
        ``vision_feature_layer``, that layer's output with CLS dropped."""
        if self.config.vision_feature_select_strategy != "default":
            raise ValueError(
                f"vision_feature_select_strategy {self.config.vision_feature_select_strategy!r} is "
                "not supported: PLLaVA pools a frame_shape grid of patch tokens, so only 'default' "
                "(CLS dropped) works")
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be a (frames, 3, S, S) tensor, got "
                             f"{getattr(pixel_values, 'shape', type(pixel_values))}")
        vm = self.vision_model
        param = vm.embeddings.patch_embedding.weight
        h = vm.pre_layrnorm(vm.embeddings(pixel_values.to(device=param.device, dtype=param.dtype)))
        for layer in vm.encoder.layers[:self._vision_layers_needed()]:
            out = layer(h, None, **self._layer_kwargs)
            h = out[0] if isinstance(out, tuple) else out
        return h[:, 1:]

    def split_frames(self, n_frames: int, frames_per_video: Sequence[int] | None) -> list[int]:
        """Frames of each video (see ``merge.split_frames``)."""
        return split_frames(n_frames, frames_per_video, self.config.num_frames)

    def prepare_video_frames(self, features: Tensor,
                             frames_per_video: Sequence[int] | None = None) -> Tensor:
        """PLLaVA's short-clip rule, per video: (sum frames, H*W, D) -> (B*num_frames, H*W, D)
        (see ``projector.repeat_short_clips``)."""
        counts = self.split_frames(features.shape[0], frames_per_video)
        return repeat_short_clips(features, counts, self.config.num_frames, self.config.use_pooling)

    def get_video_features(self, pixel_values: Tensor,
                           frames_per_video: Sequence[int] | None = None) -> Tensor:
        """(sum frames, 3, S, S) -> (B, t*h*w, D_llm) pooled visual tokens, one row per video."""
        features = self.prepare_video_frames(self.vision_features(pixel_values), frames_per_video)
        return self.multi_modal_projector(features)

    # ------------------------------------------------------------------ merge
    def embed_text(self, input_ids: Tensor) -> Tensor:
        """Token embeddings; image tokens (possibly outside the table) embed as pad, as PLLaVA."""
        ids = input_ids.masked_fill(input_ids == self.config.image_token_index, self.config.pad_token_id)
        return self.get_input_embeddings()(ids)

    def merge_visual_tokens(self, input_ids: Tensor, attention_mask: Tensor | None,
                            video_embeds: Tensor):
        """Expand each image token in place into its video's tokens (see
        ``merge.merge_visual_tokens``): (inputs_embeds, attention_mask, position_ids)."""
        return merge_visual_tokens(input_ids, attention_mask, video_embeds, self.embed_text(input_ids),
                                   self.config.image_token_index)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor | None = None,
        pixel_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache=None,
        past_key_values=None,
        inputs_embeds: Tensor | None = None,
        frames_per_video: Sequence[int] | None = None,
        media_type: str | None = None,
        vision_feature_layer: int | None = None,
        vision_feature_select_strategy: str | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | Tensor = 0,
        labels: Tensor | None = None,
        **kwargs,
    ) -> PllavaCausalLMOutput:
        """Prefill (with pixel_values) or decode step (without) through the LM.

        input_ids (B, L) with one image token per video; pixel_values (sum frames, 3, S, S),
        frame-major per video; ``frames_per_video`` when videos have different frame counts. In
        decode steps ``attention_mask`` covers the cached (expanded) sequence plus the new tokens.
        ``cache`` / ``past_key_values``: a transformers Cache, passed to the LM. ``media_type``
        ("video" | "image", as PLLaVA's forward): "image" makes every frame its own video.
        pixel_values may also be (B, T, 3, S, S), B videos of T frames.
        """
        if labels is not None:
            raise ValueError("labels are not supported: pllava-fast is an inference package")
        for name, value in (("vision_feature_layer", vision_feature_layer),
                            ("vision_feature_select_strategy", vision_feature_select_strategy)):
            if value is not None and value != getattr(self.config, name):
                raise ValueError(f"{name}={value!r} differs from the config's "
                                 f"{getattr(self.config, name)!r}: set it in the config instead")
        cache = cache if cache is not None else past_key_values
        kwargs.pop("cache_position", None)  # positions of the un-expanded ids: recomputed below
        merged_mask = None
        device = self.get_input_embeddings().weight.device
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            input_ids = input_ids.to(device)
            if attention_mask is not None:
                attention_mask = attention_mask.to(device)
            if pixel_values is not None:
                pixel_values, frames_per_video = video_layout(
                    pixel_values, frames_per_video, media_type)
                video_embeds = self.get_video_features(pixel_values, frames_per_video)
                inputs_embeds, attention_mask, position_ids = self.merge_visual_tokens(
                    input_ids, attention_mask, video_embeds)
                merged_mask = attention_mask
            else:
                inputs_embeds = self.embed_text(input_ids)
        cur_len = inputs_embeds.shape[1]
        past = cache_length(cache)
        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2 \
                and attention_mask.shape[1] == past + cur_len:
            # PLLaVA's positions: count of attended tokens so far (left padding shifts nothing)
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
            position_ids = position_ids[:, -cur_len:]
        lm_kwargs = dict(kwargs)
        if cache is not None:
            lm_kwargs[self._cache_kw] = cache
        if "cache_position" in self._lm_params:
            lm_kwargs["cache_position"] = torch.arange(past, past + cur_len, device=inputs_embeds.device)
        out = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            use_cache=use_cache, logits_to_keep=logits_to_keep, **lm_kwargs)
        return PllavaCausalLMOutput(**dict(out.items()), attention_mask=merged_mask)

    # ------------------------------------------------------------------ generate hooks
    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        cache = inputs.get("cache", inputs.get("past_key_values"))
        if cache_length(cache) > 0:  # visual tokens are merged at prefill only
            inputs.pop("pixel_values", None)
            inputs.pop("frames_per_video", None)
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        # from now on the mask must cover the expanded sequence that the cache holds
        if getattr(outputs, "attention_mask", None) is not None:
            model_kwargs["attention_mask"] = outputs.attention_mask
        model_kwargs.pop("position_ids", None)
        return super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: Tensor | None = None, **model_kwargs):
        # pixel_values is frame-major per video, not per row: repeat whole videos, row by row
        pixel_values = model_kwargs.pop("pixel_values", None)
        frames_per_video = model_kwargs.pop("frames_per_video", None)
        if expand_size > 1 and pixel_values is not None and input_ids is not None:
            pixel_values, frames_per_video = repeat_videos_per_row(
                pixel_values, frames_per_video, model_kwargs.get("media_type"), input_ids,
                expand_size, self.config.image_token_index, self.config.num_frames)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids,
            **model_kwargs)
        if pixel_values is not None:
            model_kwargs["pixel_values"] = pixel_values
        if frames_per_video is not None:
            model_kwargs["frames_per_video"] = frames_per_video
        return input_ids, model_kwargs


def _weights_device(device, device_map):
    """Where quantize_weights will find the LLM: ``device``, else the GPU a device map puts it
    on ("auto" and the other names fill GPUs first), else the CPU."""
    if device is not None:
        return device
    if device_map is None or not torch.cuda.is_available():
        return "cpu"
    if isinstance(device_map, dict) and all(str(d) in ("cpu", "disk") for d in device_map.values()):
        return "cpu"
    return "cuda"
