"""PLLaVA's multimodal projector, reordered: linear_1 -> (act + adaptive pool, fused) -> linear_2.

The original applies linear_2 to every frame token and then averages. Each pooled cell is a convex
average of tokens, and linear_2 is affine (W y + b with weights summing to 1), so
``pool(linear_2(y)) == linear_2(pool(y))`` exactly; pooling first runs linear_2 on 4x fewer tokens
with the default (16, 12, 12) pool over a (16, 24, 24) grid.

The projector owns the video side of the model: PLLaVA's short-clip rule (``repeat_short_clips``)
and the token grid it reads from its ``video`` settings (the model's ``PllavaConfig``, or a
``VideoPooling`` for a transformers Llava in video mode), which are the one place
``num_frames`` / ``frame_shape`` / ``pooling_shape`` live.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
from torch import Tensor, nn
from transformers.activations import ACT2FN

from . import ops


@dataclasses.dataclass
class VideoPooling:
    """The video settings a projector reads, with PllavaConfig's field names.

    num_frames: frames per video; frame_shape: (H, W) patch grid of a frame; pooling_shape:
    (t, h, w) pooled grid; use_pooling: gates the short-clip repeat (as PLLaVA's config).
    """

    num_frames: int
    frame_shape: tuple[int, int]
    pooling_shape: tuple[int, int, int]
    use_pooling: bool = True


def repeat_short_clips(features: Tensor, counts: Sequence[int], num_frames: int,
                       use_pooling: bool = True) -> Tensor:
    """PLLaVA's short-clip rule, per video: (sum counts, ...) -> (videos * num_frames, ...).

    An image (1 frame) is repeated num_frames times; with ``use_pooling`` a clip of
    n < num_frames frames becomes ``repeat_interleave(int(num_frames / n) + 1)[:num_frames]``.
    """
    t = int(num_frames)
    if all(n == t for n in counts):
        return features
    videos = []
    for i, video in enumerate(torch.split(features, list(counts))):
        n = video.shape[0]
        if n == 1:
            video = video.expand(t, *video.shape[1:])
        elif n < t and use_pooling:
            video = video.repeat_interleave(t // n + 1, dim=0)[:t]
        elif n != t:
            raise ValueError(
                f"video {i} has {n} frames but the model takes num_frames={t}"
                + ("" if n > t else " (use_pooling=False disables the short-clip repeat)"))
        videos.append(video)
    return torch.cat(videos)


class PllavaProjector(nn.Module):
    """linear_1 (vision width -> LM width), act + pool, linear_2 (LM width -> LM width).

    Parameter names match PLLaVA's checkpoints: ``multi_modal_projector.linear_{1,2}.{weight,bias}``.
    ``linear_1`` / ``linear_2`` / ``act`` may be given (a Llava's own modules, shared, not copied).
    """

    def __init__(self, vision_hidden: int, text_hidden: int, act: str, video, *,
                 linear_1: nn.Linear | None = None, linear_2: nn.Linear | None = None,
                 act_module: nn.Module | None = None):
        super().__init__()
        if act not in ops.ACTIVATIONS and act not in ACT2FN:
            raise ValueError(f"projector_hidden_act {act!r} is not a transformers activation")
        self.linear_1 = linear_1 if linear_1 is not None else nn.Linear(vision_hidden, text_hidden)
        self.linear_2 = linear_2 if linear_2 is not None else nn.Linear(text_hidden, text_hidden)
        # PLLaVA accepts any transformers activation; those the pooling op cannot fuse run as
        # transformers' module before an identity pool (pooling stays exact, only unfused)
        self.act = act if act in ops.ACTIVATIONS else (act_module or ACT2FN[act])
        self.video = video

    # read through to ``video``, the one home of these values
    @property
    def num_frames(self) -> int:
        return int(self.video.num_frames)

    @property
    def frame_shape(self) -> tuple[int, int]:
        return tuple(self.video.frame_shape)

    @property
    def pooling_shape(self) -> tuple[int, int, int]:
        return tuple(self.video.pooling_shape)

    @property
    def num_visual_tokens(self) -> int:
        return math.prod(self.pooling_shape)

    def activate(self, hidden: Tensor) -> Tensor:
        """The activation alone (unfused), for the original-order pass of the profiler."""
        return ops.apply_activation(hidden, self.act) if isinstance(self.act, str) else self.act(hidden)

    def forward(self, features: Tensor) -> Tensor:
        """features (B*num_frames, H*W, D_vision), frame-major per video -> (B, t*h*w, D_llm)."""
        video = self.video
        if features.shape[0] % video.num_frames:
            raise ValueError(f"the projector got {features.shape[0]} frames, not a multiple of "
                             f"num_frames={video.num_frames}")
        hidden = self.linear_1(features)
        act = self.act
        if not isinstance(act, str):
            hidden, act = act(hidden), "identity"
        pooled = ops.pool_visual_tokens(
            hidden, video.num_frames, video.frame_shape, video.pooling_shape, act=act)
        return self.linear_2(pooled)

    def extra_repr(self) -> str:
        v = self.video
        return (f"act={self.act}, num_frames={v.num_frames}, frame_shape={tuple(v.frame_shape)}, "
                f"pooling_shape={tuple(v.pooling_shape)}")
