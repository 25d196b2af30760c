"""Checkpoint loading: PLLaVA layout round trip, shards, .bin, peft LoRA merge, clear errors."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from pllava_fast import PllavaConfig, PllavaForConditionalGeneration
from pllava_fast.loading import CheckpointError, checkpoint_names, read_state_dict
from pllava_fast.testing import save_tiny_pllava


def _saved(path):
    return load_file(os.path.join(path, "model.safetensors"))


def _assert_weights_equal(model, state):
    ours = checkpoint_names(model.state_dict())
    assert set(state) <= set(ours)
    for k, v in state.items():
        assert torch.equal(ours[k], v), k


def test_round_trip(tmp_path):
    path = save_tiny_pllava(tmp_path)
    names = set(_saved(path))
    assert {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.bias",
            "language_model.lm_head.weight", "language_model.model.embed_tokens.weight",
            "vision_tower.vision_model.embeddings.patch_embedding.weight"} <= names
    config = json.load(open(os.path.join(path, "config.json")))
    assert config["model_type"] == "llava" and config["pooling_shape"] == [4, 2, 2]
    model = PllavaForConditionalGeneration.from_pretrained(path)
    _assert_weights_equal(model, _saved(path))
    assert model.config.num_frames == 4 and model.config.frame_shape == [4, 4]


def test_layout_is_what_transformers_llava_reads(tmp_path):
    path = save_tiny_pllava(tmp_path)
    _, info = LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@pytest.mark.parametrize("shards, fmt, keep_index", [(3, "safetensors", True),
                                                      (2, "safetensors", False), (2, "bin", True)])
def test_shards_and_bin(tmp_path, shards, fmt, keep_index):
    reference = _saved(save_tiny_pllava(tmp_path / "one"))
    path = save_tiny_pllava(tmp_path / "many", shards=shards, weights_format=fmt)
    index = [f for f in os.listdir(path) if f.endswith("index.json")]
    assert len(index) == 1
    if not keep_index:
        os.remove(os.path.join(path, index[0]))
    model = PllavaForConditionalGeneration.from_pretrained(path, dtype="bfloat16")
    assert model.language_model.lm_head.weight.dtype == torch.bfloat16
    _assert_weights_equal(model.float(), {k: v.bfloat16().float() for k, v in reference.items()})


def test_tied_embeddings(tmp_path):
    path = save_tiny_pllava(tmp_path, tie_word_embeddings=True)
    assert "language_model.lm_head.weight" not in _saved(path)
    model = PllavaForConditionalGeneration.from_pretrained(path)
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    assert torch.equal(lm.lm_head.weight, _saved(path)["language_model.model.embed_tokens.weight"])


def test_transformers_4_52_layout(tmp_path):
    """Newer LLaVA names (model.language_model.*, lm_head.*) load into the same weights."""
    path = save_tiny_pllava(tmp_path)
    state = _saved(path)
    renamed = {}
    for k, v in state.items():
        for old, new in (("language_model.model.", "model.language_model."),
                         ("language_model.lm_head.", "lm_head."),
                         ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")):
            if k.startswith(old):
                k = new + k[len(old):]
                break
        renamed[k] = v
    save_file(renamed, os.path.join(path, "model.safetensors"))
    _assert_weights_equal(PllavaForConditionalGeneration.from_pretrained(path), state)


@pytest.mark.parametrize("lora_alpha", [4.0, 16.0])
def test_peft_lora_merged_equals_unmerged(tmp_path, lora_alpha):
    rank = 8
    path = save_tiny_pllava(tmp_path, lora_rank=rank)
    state = _saved(path)
    prefix = "language_model.base_model.model.model.layers.1.self_attn."
    assert prefix + "q_proj.base_layer.weight" in state
    assert prefix + "v_proj.lora_A.default.weight" in state
    assert not any(k.startswith("language_model.model.") for k in state)
    model = PllavaForConditionalGeneration.from_pretrained(path, lora_alpha=lora_alpha)
    x = torch.randn(5, model.config.text_config.hidden_size)
    for layer_idx, layer in enumerate(model.language_model.model.layers):
        for proj in ("q_proj", "v_proj", "k_proj"):
            base = f"language_model.base_model.model.model.layers.{layer_idx}.self_attn.{proj}"
            module = getattr(layer.self_attn, proj)
            if proj == "k_proj":  # no LoRA there: taken as saved
                assert torch.equal(module.weight, state[base + ".weight"])
                continue
            w = state[base + ".base_layer.weight"]
            a, b = state[base + ".lora_A.default.weight"], state[base + ".lora_B.default.weight"]
            unmerged = x @ w.T + (lora_alpha / rank) * (x @ a.T @ b.T)
            torch.testing.assert_close(module(x), unmerged, rtol=1e-5, atol=1e-5)
    assert torch.equal(model.language_model.lm_head.weight,
                       state["language_model.base_model.model.lm_head.weight"])


def _corrupt(path, edit):
    state = _saved(path)
    edit(state)
    save_file(state, os.path.join(path, "model.safetensors"))


def test_missing_key_is_listed(tmp_path):
    path = save_tiny_pllava(tmp_path)
    _corrupt(path, lambda s: s.pop("multi_modal_projector.linear_2.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): multi_modal_projector.linear_2.bias"):
        PllavaForConditionalGeneration.from_pretrained(path)


def test_unexpected_key_is_listed(tmp_path):
    path = save_tiny_pllava(tmp_path)
    _corrupt(path, lambda s: s.update({"multi_modal_projector.linear_3.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): multi_modal_projector.linear_3"):
        PllavaForConditionalGeneration.from_pretrained(path)


def test_wrong_shape_is_listed(tmp_path):
    path = save_tiny_pllava(tmp_path)
    _corrupt(path, lambda s: s.update({"multi_modal_projector.linear_1.weight": torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): multi_modal_projector.linear_1"
                                              r".weight checkpoint \(3, 3\) vs model \(64, 32\)"):
        PllavaForConditionalGeneration.from_pretrained(path)


def test_config_of_another_model_mismatches(tmp_path):
    """Weights of a wider LM under this config: every LM tensor is reported."""
    small = save_tiny_pllava(tmp_path / "small")
    wide = save_tiny_pllava(tmp_path / "wide", text_hidden=96)
    os.replace(os.path.join(wide, "model.safetensors"), os.path.join(small, "model.safetensors"))
    with pytest.raises(CheckpointError, match="shape mismatches") as err:
        PllavaForConditionalGeneration.from_pretrained(small)
    assert "language_model.model.embed_tokens.weight" in str(err.value)


def test_lora_without_b_raises(tmp_path):
    path = save_tiny_pllava(tmp_path, lora_rank=4)
    key = "language_model.base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"
    _corrupt(path, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match="only lora_A"):
        PllavaForConditionalGeneration.from_pretrained(path)


def test_missing_config_dir_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PllavaForConditionalGeneration.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        PllavaForConditionalGeneration.from_pretrained(tmp_path)
    path = save_tiny_pllava(tmp_path / "ckpt")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="no weights"):
        PllavaForConditionalGeneration.from_pretrained(path)
    with pytest.raises(FileNotFoundError):
        read_state_dict(tmp_path / "nope")


def test_config_defaults_and_overrides(tmp_path):
    assert PllavaConfig().pad_token_id is None  # transformers builds the default config itself
    cfg = PllavaConfig(text_config={"model_type": "llama", "pad_token_id": 0})
    assert cfg.pooling_shape == [16, 12, 12] and cfg.num_frames == 16
    assert cfg.frame_shape == [24, 24] and cfg.vision_feature_layer == -2
    assert cfg.image_token_index == 32000 and cfg.num_visual_tokens == 2304
    path = save_tiny_pllava(tmp_path)
    model = PllavaForConditionalGeneration.from_pretrained(path, num_frames=8, pooling_shape=(2, 2, 2))
    assert model.config.num_frames == 8 and model.multi_modal_projector.pooling_shape == (2, 2, 2)
    with pytest.raises(ValueError, match="frame_shape"):
        PllavaConfig.from_pretrained(path, frame_shape=(24, 24))


def test_unused_vision_weights_may_be_absent(tmp_path):
    """Layers after vision_feature_layer and post_layernorm never reach an output."""
    path = save_tiny_pllava(tmp_path, vision_layers=3, vision_feature_layer=-2)
    full = PllavaForConditionalGeneration.from_pretrained(path)
    _corrupt(path, lambda s: [s.pop(k) for k in list(s) if k.startswith(
        ("vision_tower.vision_model.post_layernorm.", "vision_tower.vision_model.encoder.layers.2."))])
    trimmed = PllavaForConditionalGeneration.from_pretrained(path)
    pv = torch.randn(4, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(full.get_video_features(pv), trimmed.get_video_features(pv))
    _corrupt(path, lambda s: s.pop("vision_tower.vision_model.encoder.layers.1.mlp.fc1.bias"))
    with pytest.raises(CheckpointError, match="layers.1.mlp.fc1.bias"):
        PllavaForConditionalGeneration.from_pretrained(path)


def test_bf16_lora_checkpoint_merges_in_fp32(tmp_path):
    """A bf16 checkpoint loaded in fp32 equals the unmerged fp32 computation (one rounding only)."""
    path = save_tiny_pllava(tmp_path, lora_rank=4)
    _corrupt(path, lambda s: s.update({k: v.bfloat16() for k, v in s.items()}))
    state = _saved(path)
    model = PllavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    base = "language_model.base_model.model.model.layers.0.self_attn.v_proj"
    w, a, b = (state[base + s].float() for s in (".base_layer.weight", ".lora_A.default.weight",
                                                 ".lora_B.default.weight"))
    x = torch.randn(3, w.shape[1])
    unmerged = x @ w.T + (4.0 / 4) * (x @ a.T @ b.T)
    v_proj = model.language_model.model.layers[0].self_attn.v_proj
    torch.testing.assert_close(v_proj(x), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_save_pretrained_writes_pllava_layout(tmp_path, tie):
    model = PllavaForConditionalGeneration.from_pretrained(
        save_tiny_pllava(tmp_path / "src", tie_word_embeddings=tie))
    model.save_pretrained(tmp_path / "out")
    names = set(_saved(tmp_path / "out"))
    assert "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight" in names
    assert ("language_model.lm_head.weight" in names) != tie
    again = PllavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    _assert_weights_equal(again, checkpoint_names(model.state_dict()))
    _, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
