"""The compiled decode loop: static caches and a torch.compile'd step give generate()'s greedy
tokens for every cache kind (fp32, CPU), with one graph per (batch, length bucket)."""
import pytest
import torch
from transformers import TextIteratorStreamer

from pllava_fast.attention import install_attention
from pllava_fast.conversation import build_prompt
from pllava_fast.kv_cache import make_cache, make_static_cache
from pllava_fast.kv_spec import KVCacheSpec
from pllava_fast.llm_decode import CompiledDecoder
from pllava_fast.model import PllavaForConditionalGeneration
from pllava_fast.testing import random_pixel_values

OPTS = {"window": 8, "block": 4, "group_size": 16}
KINDS = [("model-dtype", {}), ("int8", OPTS), ("int4", OPTS), ("fp8", OPTS), ("unquantized", OPTS)]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    m = PllavaForConditionalGeneration.from_pretrained(tiny_model_dir)
    m.generation_config.eos_token_id = None  # every call makes max_new_tokens tokens
    return install_attention(m)


@pytest.fixture(scope="module")
def inputs(model, tiny_model_dir):
    from pllava_fast.conversation import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    enc = tok([build_prompt("What is happening in the video?"), build_prompt("Why?")],
              return_tensors="pt", padding=True)  # left padded: the second row is shorter
    return {**enc, "pixel_values": random_pixel_values(2 * model.config.num_frames, model.config)}


def _eager(model, inputs, spec, n=24, **kw):
    cache = make_cache(spec, model.config)
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, cache=cache, **kw)


@pytest.mark.parametrize("kind,opts", KINDS, ids=[k for k, _ in KINDS])
def test_compiled_greedy_tokens_equal_eager(model, inputs, kind, opts):
    spec = KVCacheSpec.of(kind, opts)
    want = _eager(model, inputs, spec)
    decoder = CompiledDecoder(model, spec)
    got = decoder.generate(**inputs, max_new_tokens=24)
    assert torch.equal(got, want)
    # a shorter prompt in the same length bucket reuses the graph
    again = decoder.generate(inputs["input_ids"][:, 1:], inputs["attention_mask"][:, 1:],
                             pixel_values=inputs["pixel_values"], max_new_tokens=20)
    assert decoder.stats["graphs"] == 1 and again.shape[1] == inputs["input_ids"].shape[1] - 1 + 20


@pytest.fixture(scope="module")
def model_80(tmp_path_factory):
    from pllava_fast.testing import tiny_pllava
    m, tok = tiny_pllava(tmp_path_factory.mktemp("hd80"), text_hidden=160, text_heads=2,
                         text_kv_heads=1)
    m.generation_config.eos_token_id = None
    enc = tok([build_prompt("Why?")], return_tensors="pt")
    return install_attention(m), {**enc, "pixel_values": random_pixel_values(4, m.config)}


@pytest.mark.parametrize("kind,group", [("int8", 64), ("fp8", 64), ("int4", 16)])
def test_compiled_tokens_at_head_dim_80(model_80, kind, group):
    """One KV head of 80 channels: groups of 64 leave a short last group (quantized by the op,
    since inductor got that one wrong), groups of 16 do not (traced into the graph)."""
    m, inputs = model_80
    spec = KVCacheSpec.of(kind, {"window": 8, "group_size": group})
    assert torch.equal(CompiledDecoder(m, spec).generate(**inputs, max_new_tokens=12),
                       _eager(m, inputs, spec, n=12))


def _teacher_forced_agreement(model, inputs, spec, n):
    """Eager greedy tokens, then the compiled loop fed those tokens: its per-step argmax agreement."""
    want = _eager(model, inputs, spec, n=n)[:, inputs["input_ids"].shape[1]:]
    got = CompiledDecoder(model, spec).generate(**inputs, max_new_tokens=n, teacher_tokens=want)
    return (got[:, inputs["input_ids"].shape[1]:] == want).float().mean().item()


def test_teacher_forced_agreement_fp32(model, inputs):
    # the forced path itself: in fp32 the compiled steps give eager's argmax at every step
    assert _teacher_forced_agreement(model, inputs, KVCacheSpec.of("int8", OPTS), 16) == 1.0


@pytest.mark.cuda
@pytest.mark.parametrize("kind,opts", KINDS, ids=[k for k, _ in KINDS])
def test_teacher_forced_agreement_cuda_bf16(tiny_model_dir, inputs, kind, opts):
    # CUDA graphs of the bf16 step against eager generate(): >= 99.5% of steps agree
    m = PllavaForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.bfloat16,
                                                       device="cuda")
    m.generation_config.eos_token_id = None
    cuda = {k: v.cuda() for k, v in inputs.items()}
    cuda["pixel_values"] = cuda["pixel_values"].bfloat16()
    assert _teacher_forced_agreement(install_attention(m), cuda, KVCacheSpec.of(kind, opts),
                                     48) >= 0.995


@pytest.mark.parametrize("kind", ["int4", "fp8"])
def test_static_and_dynamic_quantized_caches_hold_identical_codes(model, inputs, kind):
    spec = KVCacheSpec.of(kind, OPTS)
    dynamic = make_cache(spec, model.config)
    n_vis = model.multi_modal_projector.num_visual_tokens
    length = inputs["input_ids"].shape[1] - 1 + n_vis
    static = make_static_cache(spec, model.config, length + 16)
    with torch.inference_mode():
        for cache in (dynamic, static):
            out = model(**inputs, cache=cache)
            mask, ids = out.attention_mask, inputs["input_ids"][:, -1:]
            for _ in range(9):  # past a flush of the window
                mask = torch.cat([mask, mask.new_ones(2, 1)], 1)
                model(input_ids=ids, attention_mask=mask, cache=cache)
    d, s = dynamic.layers[0], static.layers[0]
    n = d.n_quant
    assert n > 0 and int(s._n_quant()) == n
    assert s.k_codes.dtype == d.k_codes.view().dtype
    assert torch.equal(s.k_codes[:, :, :n].view(torch.uint8), d.k_codes.view().view(torch.uint8))
    assert torch.equal(s.v_scale[:, :, :n], d.v_scale.view())
    for a, b in zip(s.dequantize(), d.dequantize()):
        assert torch.equal(a, b)


def test_end_of_sequence_and_min_new_tokens_match_generate(model, inputs):
    eos = int(_eager(model, inputs, KVCacheSpec(), n=6)[0, -3])  # a token the model emits
    model.compile_decode = True
    try:
        for kw in ({}, {"min_new_tokens": 8}):
            with torch.inference_mode():
                got = model.generate(**inputs, max_new_tokens=12, eos_token_id=eos,
                                     pad_token_id=0, **kw)
            model.compile_decode = False
            want = _eager(model, inputs, KVCacheSpec(), n=12, eos_token_id=eos, pad_token_id=0,
                          **kw)
            model.compile_decode = True
            assert torch.equal(got, want), kw
    finally:
        model.compile_decode = False


def test_streamer_and_unsupported_options(model, inputs, tiny_model_dir):
    from pllava_fast.conversation import load_tokenizer

    model.compile_decode = True
    try:
        one = {k: v[:1] for k, v in inputs.items() if k != "pixel_values"}
        one["pixel_values"] = inputs["pixel_values"][:model.config.num_frames]
        streamer = TextIteratorStreamer(load_tokenizer(tiny_model_dir), skip_prompt=True)
        with torch.inference_mode():
            out = model.generate(**one, max_new_tokens=6, streamer=streamer)
        assert "".join(streamer) and out.shape[1] == one["input_ids"].shape[1] + 6
        for bad, name in (({"do_sample": True}, "do_sample"), ({"num_beams": 2}, "num_beams"),
                          ({"output_scores": True}, "output_scores"), ({"foo": 1}, "foo")):
            with pytest.raises(ValueError, match=name):
                model.generate(**one, max_new_tokens=2, **bad)
    finally:
        model.compile_decode = False


def test_compile_flag_is_checked_at_load(tiny_model_dir):
    with pytest.raises(ValueError, match="compile must be True or False"):
        PllavaForConditionalGeneration.from_pretrained(tiny_model_dir, compile="yes")
    with pytest.raises(ValueError, match="key_quant='channel'"):
        PllavaForConditionalGeneration.from_pretrained(
            tiny_model_dir, compile=True, kv_cache="int8", kv_cache_options={"key_quant": "channel"})


def test_sampling_generation_config_is_refused(model, inputs):
    # a checkpoint whose generation_config samples: the greedy loop says so instead of
    # quietly decoding greedily
    decoder = CompiledDecoder(model, KVCacheSpec())
    model.generation_config.do_sample = True
    try:
        with pytest.raises(ValueError, match="do_sample=True"):
            decoder(**inputs, max_new_tokens=4)
        assert decoder(**inputs, max_new_tokens=4, do_sample=False).shape[1] > 0
    finally:
        model.generation_config.do_sample = False


def test_patch_replaces_the_loaded_cache_and_compile(tiny_model_dir):
    import pllava_fast

    m = PllavaForConditionalGeneration.from_pretrained(tiny_model_dir, kv_cache="int8",
                                                       compile=True)
    pllava_fast.patch(m, kv_cache="model-dtype", attention="eager")
    assert m.kv_cache_spec.kind == "model-dtype" and m.compile_decode is False
    pllava_fast.unpatch(m)
    assert m.kv_cache_spec.kind == "int8" and m.compile_decode is True
    with pytest.raises(ValueError, match="key_quant='channel'"):
        pllava_fast.patch(m, compile=True, kv_cache="int4",
                          kv_cache_options={"key_quant": "channel"})
