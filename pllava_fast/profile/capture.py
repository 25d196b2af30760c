"""Capturing token norms from the model at the three points (``vision``, ``projector``,
``pooled``; see ``pllava_fast.profile``)."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
from torch import Tensor

from .. import ops

POINTS = ("vision", "projector", "pooled")


@dataclasses.dataclass
class TokenNorms:
    """Norm grids of one video: point name -> (T, H, W) fp32 CPU tensor (see module docstring)."""

    vision: Tensor
    projector: Tensor
    pooled: Tensor

    def as_dict(self) -> dict[str, Tensor]:
        return {p: getattr(self, p) for p in POINTS}


def _frame_shape(model, tokens_per_frame: int) -> tuple[int, int]:
    shape = getattr(model.config, "frame_shape", None)
    if shape is not None and int(shape[0]) * int(shape[1]) == tokens_per_frame:
        return int(shape[0]), int(shape[1])
    side = math.isqrt(tokens_per_frame)
    if side * side != tokens_per_frame:
        raise ValueError(f"cannot lay out {tokens_per_frame} tokens per frame as a grid; set "
                         "config.frame_shape")
    return side, side


def _grid_norms(x: Tensor, grid: Sequence[int]) -> Tensor:
    """(..., C) tokens -> fp32 CPU norms shaped ``grid``."""
    return ops.token_norms(x.reshape(1, -1, x.shape[-1])).reshape(*grid).cpu()


@torch.no_grad()
def norms_from_features(model, features: Tensor,
                        frames_per_video: Sequence[int] | None = None) -> list[TokenNorms]:
    """Token norms at the three points, from vision features.

    Args:
        model: a PLLaVA model (``prepare_video_frames``, ``multi_modal_projector``, ``config``).
        features: (sum of frames, H*W, D_vision), the output of ``model.vision_features``.
        frames_per_video: frames of each video in ``features`` (default: all ``num_frames``).

    Returns one :class:`TokenNorms` per video.
    """
    if not isinstance(features, Tensor) or features.dim() != 3:
        raise ValueError(f"features must be a (frames, H*W, D) tensor, got "
                         f"{getattr(features, 'shape', type(features).__name__)}")
    cfg = model.config
    num_frames = int(cfg.num_frames)
    if frames_per_video is None:
        if features.shape[0] % num_frames:
            raise ValueError(f"{features.shape[0]} frames are not a multiple of num_frames="
                             f"{num_frames}; pass frames_per_video")
        frames_per_video = [num_frames] * (features.shape[0] // num_frames)
    frames_per_video = [int(n) for n in frames_per_video]
    if sum(frames_per_video) != features.shape[0] or min(frames_per_video, default=0) <= 0:
        raise ValueError(f"frames_per_video {frames_per_video} does not add up to the "
                         f"{features.shape[0]} frames of features")
    out = []
    for feats in torch.split(features, frames_per_video):
        prepared = model.prepare_video_frames(feats, [feats.shape[0]])
        pooled = model.multi_modal_projector(prepared)
        out.append(_video_norms(model, feats, prepared, pooled[0]))
    return out


def _video_norms(model, vision: Tensor, prepared: Tensor, pooled: Tensor) -> TokenNorms:
    """One video's norm grids: vision (T, H*W, D_v) features, the projector's input prepared
    (num_frames, H*W, D_v) and its pooled output (t*h*w, D_llm). Adds the original-order
    projector pass linear_2(act(linear_1(prepared)))."""
    projector = model.multi_modal_projector
    h, w = _frame_shape(model, vision.shape[1])
    full = projector.linear_2(projector.activate(projector.linear_1(prepared)))
    return TokenNorms(
        vision=_grid_norms(vision, (vision.shape[0], h, w)),
        projector=_grid_norms(full, (prepared.shape[0], h, w)),
        pooled=_grid_norms(pooled, _pooled_grid(model, pooled.shape[0], (prepared.shape[0], h, w))),
    )


def _pooled_grid(model, num_tokens: int, source: Sequence[int]) -> tuple[int, int, int]:
    shape = getattr(model.config, "pooling_shape", None)
    if shape is not None and math.prod(int(v) for v in shape) == num_tokens:
        return tuple(int(v) for v in shape)
    if math.prod(source) == num_tokens:  # pooling disabled: tokens keep the input grid
        return tuple(source)
    raise ValueError(f"the projector returned {num_tokens} tokens per video, which matches neither "
                     f"pooling_shape {shape} nor the input grid {tuple(source)}")


@torch.no_grad()
def capture_token_norms(model, pixel_values: Tensor,
                        frames_per_video: Sequence[int] | None = None) -> list[TokenNorms]:
    """Token norms at the three points for (sum of frames, 3, S, S) pixel values: one
    :class:`TokenNorms` per video (runs the vision tower once, the projector twice)."""
    features = model.vision_features(pixel_values)
    return norms_from_features(model, features, frames_per_video)


class NormRecorder:
    """Records the token norms of every video the model's projector sees while the context is
    open, e.g. during ``model.generate(...)`` on real inputs::

        with NormRecorder(model) as rec:
            model.generate(**inputs, pixel_values=pv, max_new_tokens=64)
        report = build_report(rec.norms[0])

    A forward hook on ``model.multi_modal_projector`` reads its input and pooled output and adds
    the original-order projector pass; generation itself is unchanged. Here the ``vision`` point is
    the projector's input, i.e. after PLLaVA's short-clip repeat (num_frames frames per video).
    ``norms``: one :class:`TokenNorms` per video, in call order.
    """

    def __init__(self, model):
        self.model = model
        self.norms: list[TokenNorms] = []
        self._handle = None

    def __enter__(self) -> "NormRecorder":
        self._handle = self.model.multi_modal_projector.register_forward_hook(
            self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @torch.no_grad()
    def _hook(self, module, args, kwargs, output) -> None:
        features = args[0] if args else kwargs["features"]
        num_frames = int(module.video.num_frames)
        for v, prepared in enumerate(torch.split(features, num_frames)):
            self.norms.append(_video_norms(self.model, prepared, prepared, output[v]))
