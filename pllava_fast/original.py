"""The original PLLaVA end to end, as the baseline for tests and benchmarks: its decode, its
preprocessing and its forward order (``ReferencePllava``).

Written from the paper and the original code's behaviour, sharing weights with a
``PllavaForConditionalGeneration``:

1. the CLIP tower over all layers with ``output_hidden_states=True``, then the selected layer, CLS
   dropped;
2. the short-clip rule (images repeated to num_frames; shorter clips
   ``repeat_interleave(int(num_frames / n) + 1)[:num_frames]``), applied per video;
3. linear_1 -> act -> linear_2 on every frame token, then PLLaVA's rearranges around
   ``nn.AdaptiveAvgPool3d(pooling_shape)``;
4. PLLaVA's merge (text positions by cumulative sum, left padding detected from the pad id in the
   last column, visual tokens written into the remaining slots, positions from the mask);
5. the LM with a plain ``DynamicCache``; greedy or sampled decoding in a simple loop.
"""
from __future__ import annotations

import os
from typing import Sequence

import av
import numpy as np
import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache

from .compat import cache_kwarg_name
from .preprocess import pllava_geometry
from .timing import StageTimer, _ModelProbe, summarise
from .video.sampling import sample_indices


class ReferencePllava(nn.Module):
    """Original-order PLLaVA over the modules of a fast model (no weights copied)."""

    def __init__(self, config, vision_tower: nn.Module, linear_1: nn.Linear, linear_2: nn.Linear,
                 language_model: nn.Module):
        super().__init__()
        self.config = config
        self.vision_tower = vision_tower
        self.linear_1 = linear_1
        self.linear_2 = linear_2
        self.act = ACT2FN[config.projector_hidden_act]
        self.pooling = nn.AdaptiveAvgPool3d(tuple(config.pooling_shape))
        self.language_model = language_model
        self._cache_kw = cache_kwarg_name(language_model)

    @classmethod
    def from_model(cls, model) -> "ReferencePllava":
        """Share the weights of a ``PllavaForConditionalGeneration``."""
        proj = model.multi_modal_projector
        return cls(model.config, model.vision_tower, proj.linear_1, proj.linear_2, model.language_model)

    # ------------------------------------------------------------------ vision + projector
    def _frames_per_video(self, n_frames: int, frames_per_video) -> list[int]:
        t = self.config.num_frames
        if frames_per_video is not None:
            return [int(n) for n in frames_per_video]
        return [t] * (n_frames // t) if n_frames % t == 0 else [n_frames]

    def get_video_features(self, pixel_values: Tensor,
                           frames_per_video: Sequence[int] | None = None) -> Tensor:
        """(sum frames, 3, S, S) -> (B, t*h*w, D_llm) in the original order."""
        cfg = self.config
        dtype = next(self.vision_tower.parameters()).dtype
        out = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True)
        selected = out.hidden_states[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError("vision_feature_select_strategy 'full' is not implemented (as in PLLaVA)")
        selected = selected[:, 1:]
        t = cfg.num_frames
        videos = []
        for video in torch.split(selected, self._frames_per_video(selected.shape[0], frames_per_video)):
            if video.shape[0] == 1:  # an image
                video = video.repeat(t, 1, 1)
            if video.shape[0] < t and cfg.use_pooling:
                video = video.repeat_interleave(int(t / video.shape[0]) + 1, dim=0)[:t]
            if video.shape[0] != t:
                raise ValueError(f"video with {video.shape[0]} frames, expected {t}")
            videos.append(video)
        hidden = torch.cat(videos)
        hidden = self.linear_2(self.act(self.linear_1(hidden)))
        n_videos = hidden.shape[0] // t
        fh, fw = cfg.frame_shape
        # '(v t) (h w) d -> v d t h w', pool, 'v d t h w -> v (t h w) d'
        grid = hidden.reshape(n_videos, t, fh, fw, hidden.shape[-1]).permute(0, 4, 1, 2, 3)
        pooled = self.pooling(grid)
        return pooled.permute(0, 2, 3, 4, 1).reshape(n_videos, -1, hidden.shape[-1])

    # ------------------------------------------------------------------ merge
    def merge(self, video_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor):
        """PLLaVA's ``_merge_input_ids_with_image_features`` semantics, written fresh."""
        cfg = self.config
        n_videos, n_vis, dim = video_embeds.shape
        bsz, seq = input_ids.shape
        pad = cfg.pad_token_id
        left_padding = not bool((input_ids[:, -1] == pad).any())
        is_image = input_ids == cfg.image_token_index
        total = int(is_image.sum(-1).max()) * (n_vis - 1) + seq
        batch_idx, text_idx = torch.where(~is_image)
        new_pos = torch.cumsum(is_image.long() * (n_vis - 1) + 1, -1) - 1
        image_pad = total - 1 - new_pos[:, -1]
        if left_padding:
            new_pos = new_pos + image_pad[:, None]
        text_to = new_pos[batch_idx, text_idx]
        embeds = self.language_model.get_input_embeddings()(
            input_ids.masked_fill(is_image, pad))
        final = embeds.new_zeros(bsz, total, dim)
        mask = attention_mask.new_zeros(bsz, total)
        final[batch_idx, text_to] = embeds[batch_idx, text_idx]
        mask[batch_idx, text_to] = attention_mask[batch_idx, text_idx]
        filled = torch.zeros(bsz, total, dtype=torch.bool, device=input_ids.device)
        filled[batch_idx, text_to] = True
        free = ~filled
        free &= free.long().cumsum(-1) > image_pad[:, None]
        if int(free.sum()) != n_videos * n_vis:
            raise ValueError(f"{int(is_image.sum())} image tokens do not fit {n_videos} videos")
        final[free] = video_embeds.reshape(-1, dim).to(final.dtype)
        mask = mask | free.to(mask.dtype)
        position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        return final, mask, position_ids

    # ------------------------------------------------------------------ LM
    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None,
                attention_mask: Tensor | None = None, frames_per_video=None, cache=None):
        """Prefill: returns (logits (B, L', V), attention_mask (B, L'), cache)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if pixel_values is not None:
            video = self.get_video_features(pixel_values, frames_per_video)
            embeds, attention_mask, position_ids = self.merge(video, input_ids, attention_mask)
        else:
            embeds = self.language_model.get_input_embeddings()(
                input_ids.masked_fill(input_ids == self.config.image_token_index,
                                      self.config.pad_token_id))
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)
        cache = cache if cache is not None else DynamicCache(config=self.language_model.config)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=True,
                                  **{self._cache_kw: cache})
        return out.logits, attention_mask, cache

    @torch.no_grad()
    def generate(self, input_ids: Tensor, pixel_values: Tensor | None = None,
                 attention_mask: Tensor | None = None, frames_per_video=None,
                 max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 eos_token_id: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Greedy (or temperature-sampled) decoding; returns input_ids + new tokens (B, L + n)."""
        logits, mask, cache = self.forward(input_ids, pixel_values, attention_mask, frames_per_video)
        out = input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            last = logits[:, -1].float()
            if do_sample:
                probs = torch.softmax(last / temperature, -1)
                token = torch.multinomial(probs, 1, generator=generator)[:, 0]
            else:
                token = last.argmax(-1)
            if eos_token_id is not None:
                token = token.masked_fill(done, self.config.pad_token_id)
                done |= token == eos_token_id
            out = torch.cat([out, token[:, None]], 1)
            if step + 1 == max_new_tokens or bool(done.all()):
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            position_ids = mask.long().sum(-1, keepdim=True) - 1
            embeds = self.language_model.get_input_embeddings()(token[:, None])
            logits = self.language_model(inputs_embeds=embeds, attention_mask=mask,
                                         position_ids=position_ids, use_cache=True,
                                         **{self._cache_kw: cache}).logits
        return out


# -- the original-style pipeline -------------------------------------------------------------------
def _decord():
    try:
        import decord
    except ImportError:
        raise ImportError("the original PLLaVA baseline decodes with decord: pip install "
                          "'pllava-fast[bench]' (decord 0.6.0)") from None
    return decord


def original_decode(path, num_frames: int, *, start=None, end=None):
    """PLLaVA's reader: ``decord.VideoReader(path)``, ``get_index`` over ``len(vr)`` frames
    (``sample_indices``; time bounds with decord's average fps), ``get_batch`` (decord seeks to
    keyframes and decodes on), then each frame as a PIL image."""
    from PIL import Image

    vr = _decord().VideoReader(os.fspath(path))
    idx = sample_indices(len(vr), num_frames, fps=vr.get_avg_fps(), start=start, end=end)
    return [Image.fromarray(f) for f in vr.get_batch(idx).asnumpy()]


def decode_every_frame(path, num_frames: int, *, start=None, end=None):
    """A weaker baseline beside the original (torchvision's ``read_video`` / vLLM style): every
    frame of ``path`` decoded to RGB with PyAV, then the sampled ones as PIL images."""
    from PIL import Image

    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else None
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    if not frames:
        raise ValueError(f"{path}: no video frames")
    idx = sample_indices(len(frames), num_frames, fps=fps, start=start, end=end)
    return [Image.fromarray(frames[i]) for i in idx]


def original_preprocess(images, image_size: int, processor=None) -> torch.Tensor:
    """PllavaProcessor-style: Pillow bicubic resize to the shared short edge and crop to the
    shared aspect (per frame), then CLIPImageProcessorPil (resize, center crop, normalize)."""
    from PIL import Image

    if processor is None:
        processor = clip_processor(image_size)
    w, h = images[0].size
    h1, w1, top, left, hc, wc = pllava_geometry([(h, w)], image_size)[0][:6]
    cropped = [np.asarray(img.resize((w1, h1), Image.BICUBIC))[top:top + hc, left:left + wc]
               for img in images]
    return processor(cropped, return_tensors="pt")["pixel_values"]


def clip_processor(image_size: int):
    """transformers' CLIPImageProcessorPil at ``image_size`` (resize shortest edge, center crop)."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})


class OriginalPipeline:
    """The baseline: decord decode, PIL preprocessing, ``ReferencePllava`` on shared weights.

    ``decode`` picks the video reader: ``original_decode`` (decord, the default) or
    ``decode_every_frame`` (the weaker, labelled baseline).
    """

    def __init__(self, pipe, decode=original_decode):
        self.pipe, self.decode = pipe, decode
        self.reference = ReferencePllava.from_model(pipe.model)
        self.processor = clip_processor(pipe.image_size)

    def __call__(self, videos, question, *, max_new_tokens: int):
        pipe, timer = self.pipe, StageTimer(self.pipe.device)
        with timer.stage("video_decode"):
            frames = [self.decode(v, pipe.num_frames) for v in videos]
        with timer.stage("preprocess"):
            pixels = torch.cat([original_preprocess(f, pipe.image_size, self.processor)
                                for f in frames]).to(pipe.device, pipe.dtype)
        inputs = pipe.tokenize(pipe.prompts([question] * len(videos)))
        probe = _ModelProbe(self.reference, timer, part=("vision", "vision_tower"),
                            rest="projector")
        with torch.inference_mode(), probe, timer.stage("model"):
            out = self.reference.generate(inputs["input_ids"], pixels, inputs["attention_mask"],
                                          max_new_tokens=max_new_tokens, eos_token_id=None)
        new = out[:, inputs["input_ids"].shape[1]:]
        return new.cpu(), summarise(timer, len(videos), new.shape[1])
