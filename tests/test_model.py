"""PllavaForConditionalGeneration against transformers' LlavaForConditionalGeneration.

With one frame and pooling_shape (1, H, W) pooling is the identity and PLLaVA is LLaVA: the same
weights (transformers 5.24 loads the PLLaVA-layout directory itself) must give the same logits and
the same generated tokens, the image token being repeated once per visual token on the LLaVA side.
"""
import functools
import tempfile

import pytest
import torch
from transformers import LlavaForConditionalGeneration, TextIteratorStreamer

from pllava_fast import PllavaForConditionalGeneration
from pllava_fast.conversation import load_tokenizer
from pllava_fast.compat import cache_kwarg_name
from pllava_fast.testing import random_pixel_values, save_tiny_pllava, tiny_pllava

PROMPTS = ["USER:<image> What is happening in the video? ASSISTANT:",
           "USER:<image> Describe it. ASSISTANT:"]


def _llava_inputs(ids, mask, image_id, n_vis):
    """Repeat every image token n_vis times (LLaVA's expanded prompt), left-padded."""
    rows, masks = [], []
    for row, row_mask in zip(ids, mask):
        reps = torch.where(row == image_id, n_vis, 1)
        rows.append(row.repeat_interleave(reps))
        masks.append(row_mask.repeat_interleave(reps))
    width = max(len(r) for r in rows)
    pad = lambda t, v: torch.cat([torch.full((width - len(t),), v, dtype=t.dtype), t])  # noqa: E731
    return (torch.stack([pad(r, 0) for r in rows]),
            torch.stack([pad(m, 0) for m in masks]))


@functools.lru_cache(maxsize=None)
def _pair(text_model_type):
    path = save_tiny_pllava(tempfile.mkdtemp(prefix="tiny-llava-"), num_frames=1,
                            pooling_shape=(1, 4, 4), text_model_type=text_model_type)
    ours = PllavaForConditionalGeneration.from_pretrained(path)
    theirs = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    return ours, theirs, load_tokenizer(path)


@pytest.fixture(params=["llama", "mistral"])
def identity_pair(request):
    return _pair(request.param)


def _inputs(tok, cfg, prompts, n_vis):
    enc = tok(prompts, return_tensors="pt", padding=True)
    ids, mask = _llava_inputs(enc.input_ids, enc.attention_mask, cfg.image_token_index, n_vis)
    return enc, ids, mask


def test_identity_pooling_logits_match_llava(identity_pair):
    ours, theirs, tok = identity_pair
    cfg = ours.config
    enc, ids, mask = _inputs(tok, cfg, PROMPTS, 16)
    pv = random_pixel_values(2, cfg, seed=1)
    with torch.no_grad():
        a = ours(**enc, pixel_values=pv)
        b = theirs(input_ids=ids, attention_mask=mask, pixel_values=pv).logits
    assert a.logits.shape == b.shape
    valid = mask.bool()
    scale = b[valid].abs().max()
    torch.testing.assert_close(a.logits[valid], b[valid], rtol=0, atol=1e-4 * float(scale))
    assert torch.equal(a.attention_mask, mask)


@pytest.mark.parametrize("text_model_type, gen_kwargs", [
    ("llama", dict(do_sample=False)),
    ("llama", dict(do_sample=False, num_beams=3)),
    ("llama", dict(do_sample=True, top_k=5, temperature=0.8)),
    ("mistral", dict(do_sample=False)),
], ids=["greedy", "beam", "sample", "mistral-greedy"])
def test_generate_matches_llava(text_model_type, gen_kwargs):
    ours, theirs, tok = _pair(text_model_type)
    cfg = ours.config
    enc, ids, mask = _inputs(tok, cfg, PROMPTS, 16)
    pv = random_pixel_values(2, cfg, seed=2)
    kw = dict(max_new_tokens=6, pad_token_id=cfg.pad_token_id, eos_token_id=None, **gen_kwargs)
    torch.manual_seed(0)
    a = ours.generate(**enc, pixel_values=pv, **kw)
    torch.manual_seed(0)
    b = theirs.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, **kw)
    assert torch.equal(a[:, enc.input_ids.shape[1]:], b[:, ids.shape[1]:])


def test_streamer_yields_generated_text():
    ours, _, tok = _pair("llama")
    enc = tok(PROMPTS[:1], return_tensors="pt")
    pv = random_pixel_values(1, ours.config, seed=3)
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    out = ours.generate(**enc, pixel_values=pv, max_new_tokens=6, do_sample=False,
                        streamer=streamer, eos_token_id=None)
    streamed = "".join(streamer)
    assert streamed == tok.decode(out[0, enc.input_ids.shape[1]:])


def test_vision_features_stop_at_selected_layer():
    model, _ = tiny_pllava(vision_layers=4, vision_feature_layer=-2)
    pv = random_pixel_values(3, model.config)
    calls = []
    hooks = [layer.register_forward_hook(lambda *a, i=i: calls.append(i))
             for i, layer in enumerate(model.vision_model.encoder.layers)]
    with torch.no_grad():
        fast = model.vision_features(pv)
        for h in hooks:
            h.remove()
        full = model.vision_tower(pv, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert calls == [0, 1, 2]  # 4 layers, second-to-last output: the last layer never runs
    assert fast.shape == (3, 16, 32)
    torch.testing.assert_close(fast, full, rtol=1e-6, atol=1e-6)


def test_full_select_strategy_raises():
    model, _ = tiny_pllava(vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="'full' is not supported"):
        model.vision_features(random_pixel_values(4, model.config))


def test_image_token_outside_embedding_table():
    model, tok = tiny_pllava(image_token_outside_vocab=True)
    cfg = model.config
    assert cfg.image_token_index >= model.get_input_embeddings().num_embeddings
    enc = tok(PROMPTS[:1], return_tensors="pt")
    out = model.generate(**enc, pixel_values=random_pixel_values(4, cfg), max_new_tokens=4,
                         do_sample=False)
    assert out.shape == (1, enc.input_ids.shape[1] + 4)


def test_short_clip_rule_per_video():
    model, _ = tiny_pllava(num_frames=8)
    feats = torch.arange(8 + 3 + 1, dtype=torch.float32)[:, None, None].expand(-1, 16, 2)
    out = model.prepare_video_frames(feats, [8, 3, 1])
    frames = out[:, 0, 0].tolist()
    assert frames[:8] == list(range(8))
    assert frames[8:16] == [8, 8, 8, 9, 9, 9, 10, 10]  # repeat_interleave(int(8/3)+1)[:8]
    assert frames[16:] == [11] * 8  # an image fills the clip
    with pytest.raises(ValueError, match="sum to"):
        model.prepare_video_frames(feats, [8, 3])
    with pytest.raises(ValueError, match="9 frames"):
        model.prepare_video_frames(feats[:9], [9])


def test_mismatched_image_tokens_raise():
    model, tok = tiny_pllava()
    enc = tok(PROMPTS[:1], return_tensors="pt")
    with pytest.raises(ValueError, match="1 image tokens .* 2 videos"):
        model(**enc, pixel_values=random_pixel_values(8, model.config))


def test_bf16_close_to_fp32():
    model, tok = tiny_pllava()
    enc = tok(PROMPTS[:1], return_tensors="pt")
    pv = random_pixel_values(4, model.config)
    with torch.no_grad():
        ref = model(**enc, pixel_values=pv).logits
        low = model.to(torch.bfloat16)(**enc, pixel_values=pv).logits.float()
    assert low.dtype == torch.float32
    err = (low - ref).abs().max() / ref.abs().max()
    assert err < 0.05


def test_media_type_and_5d_pixel_values():
    model, tok = tiny_pllava()
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    pv = random_pixel_values(8, model.config)
    with torch.no_grad():
        flat = model(**enc, pixel_values=pv, media_type="video").logits
        stacked = model(**enc, pixel_values=pv.view(2, 4, *pv.shape[1:])).logits
        images = model(**enc, pixel_values=pv[[0, 4]], media_type="image").logits
        repeated = model(**enc, pixel_values=pv[[0, 0, 0, 0, 4, 4, 4, 4]]).logits
    assert torch.equal(flat, stacked)
    torch.testing.assert_close(images, repeated, rtol=1e-5, atol=1e-5)
    out = model.generate(**enc, pixel_values=pv.view(2, 4, *pv.shape[1:]), media_type="video",
                         num_beams=2, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2


def test_user_cache_passes_through():
    from transformers import DynamicCache

    model, tok = tiny_pllava()
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    pv = random_pixel_values(8, model.config)
    kw = dict(max_new_tokens=5, do_sample=False, eos_token_id=None)
    default = model.generate(**enc, pixel_values=pv, **kw)
    cache = DynamicCache(config=model.config.text_config)
    name = cache_kwarg_name(model.language_model)  # "cache" from transformers 5.24 on
    given = model.generate(**enc, pixel_values=pv, **{name: cache}, **kw)
    assert torch.equal(default, given)
    n_prompt = model(**enc, pixel_values=pv).logits.shape[1]
    assert cache.get_seq_length() == n_prompt + 4  # the expanded prompt and all but the last token
