"""Drop-in patching: same answers with the bf16 cache, Llava video mode, unpatch restores."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import pllava_fast
from pllava_fast import patching
from pllava_fast.projector import PllavaProjector
from pllava_fast.testing import build_tokenizer, random_pixel_values

IMAGE, PATCH = 56, 14
GRID = IMAGE // PATCH


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _tiny_llava(tokenizer, act="gelu"):
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=4, image_size=IMAGE, patch_size=PATCH,
                              projection_dim=32)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                       max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, projector_hidden_act=act,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         pad_token_id=tokenizer.pad_token_id)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # larger weights than the default init: well separated greedy logits
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 1.0 if "embed_tokens" in name else p[0].numel() ** -0.5)
    return model


def _original_video_features(model, pixel_values, num_frames, pooling_shape):
    """PLLaVA's original order on a Llava's weights: linear_1, act, linear_2, then pool the
    (T, H, W) grid with AdaptiveAvgPool3d."""
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    feats = model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])
    b = feats.shape[0] // num_frames
    grid = feats.view(b, num_frames, GRID, GRID, -1).permute(0, 4, 1, 2, 3)
    pooled = F.adaptive_avg_pool3d(grid, pooling_shape)
    return pooled.permute(0, 2, 3, 4, 1).reshape(b, -1, feats.shape[-1])


def test_llava_single_frame_identity_pool_keeps_answers(tokenizer):
    model = _tiny_llava(tokenizer)
    ids = tokenizer(["USER: <image> What is happening? ASSISTANT:"])["input_ids"][0]
    at = ids.index(model.config.image_token_index)
    ids = torch.tensor([ids[:at] + ids[at:at + 1] * GRID * GRID + ids[at + 1:]])
    pixels = random_pixel_values(1, model.config)
    with torch.no_grad():
        ref_logits = model(input_ids=ids, pixel_values=pixels).logits
        ref_tokens = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8,
                                    do_sample=False)
    assert pllava_fast.patch(model, pooling_shape=(1, GRID, GRID), num_frames=1) is model
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
        tokens = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8,
                                do_sample=False)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5 * ref_logits.abs().max())
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("act", ["gelu", "silu"])
@pytest.mark.parametrize("num_frames,pooling_shape", [(4, (2, 2, 2)), (3, (2, 3, 3)),
                                                      (2, (4, 3, 3))])
def test_llava_video_mode_pools_like_the_original(tokenizer, act, num_frames, pooling_shape):
    model = _tiny_llava(tokenizer, act=act)
    pixels = random_pixel_values(2 * num_frames, model.config, seed=1)
    with torch.no_grad():
        expected = _original_video_features(model, pixels, num_frames, pooling_shape)
    pllava_fast.patch(model, pooling_shape=pooling_shape, num_frames=num_frames)
    with torch.no_grad():
        got = torch.stack(model.get_image_features(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_llava_video_mode_answers_with_the_pooled_token_count(tokenizer):
    model = _tiny_llava(tokenizer)
    num_frames, pooling_shape = 4, (2, 2, 2)
    pllava_fast.patch(model, pooling_shape=pooling_shape, num_frames=num_frames)
    n_visual = math.prod(pooling_shape)
    clip = random_pixel_values(num_frames, model.config, seed=2)
    short = random_pixel_values(2, model.config, seed=3)  # repeated to 4 frames (PLLaVA's rule)
    prompts = ["USER: <image> What is happening in the video? ASSISTANT:", "USER: <image> Why? ASSISTANT:"]
    inputs = model.build_video_inputs(tokenizer, [clip, short], prompts)
    image_id = model.config.image_token_index
    assert (inputs["input_ids"] == image_id).sum(1).tolist() == [n_visual, n_visual]
    assert inputs["pixel_values"].shape == (2 * num_frames, 3, IMAGE, IMAGE)
    torch.testing.assert_close(inputs["pixel_values"][num_frames:],
                               short.repeat_interleave(3, dim=0)[:num_frames])
    assert inputs["attention_mask"][1, 0] == 0  # the shorter prompt is left padded
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        one = model.generate(**model.build_video_inputs(tokenizer, [clip], prompts[:1]),
                             max_new_tokens=5, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 5)
    assert torch.equal(out[0, -5:], one[0, -5:])  # batch == one by one
    with pytest.raises(ValueError, match="exactly one image token"):
        model.build_video_inputs(tokenizer, [clip], ["no placeholder"])
    with pytest.raises(ValueError, match="6 frames"):
        model.build_video_inputs(tokenizer, [random_pixel_values(6, model.config)], prompts[:1])


def test_unpatch_restores_the_llava(tokenizer):
    model = _tiny_llava(tokenizer)
    projector = model.model.multi_modal_projector
    model.set_attn_implementation("eager")
    pllava_fast.patch(model, attention="sdpa", num_frames=2)
    assert isinstance(model.model.multi_modal_projector, PllavaProjector)
    assert model.model.multi_modal_projector.linear_1 is projector.linear_1  # shared weights
    assert model.config.text_config._attn_implementation == "pllava_fast_sdpa"
    assert patching.is_patched(model)
    pllava_fast.patch(model, num_frames=4)  # patching again replaces the first patch
    assert model.model.multi_modal_projector.num_frames == 4
    pllava_fast.unpatch(model)
    assert model.model.multi_modal_projector is projector
    assert model.config.text_config._attn_implementation == "eager"
    assert not patching.is_patched(model) and "build_video_inputs" not in vars(model)
    with pytest.raises(ValueError, match="not in video mode"):
        patching.build_video_inputs(model, tokenizer, [random_pixel_values(4, model.config)],
                                    "<image>")


def test_patch_rejects_what_it_cannot_patch(tokenizer):
    with pytest.raises(ValueError, match="got Linear"):
        pllava_fast.patch(torch.nn.Linear(2, 2))
    model = _tiny_llava(tokenizer)
    with pytest.raises(ValueError, match="kv_cache"):
        pllava_fast.patch(model, kv_cache="int2")
    with pytest.raises(ValueError, match="pooling_shape"):
        pllava_fast.patch(model, pooling_shape=(0, 2, 2))
    assert not patching.is_patched(model)


# -- PLLaVA model -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    model, tok = pllava_fast.testing.tiny_pllava(num_frames=4, pooling_shape=(4, 2, 2))
    return model, tok


def _pllava_inputs(model, tok, videos=2):
    prompts = ["USER: <image> What is happening in the video? ASSISTANT:",
               "USER: <image> Describe it. ASSISTANT:"][:videos]
    enc = tok(prompts, return_tensors="pt", padding=True)
    pixels = random_pixel_values(4 * videos, model.config, seed=5)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "pixel_values": pixels}


def test_pllava_patched_bf16_cache_same_tokens_and_logits(tiny):
    model, tok = tiny
    inputs = _pllava_inputs(model, tok)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            ref_out = model(**inputs)
            ref = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        pllava_fast.patch(model, kv_cache="model-dtype", attention="sdpa")
        with torch.no_grad():
            out = model(**inputs)
            got = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        valid = ref_out.attention_mask.bool()  # left-padding slots hold no meaningful logits
        ref_logits = ref_out.logits[valid]
        torch.testing.assert_close(out.logits[valid], ref_logits, rtol=1e-4,
                                   atol=1e-5 * ref_logits.abs().max())
        assert torch.equal(got, ref)
    finally:
        pllava_fast.unpatch(model)
    assert model.config.text_config._attn_implementation == "eager"
    model.set_attn_implementation("sdpa")


def test_pllava_pooling_shape_override_and_unpatch(tiny):
    model, tok = tiny
    inputs = _pllava_inputs(model, tok, videos=1)
    pllava_fast.patch(model, pooling_shape=(2, 1, 1))
    try:
        with torch.no_grad():
            feats = model.get_video_features(inputs["pixel_values"])
        assert feats.shape[1] == 2
    finally:
        pllava_fast.unpatch(model)
    assert tuple(model.config.pooling_shape) == (4, 2, 2)
    assert model.multi_modal_projector.pooling_shape == (4, 2, 2)
    with torch.no_grad():
        assert model.get_video_features(inputs["pixel_values"]).shape[1] == 16


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantized_cache_is_installed_in_generate(tiny, tokenizer, kind):
    from pllava_fast.quantized_cache import QuantizedKVCache

    model, tok = tiny
    inputs = _pllava_inputs(model, tok, videos=1)
    pllava_fast.patch(model, kv_cache=kind)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False,
                                 return_dict_in_generate=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        assert isinstance(cache, QuantizedKVCache) and cache.bits == int(kind[3:])
    finally:
        pllava_fast.unpatch(model)
    assert "generate" not in vars(model)
    llava = _tiny_llava(tokenizer)
    pllava_fast.patch(llava, kv_cache=kind, num_frames=2, pooling_shape=(1, 2, 2))
    inputs = llava.build_video_inputs(tokenizer, [random_pixel_values(2, llava.config)],
                                      "USER: <image> Hi ASSISTANT:")
    with torch.no_grad():
        out = llava.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    with pytest.raises(ValueError, match="needs pllava-fast attention"):
        pllava_fast.patch(llava, kv_cache=kind, attention="eager")


# -- from_pretrained(kv_cache=..., kv_cache_options=..., device_map=...) --------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return pllava_fast.testing.save_tiny_pllava(tmp_path_factory.mktemp("tiny") / "model",
                                                num_frames=4, pooling_shape=(4, 2, 2))


def _greedy(model, tok, **kwargs):
    with torch.no_grad():
        return model.generate(**_pllava_inputs(model, tok, videos=1), max_new_tokens=6,
                              do_sample=False, return_dict_in_generate=True, **kwargs)


def test_from_pretrained_quantized_cache_with_options(tiny_dir, monkeypatch):
    from pllava_fast import model as model_module
    from pllava_fast.quantized_cache import QuantizedKVCache

    built = []
    make_cache = model_module.make_cache
    monkeypatch.setattr(model_module, "make_cache",
                        lambda *a, **kw: built.append((a, kw)) or make_cache(*a, **kw))
    model = pllava_fast.PllavaForConditionalGeneration.from_pretrained(
        tiny_dir, kv_cache="int8", kv_cache_options={"window": 8, "group_size": 32, "block": 8})
    assert model.kv_cache_spec.kind == "int8" and not built  # checked at load, built per call
    out = _greedy(model, pllava_fast.testing.build_tokenizer())
    assert out.sequences.shape[1] > 6
    cache = getattr(out, "cache", None) or out.past_key_values
    assert isinstance(cache, QuantizedKVCache)
    assert (cache.bits, cache.window, cache.group_size, cache.block) == (8, 8, 32, 8)
    assert cache.layers[0].n_quant > 0  # the prompt outgrew the 8-token window
    # checked once at load time, then built by generate() from the same spec
    assert [a for a, _ in built] == [(model.kv_cache_spec, model.config)]


@pytest.mark.parametrize("kwargs,match", [
    (dict(kv_cache="int8", kv_cache_options={"window": -1}), "window"),
    (dict(kv_cache="int4", kv_cache_options={"group_size": 3}), "group_size"),
    (dict(kv_cache="int4", kv_cache_options={"group_size": 32.0}), "group_size"),
    (dict(kv_cache="int4", kv_cache_options={"key_quant": "head"}), "key_quant"),
    (dict(kv_cache="int8", kv_cache_options={"windows": 8}), "unknown kv_cache_options"),
    (dict(kv_cache="int8", kv_cache_options=[("window", 8)]), "must be a dict"),
    (dict(kv_cache="model-dtype", kv_cache_options={"window": 8}), "quantized caches only"),
    (dict(kv_cache="bf16"), "now called 'model-dtype'"),
    (dict(kv_cache="int2"), "kv_cache must be one of"),
    (dict(kv_cache="int8", attn_implementation="eager"), "pllava-fast attention"),
    (dict(device="cpu", device_map="auto"), "device or device_map"),
    (dict(max_memory={"cpu": "1GiB"}), "max_memory needs a device_map"),
    (dict(device_map="everywhere"), "device_map must be"),
])
def test_from_pretrained_rejects_bad_arguments(tiny_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pllava_fast.PllavaForConditionalGeneration.from_pretrained(tiny_dir, **kwargs)


def test_patch_checks_kv_cache_options(tiny):
    model, _ = tiny
    with pytest.raises(ValueError, match="quantized caches only"):
        pllava_fast.patch(model, kv_cache="model-dtype", kv_cache_options={"window": 8})
    with pytest.raises(ValueError, match="block"):
        pllava_fast.patch(model, kv_cache="int4", kv_cache_options={"block": 24})
    assert not patching.is_patched(model)
    pllava_fast.patch(model, kv_cache="int4", kv_cache_options={"window": 16, "key_quant": "channel"})
    try:
        assert vars(model)[patching._STATE]["kv_cache_spec"].options() == {"window": 16,
                                                                           "key_quant": "channel"}
    finally:
        pllava_fast.unpatch(model)


@pytest.mark.parametrize("device_map,max_memory", [({"": "cpu"}, None), ("sequential", {"cpu": "1GiB"})])
def test_from_pretrained_device_map_same_greedy_tokens(tiny_dir, device_map, max_memory):
    from pllava_fast.model import PllavaForConditionalGeneration

    tok = pllava_fast.testing.build_tokenizer()
    want = _greedy(PllavaForConditionalGeneration.from_pretrained(tiny_dir), tok).sequences
    split = PllavaForConditionalGeneration.from_pretrained(tiny_dir, device_map=device_map,
                                                          max_memory=max_memory)
    assert hasattr(split, "hf_device_map")  # placed by accelerate
    assert torch.equal(_greedy(split, tok).sequences, want)
