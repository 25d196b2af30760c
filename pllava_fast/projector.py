"""PLLaVA's multimodal projector, reordered: linear_1 -> (act + adaptive pool, fused) -> linear_2.

The original applies linear_2 to every frame token and then averages. Each pooled cell is a convex
average of tokens, and linear_2 is affine (W y + b with weights summing to 1), so
``pool(linear_2(y)) == linear_2(pool(y))`` exactly; pooling first runs linear_2 on 4x fewer tokens
with the default (16, 12, 12) pool over a (16, 24, 24) grid.
"""
from __future__ import annotations

from torch import Tensor, nn
from transformers.activations import ACT2FN

from . import ops


class PllavaProjector(nn.Module):
    """linear_1 (vision width -> LM width), act + pool, linear_2 (LM width -> LM width).

    Parameter names match PLLaVA's checkpoints: ``multi_modal_projector.linear_{1,2}.{weight,bias}``.
    """

    def __init__(self, vision_hidden: int, text_hidden: int, act: str,
                 frame_shape, pooling_shape):
        super().__init__()
        if act not in ops.ACTIVATIONS and act not in ACT2FN:
            raise ValueError(f"projector_hidden_act {act!r} is not a transformers activation")
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=True)
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=True)
        # PLLaVA accepts any transformers activation; those the pooling op cannot fuse run as
        # transformers' module before an identity pool (pooling stays exact, only unfused)
        self.act = act if act in ops.ACTIVATIONS else ACT2FN[act]
        self.frame_shape = tuple(int(v) for v in frame_shape)
        self.pooling_shape = tuple(int(v) for v in pooling_shape)

    def forward(self, features: Tensor, num_frames: int) -> Tensor:
        """features (B*num_frames, H*W, D_vision), frame-major per video -> (B, t*h*w, D_llm)."""
        hidden = self.linear_1(features)
        act = self.act
        if not isinstance(act, str):
            hidden, act = act(hidden), "identity"
        pooled = ops.pool_visual_tokens(
            hidden, num_frames, self.frame_shape, self.pooling_shape, act=act)
        return self.linear_2(pooled)

    def extra_repr(self) -> str:
        return f"act={self.act}, frame_shape={self.frame_shape}, pooling_shape={self.pooling_shape}"
