"""The fast model (pool before linear_2, truncated tower, fused op) against the original order.

``pllava_fast.reference`` runs PLLaVA's order (all CLIP layers, linear_2 then AdaptiveAvgPool3d,
PLLaVA's merge, a plain DynamicCache loop); it is itself checked against transformers' LLaVA where
the two agree (pooling = identity).
"""
import functools

import pytest
import torch
from transformers import LlavaForConditionalGeneration

from pllava_fast import PllavaForConditionalGeneration
from pllava_fast.conversation import load_tokenizer
from pllava_fast.original import ReferencePllava
from pllava_fast.testing import random_pixel_values, save_tiny_pllava, tiny_pllava

PROMPTS = ["USER:<image> What is happening in the video? ASSISTANT:",
           "USER:<image> Describe the video in details, please. ASSISTANT:"]


@functools.lru_cache(maxsize=None)
def _models(num_frames, pooling_shape, dtype=None):
    model, tok = tiny_pllava(num_frames=num_frames, pooling_shape=pooling_shape, dtype=dtype)
    return model, ReferencePllava.from_model(model), tok


CASES = [
    (4, (4, 2, 2)),    # divides the (4, 4, 4) grid
    (4, (3, 3, 3)),    # overlapping windows
    (16, (16, 2, 2)),  # PLLaVA's temporal layout
    (16, (8, 3, 3)),   # temporal halving, spatial non-divisible
    (4, (6, 5, 6)),    # larger than the grid: AdaptiveAvgPool3d repeats
]


@pytest.mark.parametrize("num_frames, pooling_shape", CASES)
def test_video_features_match_reference(num_frames, pooling_shape):
    model, ref, _ = _models(num_frames, pooling_shape)
    pv = random_pixel_values(2 * num_frames, model.config, seed=1)
    with torch.no_grad():
        fast = model.get_video_features(pv)
        slow = ref.get_video_features(pv)
    assert fast.shape == (2, pooling_shape[0] * pooling_shape[1] * pooling_shape[2], 64)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5 * float(slow.abs().max()))


@pytest.mark.parametrize("num_frames, pooling_shape", CASES)
def test_batch_of_two_clip_lengths_matches_reference(num_frames, pooling_shape):
    """Left-padded batch: a full video and a 3-frame clip (short-clip rule per video)."""
    model, ref, tok = _models(num_frames, pooling_shape)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert enc.attention_mask[0, 0] == 0  # the first prompt is left-padded
    frames = [num_frames, 3]
    pv = random_pixel_values(sum(frames), model.config, seed=2)
    with torch.no_grad():
        fast = model(**enc, pixel_values=pv, frames_per_video=frames)
        slow, mask, _ = ref(enc.input_ids, pv, enc.attention_mask, frames_per_video=frames)
    assert torch.equal(fast.attention_mask, mask)
    valid = mask.bool()
    scale = float(slow[valid].abs().max())
    torch.testing.assert_close(fast.logits[valid], slow[valid], rtol=0, atol=1e-5 * scale)
    kw = dict(frames_per_video=frames, max_new_tokens=8)
    ours = model.generate(**enc, pixel_values=pv, do_sample=False, eos_token_id=None, **kw)
    theirs = ref.generate(enc.input_ids, pv, enc.attention_mask, **kw)
    assert torch.equal(ours, theirs)


def test_bf16_matches_reference_within_rounding():
    model, ref, tok = _models(16, (16, 2, 2), torch.bfloat16)
    enc = tok(PROMPTS[:1], return_tensors="pt")
    pv = random_pixel_values(16, model.config, seed=3)
    with torch.no_grad():
        fast = model(**enc, pixel_values=pv).logits.float()
        slow = ref(enc.input_ids, pv)[0].float()
        fast_v = model.get_video_features(pv).float()
        slow_v = ref.get_video_features(pv).float()
    # bf16 keeps 8 bits: allow a few ulps of the activations' scale
    torch.testing.assert_close(fast_v, slow_v, rtol=0, atol=3 * 2 ** -8 * float(slow_v.abs().max()))
    err = (fast - slow).abs().max() / slow.abs().max()
    assert err < 0.05


def test_reference_matches_llava_with_identity_pooling(tmp_path):
    """The baseline itself agrees with transformers' LLaVA where PLLaVA is LLaVA."""
    path = save_tiny_pllava(tmp_path, num_frames=1, pooling_shape=(1, 4, 4))
    model = PllavaForConditionalGeneration.from_pretrained(path)
    tok = load_tokenizer(path)
    ref = ReferencePllava.from_model(model)
    llava = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    enc = tok(PROMPTS[:1], return_tensors="pt")
    ids = enc.input_ids.repeat_interleave(
        torch.where(enc.input_ids[0] == model.config.image_token_index, 16, 1), dim=1)
    pv = random_pixel_values(1, model.config, seed=4)
    with torch.no_grad():
        slow = ref(enc.input_ids, pv)[0]
        oracle = llava(input_ids=ids, pixel_values=pv).logits
    torch.testing.assert_close(slow, oracle, rtol=0, atol=1e-4 * float(oracle.abs().max()))
    ours = ref.generate(enc.input_ids, pv, max_new_tokens=6)
    theirs = llava.generate(input_ids=ids, pixel_values=pv, max_new_tokens=6, do_sample=False,
                            eos_token_id=None, pad_token_id=model.config.pad_token_id)
    assert torch.equal(ours[:, enc.input_ids.shape[1]:], theirs[:, ids.shape[1]:])


@pytest.mark.parametrize("act", ["relu", "silu", "gelu_new"])
def test_any_transformers_projector_activation_matches_reference(act):
    """PLLaVA's projector takes any transformers activation (ACT2FN), not only the fused ones."""
    model, tok = tiny_pllava(projector_hidden_act=act)
    ref = ReferencePllava.from_model(model)
    pv = random_pixel_values(2 * model.config.num_frames, model.config, seed=3)
    with torch.no_grad():
        fast = model.get_video_features(pv)
        slow = ref.get_video_features(pv)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5 * float(slow.abs().max()))
