"""A tiny random PLLaVA in the real checkpoint layout, and generated clips, for tests, the demo
and benchmarks.

Real architecture (CLIP vision tower, 2-layer projector, Llama/Mistral LM), small widths, random
weights scaled so that next-token logits are well separated (greedy decoding is then stable under
float rounding), and a small Llama-style BPE tokenizer (Metaspace, <s> prepended, <image> and <pad>
special) built locally with ``tokenizers``: nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import tempfile
from fractions import Fraction

import av
import numpy as np
import torch
from torch import nn

from .config import PllavaConfig
from .conversation import load_tokenizer
from .loading import checkpoint_names
from .model import PllavaForConditionalGeneration
from .shapes import TINY_DEFAULTS, TINY_MAX_POSITIONS

# words the tokenizer learns merges from; anything else still encodes (character fallback)
_CORPUS = [
    "USER: <image> What is happening in the video? ASSISTANT: A person is cooking in a kitchen.",
    "Describe the video in details. The dog runs across the yard and jumps over a small fence.",
    "Carefully watch the video and pay attention to the cause and sequence of events.",
    "Question: What does the woman do? Options: (A) dance (B) yoga (C) cook (D) sleep Best option:(",
    "the a an of to in on and is are was were with for at by from this that it he she they",
    "red green blue yellow black white moving shapes square circle triangle left right up down",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?()'\"-\n",
]
SPECIAL = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>", "image": "<image>"}



def build_tokenizer():
    """A ~300-token BPE tokenizer in Llama's style (Metaspace, <s> prepended), with <image> and <pad>
    as special tokens; a ``transformers.PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[SPECIAL["unk"], SPECIAL["bos"], SPECIAL["eos"]],
        show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    tok.add_special_tokens([SPECIAL["pad"], SPECIAL["image"]])
    bos = SPECIAL["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=SPECIAL["eos"], unk_token=SPECIAL["unk"],
        pad_token=SPECIAL["pad"], extra_special_tokens={"image_token": SPECIAL["image"]},
        padding_side="left")


def tiny_config(tokenizer=None, **overrides):
    """PllavaConfig of the tiny model; ``overrides`` as in TINY_DEFAULTS or any PllavaConfig field."""
    opts = dict(TINY_DEFAULTS)
    unknown_cfg = {k: overrides.pop(k) for k in list(overrides) if k not in opts}
    opts.update(overrides)
    tokenizer = tokenizer or build_tokenizer()
    vocab = len(tokenizer)
    image_id = tokenizer.convert_tokens_to_ids(SPECIAL["image"])
    pad_id = tokenizer.pad_token_id
    text_vocab = image_id if opts["image_token_outside_vocab"] else vocab
    if opts["image_token_outside_vocab"] and image_id != vocab - 1:
        raise ValueError("the image token must be the tokenizer's last id to lie outside the table")
    grid = opts["image_size"] // opts["patch_size"]
    text_config = dict(
        model_type=opts["text_model_type"], vocab_size=text_vocab, hidden_size=opts["text_hidden"],
        intermediate_size=2 * opts["text_hidden"], num_hidden_layers=opts["text_layers"],
        num_attention_heads=opts["text_heads"], num_key_value_heads=opts["text_kv_heads"],
        max_position_embeddings=TINY_MAX_POSITIONS, rms_norm_eps=1e-5, pad_token_id=pad_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=opts["tie_word_embeddings"],
    )
    if opts["text_model_type"] == "mistral":
        text_config["sliding_window"] = None
    vision_config = dict(
        model_type="clip_vision_model", hidden_size=opts["vision_hidden"],
        intermediate_size=2 * opts["vision_hidden"], num_hidden_layers=opts["vision_layers"],
        num_attention_heads=opts["vision_heads"], image_size=opts["image_size"],
        patch_size=opts["patch_size"], projection_dim=opts["vision_hidden"], hidden_act="quick_gelu",
    )
    return PllavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=image_id,
        pad_token_id=pad_id, projector_hidden_act=opts["projector_hidden_act"],
        vision_feature_layer=opts["vision_feature_layer"],
        vision_feature_select_strategy=opts["vision_feature_select_strategy"],
        pooling_shape=opts["pooling_shape"], frame_shape=(grid, grid),
        num_frames=opts["num_frames"], use_pooling=opts["use_pooling"],
        architectures=["PllavaForConditionalGeneration"], tie_word_embeddings=opts["tie_word_embeddings"],
        **unknown_cfg,
    ), opts["seed"]


@torch.no_grad()
def _randomize(model: nn.Module, seed: int) -> None:
    """Unit-variance activations and well separated logits: weights ~ N(0, 1/fan_in), embeddings
    ~ N(0, 1), norms' gains ~ 1 + N(0, 0.1), biases ~ N(0, 0.1), lm_head ~ N(0, 16/fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    lm_head = model.get_output_embeddings()
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            fan_in = p[0].numel()
            std = 1.0 if "embed" in name and "patch" not in name else fan_in ** -0.5
            if lm_head is not None and p is lm_head.weight and "embed" not in name:
                std = 4.0 * fan_in ** -0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def _peft_state(state: dict, rank: int, seed: int) -> dict:
    """The LM's names as saved from a peft-wrapped model with LoRA on q_proj / v_proj."""
    gen = torch.Generator().manual_seed(seed + 1)
    out = {}
    for name, t in state.items():
        if not name.startswith("language_model."):
            out[name] = t
            continue
        peft_name = "language_model.base_model.model." + name[len("language_model."):]
        if name.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight")):
            module = peft_name[: -len(".weight")]
            out[module + ".base_layer.weight"] = t
            out_f, in_f = t.shape
            out[module + ".lora_A.default.weight"] = torch.randn(rank, in_f, generator=gen) * in_f ** -0.5
            out[module + ".lora_B.default.weight"] = torch.randn(out_f, rank, generator=gen) * rank ** -0.5
        else:
            out[peft_name] = t
    return out


def save_tiny_pllava(path=None, *, lora_rank: int | None = None, shards: int = 1,
                     weights_format: str = "safetensors", **overrides) -> str:
    """Write a tiny random PLLaVA checkpoint (config.json, weights, tokenizer files) to ``path``
    (a new temporary directory when None) and return the path.

    Args:
        lora_rank: save the LM with peft-wrapped names and random LoRA pairs of this rank on
            q_proj / v_proj (the saved base weights are then NOT the effective ones).
        shards: number of weight files (with an index json when > 1).
        weights_format: "safetensors" or "bin".
        overrides: TINY_DEFAULTS keys (image_size, num_frames, pooling_shape, text_model_type,
            tie_word_embeddings, image_token_outside_vocab, seed, ...) or PllavaConfig fields.
    """
    path = os.fspath(path) if path is not None else tempfile.mkdtemp(prefix="tiny-pllava-")
    os.makedirs(path, exist_ok=True)
    tokenizer = build_tokenizer()
    config, seed = tiny_config(tokenizer, **overrides)
    model = PllavaForConditionalGeneration(config)
    _randomize(model, seed)
    state = checkpoint_names({k: v.contiguous() for k, v in model.state_dict().items()})
    if config.text_config.tie_word_embeddings:
        state.pop("language_model.lm_head.weight")
    if lora_rank:
        state = _peft_state(state, int(lora_rank), seed)
    _write_weights(path, state, shards, weights_format)
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _write_weights(path: str, state: dict, shards: int, weights_format: str) -> None:
    names = sorted(state)
    groups = [names[i::shards] for i in range(shards)]
    ext = {"safetensors": "safetensors", "bin": "bin"}.get(weights_format)
    if ext is None:
        raise ValueError(f"weights_format must be 'safetensors' or 'bin', got {weights_format!r}")
    stem = "model" if ext == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"{stem}.{ext}" if shards == 1 else f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        part = {k: state[k] for k in group}
        if ext == "safetensors":
            from safetensors.torch import save_file
            save_file(part, os.path.join(path, fname), metadata={"format": "pt"})
        else:
            torch.save(part, os.path.join(path, fname))
        weight_map.update({k: fname for k in group})
    if shards > 1:
        with open(os.path.join(path, f"{stem}.{ext}.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)


def tiny_pllava(path=None, *, dtype=None, attn_implementation: str = "sdpa", **overrides):
    """Save a tiny PLLaVA (see ``save_tiny_pllava``) and load it: returns (model, tokenizer)."""
    lora_alpha = overrides.pop("lora_alpha", 4.0)
    path = save_tiny_pllava(path, **overrides)
    model = PllavaForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation=attn_implementation, lora_alpha=lora_alpha)
    return model, load_tokenizer(path)


def random_pixel_values(frames: int, config, *, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """(frames, 3, S, S) normalized-looking random pixels for ``config``'s vision tower."""
    gen = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    return torch.randn(frames, 3, size, size, generator=gen).to(dtype)


def make_clip(path, *, num_frames: int = 24, height: int = 96, width: int = 128, fps: int = 8,
              codec: str = "libx264", seed: int = 0, keyframe_interval: int | None = None) -> str:
    """Write a clip of moving coloured shapes (a square and a disc on a gradient) to ``path``.

    H.264 in MP4 by default (yuv420p, so height and width must be even); ``keyframe_interval``
    sets the GOP length in frames (default: the encoder's). Returns ``path``.
    """
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs an even frame size, got {height}x{width}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    background = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1),
                           np.full_like(xx, 96)], axis=-1).astype(np.uint8)
    colour_a, colour_b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    side, radius = max(height // 5, 2), max(height // 8, 2)
    path = os.fspath(path)
    with av.open(path, mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if keyframe_interval:
            stream.codec_context.gop_size = int(keyframe_interval)
            stream.options = {"x264-params": f"keyint={int(keyframe_interval)}:scenecut=0"}
        mux_frames(container, stream, _shapes_frames(
            num_frames, background, colour_a, colour_b, side, radius, xx, yy))
    return path


def _shapes_frames(num_frames, background, colour_a, colour_b, side, radius, xx, yy):
    """make_clip's frames: the square moves right, the disc left, over ``background``."""
    height, width = background.shape[:2]
    for t in range(num_frames):
        img = background.copy()
        x0 = int((width - side) * t / max(num_frames - 1, 1))
        y0 = (height - side) // 3
        img[y0:y0 + side, x0:x0 + side] = colour_a
        cx = width - 1 - int((width - 1) * t / max(num_frames - 1, 1))
        cy = 2 * height // 3
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2] = colour_b
        yield img


def add_clip_stream(container, size, *, codec: str = "libx264", rate: int = 25,
                    pix_fmt: str = "yuv420p", keyint: int = 12, preset: str = "veryfast",
                    x264: str = "", vfr: bool = False, rotation=None, options=None):
    """A video stream of an output ``container`` for test clips: ``size`` (W, H), a keyframe
    every ``keyint`` frames (x264: fixed, no scene cuts; ``x264`` appends ``:key=value``
    parameters), a millisecond time base when ``vfr`` (frames then carry their own times) and
    a display ``rotation`` in degrees."""
    stream = container.add_stream(codec, rate=rate, options=options or {})
    stream.width, stream.height = size
    stream.pix_fmt = pix_fmt
    stream.codec_context.gop_size = keyint
    if codec == "libx264":
        stream.codec_context.options = {
            "preset": preset, "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0{x264}"}
    if vfr:
        stream.codec_context.time_base = Fraction(1, 1000)
    if rotation is not None:
        stream.set_display_rotation(rotation)
    return stream


def mux_frames(container, stream, images, pts_ms=None) -> None:
    """Encode (H, W, 3) uint8 RGB ``images`` into ``stream`` of the output ``container`` and
    flush the encoder; ``pts_ms``: each frame's time in milliseconds (variable frame rate)."""
    for i, img in enumerate(images):
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        if pts_ms is not None:
            frame.pts, frame.time_base = pts_ms[i], Fraction(1, 1000)
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
