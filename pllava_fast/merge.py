"""Videos into the prompt: which frames belong to which video, and each video's image token
expanded in place into its pooled visual tokens (PLLaVA's merge, left padding kept)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def split_frames(n_frames: int, frames_per_video: Sequence[int] | None, num_frames: int) -> list[int]:
    """Frames of each video; default: videos of ``num_frames`` (or one shorter clip)."""
    t = num_frames
    if frames_per_video is None:
        if n_frames % t == 0:
            return [t] * (n_frames // t)
        if n_frames < t:
            return [n_frames]
        raise ValueError(
            f"{n_frames} frames is not a multiple of num_frames={t}: pass frames_per_video")
    counts = [int(n) for n in frames_per_video]
    if any(n <= 0 for n in counts) or sum(counts) != n_frames:
        raise ValueError(f"frames_per_video {counts} must be positive and sum to the "
                         f"{n_frames} frames of pixel_values")
    return counts


def video_layout(pixel_values: Tensor, frames_per_video, media_type):
    """(pixel_values as (sum frames, 3, S, S), frames_per_video): a (B, T, 3, S, S) tensor is B
    videos of T frames; ``media_type="image"`` (PLLaVA's forward) makes every frame a video."""
    if media_type not in (None, "video", "image"):
        raise ValueError(f"media_type must be 'video' or 'image', got {media_type!r}")
    if pixel_values.dim() == 5:
        b, t = pixel_values.shape[:2]
        pixel_values = pixel_values.flatten(0, 1)
        frames_per_video = frames_per_video or [t] * b
    if media_type == "image" and frames_per_video is None:
        frames_per_video = [1] * pixel_values.shape[0]
    return pixel_values, frames_per_video


def repeat_videos_per_row(pixel_values: Tensor, frames_per_video, media_type, input_ids: Tensor,
                          expand_size: int, image_token_index: int, num_frames: int):
    """Beam search / num_return_sequences repeat each prompt row ``expand_size`` times: repeat
    the videos of each row with it. Returns (pixel_values, frames_per_video)."""
    pixel_values, frames_per_video = video_layout(pixel_values, frames_per_video, media_type)
    counts = split_frames(pixel_values.shape[0], frames_per_video, num_frames)
    videos = list(torch.split(pixel_values, counts))
    per_row = (input_ids == image_token_index).sum(-1).tolist()
    if sum(per_row) != len(videos):
        raise ValueError(f"input_ids hold {sum(per_row)} image tokens but pixel_values has "
                         f"{len(videos)} videos")
    new_videos, new_counts, k = [], [], 0
    for n in per_row:
        row = videos[k:k + n]
        k += n
        for _ in range(expand_size):
            new_videos += row
            new_counts += [v.shape[0] for v in row]
    return torch.cat(new_videos), new_counts


def merge_visual_tokens(input_ids: Tensor, attention_mask: Tensor | None, video_embeds: Tensor,
                        text_embeds: Tensor, image_token_index: int):
    """Expand each image token in place into its video's tokens.

    input_ids (B, L) with one image token per video (row-major video order), their embeddings
    text_embeds (B, L, D), video_embeds (n_videos, V, D). Returns inputs_embeds (B, L', D),
    attention_mask (B, L'), position_ids (B, L'): rows are aligned right when left-padded
    (PLLaVA's rule), left otherwise.
    """
    image = input_ids == image_token_index
    n_videos, n_vis, _ = video_embeds.shape
    if int(image.sum()) != n_videos:
        raise ValueError(f"input_ids hold {int(image.sum())} image tokens "
                         f"(id {image_token_index}) but {n_videos} videos were given")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    bsz, seq = input_ids.shape
    # last slot of each source token in its expanded row
    end = torch.cumsum(image.long() * (n_vis - 1) + 1, dim=-1) - 1
    row_len = end[:, -1] + 1
    total = int(row_len.max())
    left_padding = not bool((attention_mask[:, -1] == 0).any())
    if left_padding:
        end = end + (total - row_len)[:, None]
    start = end - image.long() * (n_vis - 1)

    embeds = text_embeds.new_zeros(bsz, total, text_embeds.shape[-1])
    mask = attention_mask.new_zeros(bsz, total)
    rows = torch.arange(bsz, device=input_ids.device)[:, None].expand(bsz, seq)
    text = ~image
    embeds[rows[text], start[text]] = text_embeds[text]
    mask[rows[text], start[text]] = attention_mask[text]
    slots = start[image][:, None] + torch.arange(n_vis, device=input_ids.device)
    img_rows = rows[image][:, None].expand_as(slots)
    embeds[img_rows, slots] = video_embeds.to(embeds.dtype)
    mask[img_rows, slots] = 1
    position_ids = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return embeds, mask, position_ids
