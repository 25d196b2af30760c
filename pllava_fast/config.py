"""PLLaVA's config.json as a transformers config.

A released PLLaVA checkpoint's config.json says ``model_type: "llava"`` and carries a CLIP
``vision_config``, a Llama/Mistral ``text_config`` and PLLaVA's pooling fields. The class below reads
it without registering anything with ``AutoConfig`` (the name "llava" belongs to transformers' own
LlavaConfig, which reads the same file and ignores the pooling fields).
"""
from __future__ import annotations

import inspect
import os
from typing import Any

from transformers import AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN

from .checks import flag, int_tuple, is_int, positive_int
from .kernels.adaptive import ACTIVATIONS
from .config_json import read_config_json

# clip-vit-large-patch14-336, the tower of every released PLLaVA
_DEFAULT_VISION = dict(
    model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, patch_size=14,
    image_size=336, num_hidden_layers=24, num_attention_heads=16, projection_dim=768,
)
_DEFAULT_TEXT = dict(model_type="llama")
# what PretrainedConfig itself takes (output_hidden_states, torch_dtype, architectures, ...)
_BASE_FIELDS = frozenset(PretrainedConfig().to_dict())


def _sub_config(value, defaults: dict) -> PretrainedConfig:
    if isinstance(value, PretrainedConfig):
        return value
    if value is None:
        value = dict(defaults)
    if not isinstance(value, dict):
        raise ValueError(f"sub-config must be a dict or a PretrainedConfig, got {type(value).__name__}")
    value = dict(value)
    model_type = value.pop("model_type", defaults["model_type"])
    # a full CLIP config saved as vision_config still describes the vision tower
    if model_type == "clip":
        model_type = "clip_vision_model"
    return AutoConfig.for_model(model_type, **value)


class PllavaConfig(PretrainedConfig):
    """Configuration of a PLLaVA model (CLIP frames -> pooled visual tokens -> causal LM).

    Args:
        vision_config: CLIP vision config (dict or config); default CLIP ViT-L/14-336.
        text_config: causal-LM config (dict with ``model_type`` "llama" / "mistral", or a config).
        image_token_index: id of ``<image>`` in input_ids; may lie outside the LM's embedding table.
        projector_hidden_act: activation between the projector's two linears.
        vision_feature_select_strategy: "default" drops CLS ("full" is not supported, as in PLLaVA).
        vision_feature_layer: hidden-state index of the CLIP output to use (-2: second-to-last layer).
        pooling_shape: (t, h, w) of the adaptive average pool over each video's token grid.
        frame_shape: (H, W) token grid of one frame (image_size / patch_size).
        num_frames: frames per video that the pooling grid expects.
        use_pooling: gates PLLaVA's short-clip rule (clips with fewer frames are repeated); pooling
            itself always runs.
        pad_token_id: id embedded in place of the image token (and left-padding id).
    """

    model_type = "llava"

    def __init__(
        self,
        vision_config: Any = None,
        text_config: Any = None,
        ignore_index: int = -100,
        image_token_index: int = 32000,
        projector_hidden_act: str = "gelu",
        vision_feature_select_strategy: str = "default",
        vision_feature_layer: int = -2,
        vocab_size: int | None = None,
        pooling_method: str = "avg",
        pooling_shape=(16, 12, 12),
        frame_shape=(24, 24),
        num_frames: int = 16,
        use_pooling: bool = True,
        pad_token_id: int | None = None,
        **kwargs,
    ):
        self.vision_config = _sub_config(vision_config, _DEFAULT_VISION)
        self.text_config = _sub_config(text_config, _DEFAULT_TEXT)
        self.ignore_index = ignore_index
        # ids and sizes are checked, not truncated: 1.5 or True must not become 1
        self.image_token_index = positive_int("image_token_index", image_token_index, minimum=0)
        self.projector_hidden_act = projector_hidden_act
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.vision_feature_layer = vision_feature_layer
        self.vocab_size = positive_int(
            "vocab_size", vocab_size if vocab_size is not None else self.text_config.vocab_size)
        self.pooling_method = pooling_method
        # (2.5, 2, 2) or (True, 2, 2) must not become (2, 2, 2) / (1, 2, 2)
        self.pooling_shape = list(int_tuple("pooling_shape", pooling_shape, 3))
        self.frame_shape = list(int_tuple("frame_shape", frame_shape, 2))
        self.num_frames = positive_int("num_frames", num_frames)
        self.use_pooling = flag("use_pooling", use_pooling)
        if pad_token_id is None:
            pad_token_id = getattr(self.text_config, "pad_token_id", None)
        self.pad_token_id = pad_token_id
        kwargs.pop("pad_token_id", None)
        super().__init__(**kwargs)
        self.validate_pllava()

    def validate_pllava(self) -> None:
        """Raise ValueError on fields PLLaVA cannot run with."""
        int_tuple("pooling_shape", self.pooling_shape, 3)
        int_tuple("frame_shape", self.frame_shape, 2)
        positive_int("num_frames", self.num_frames)
        if self.pooling_method != "avg":
            raise ValueError(f"pooling_method {self.pooling_method!r} is not supported (only 'avg')")
        grid = self.vision_config.image_size // self.vision_config.patch_size
        if tuple(self.frame_shape) != (grid, grid):
            raise ValueError(
                f"frame_shape {tuple(self.frame_shape)} does not match the vision tower's patch grid "
                f"{grid}x{grid} (image_size {self.vision_config.image_size} / patch_size "
                f"{self.vision_config.patch_size})")
        layers = self.vision_config.num_hidden_layers
        k = self.vision_feature_layer
        if not is_int(k) or not -(layers + 1) <= k <= layers:
            raise ValueError(f"vision_feature_layer must be an int in [{-(layers + 1)}, {layers}] "
                             f"for a {layers}-layer vision tower, got {k!r}")
        if self.projector_hidden_act not in ACTIVATIONS and self.projector_hidden_act not in ACT2FN:
            raise ValueError(f"projector_hidden_act {self.projector_hidden_act!r} is not an "
                             f"activation: expected one of {sorted(set(ACTIVATIONS) | set(ACT2FN))}")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(
                f"unexpected vision_feature_select_strategy {self.vision_feature_select_strategy!r}")

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens per video after pooling: t * h * w."""
        t, h, w = self.pooling_shape
        return t * h * w

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "PllavaConfig":  # type: ignore[override]
        """Read ``path/config.json`` (a directory or the file itself); ``overrides`` replace fields."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            if not os.path.exists(path):
                raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
            raise FileNotFoundError(f"no config.json in {path!r}")
        data = read_config_json(file)
        if data.get("model_type", "llava") not in ("llava", "pllava"):
            raise ValueError(
                f"{file}: model_type {data.get('model_type')!r} is not a PLLaVA (llava) checkpoint")
        data.pop("model_type", None)
        if "image_token_id" in data:  # transformers' LlavaConfig alias
            data.setdefault("image_token_index", data.pop("image_token_id"))
        known = set(inspect.signature(cls.__init__).parameters) | set(data) | _BASE_FIELDS
        unknown = sorted(set(overrides) - known - {"self", "kwargs"})
        if unknown:
            # PretrainedConfig keeps any keyword as an attribute: a typo (num_frame=8) would be
            # ignored silently and the model run with its own value
            raise ValueError(f"unknown config override(s) {unknown} for {file}: expected PllavaConfig "
                             "fields (num_frames, pooling_shape, ...) or keys of its config.json")
        data.update(overrides)
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{file}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in ("vision_config", "text_config"):
            sub = getattr(self, key)
            if isinstance(sub, PretrainedConfig):
                out[key] = sub.to_dict()
        out["model_type"] = self.model_type
        out["pad_token_id"] = self.pad_token_id
        return out
