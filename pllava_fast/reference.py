"""The original PLLaVA forward order, as the baseline for tests and benchmarks.

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

from typing import Sequence

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache

from .model import cache_kwarg_name


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
