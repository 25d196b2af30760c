"""QuantizedKVCache against transformers' DynamicCache on tiny Llama models (CPU)."""
import pathlib

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from pllava_fast.attention import install_attention
from pllava_fast.kv_cache import make_cache, teacher_forced_logits
from pllava_fast.kv_spec import bytes_per_token
from pllava_fast.quantized_cache import QuantizedKV, QuantizedKVCache, QuantizedKVLayer

TOY_MODEL = pathlib.Path(__file__).parent / "data" / "kv_cache_toy_llama"


def tiny_llama(**overrides):
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=8, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    return install_attention(model)


def left_padded(batch, length, vocab, pads):
    ids = torch.randint(0, vocab, (batch, length))
    mask = torch.ones_like(ids)
    for i, p in enumerate(pads):
        mask[i, :p] = 0
    return ids, mask


def greedy(model, ids, mask, cache, n=24, **kw):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                          cache=cache, **kw)


@pytest.mark.parametrize("opts", [dict(window=4, block=8), dict(window=0, block=4, key_quant="channel")])
def test_fp_format_greedy_identical_to_dynamic_cache(opts):
    model = tiny_llama()
    ids, mask = left_padded(3, 37, 128, [0, 5, 11])
    ref = greedy(model, ids, mask, DynamicCache())
    cache = make_cache("unquantized", model.config, **opts)
    out = greedy(model, ids, mask, cache)
    assert torch.equal(out, ref)
    layer = cache.layers[0]
    assert layer.n_quant > 0  # the decode steps really ran over the "quantized" part
    assert cache.get_seq_length() == ref.shape[1] - 1


def test_fp_format_beam_search_identical():
    # beam search reorders the cache every step (reorder_cache) and expands it (repeat_interleave)
    model = tiny_llama()
    ids, mask = left_padded(2, 20, 128, [0, 3])
    ref = greedy(model, ids, mask, DynamicCache(), n=10, num_beams=3)
    out = greedy(model, ids, mask, make_cache("unquantized", model.config, window=2, block=4), n=10, num_beams=3)
    assert torch.equal(out, ref)


def test_mistral_sliding_window_fp_identical():
    # sliding-window layers: the window comes through the mask, which decode attention reads
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16)
    model = install_attention(MistralForCausalLM(cfg).eval())
    ids, mask = left_padded(2, 30, 128, [0, 4])
    ref = greedy(model, ids, mask, DynamicCache(config=cfg), n=12)
    assert torch.equal(greedy(model, ids, mask, make_cache("unquantized", cfg, window=2, block=4), n=12), ref)


def toy_model():
    if not TOY_MODEL.is_dir():
        pytest.skip(f"toy model not found at {TOY_MODEL} (python tests/test_kv_cache.py trains it)")
    return install_attention(LlamaForCausalLM.from_pretrained(TOY_MODEL, dtype=torch.float32).eval())


def repeated_motifs(batch, length, vocab, seed):
    """The toy model's task: a random motif (8..24 tokens) repeated; continuing it needs the
    whole context, i.e. attention over the (quantized) cache."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        period = int(torch.randint(8, 25, (1,), generator=g))
        motif = torch.randint(0, vocab, (period,), generator=g)
        rows.append(motif.repeat(length // period + 1)[:length])
    return torch.stack(rows)


@pytest.fixture(scope="module")
def agreement_setup():
    model = toy_model()
    prompts, prompt_len, steps = 20, 320, 16
    ids = repeated_motifs(prompts, prompt_len + steps, model.config.vocab_size, seed=5)
    mask = torch.ones_like(ids)
    for i in range(prompts):
        mask[i, : 3 * i] = 0  # left padding, unequal lengths
    ref = teacher_forced_logits(model, ids, mask, prompt_len, DynamicCache())
    return model, ids, mask, prompt_len, ref


@pytest.mark.parametrize("kind,key_quant,floor", [("int8", "token", 0.99), ("int4", "token", 0.95),
                                                  ("int4", "channel", 0.95), ("fp8", "token", 0.97)])
def test_teacher_forced_agreement(agreement_setup, kind, key_quant, floor, capsys):
    model, ids, mask, prompt_len, ref = agreement_setup
    top2 = ref.topk(2, dim=-1).values
    gap = (top2[..., 0] - top2[..., 1]).median().item()
    assert gap > 1.0, "the toy model should have a realistic logit spread"
    cache = make_cache(kind, model.config, window=16, block=16, group_size=16, key_quant=key_quant)
    logits = teacher_forced_logits(model, ids, mask, prompt_len, cache)
    assert cache.layers[0].n_quant >= 300
    agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()
    with capsys.disabled():
        print(f"\n{kind} ({key_quant} keys): teacher-forced argmax agreement {agree:.4f} over {ref.shape[0]} prompts x "
              f"{ref.shape[1]} steps (median top-1/top-2 logit gap {gap:.2f})")
    assert agree >= floor


@pytest.mark.cuda
@pytest.mark.parametrize("kind,floor", [("unquantized", 1.0), ("int8", 0.99), ("int4", 0.95),
                                        ("fp8", 0.97)])
def test_teacher_forced_agreement_cuda_bf16(kind, floor):
    # the Triton decode kernel and quantize kernels inside generation, bf16 on the GPU
    model = toy_model().to("cuda", torch.bfloat16)
    ids = repeated_motifs(20, 336, model.config.vocab_size, seed=5).cuda()
    mask = torch.ones_like(ids)
    ref = teacher_forced_logits(model, ids, mask, 320, DynamicCache()).argmax(-1)
    cache = make_cache(kind, model.config, window=16, block=16, group_size=16)
    agree = (teacher_forced_logits(model, ids, mask, 320, cache).argmax(-1) == ref).float().mean()
    assert agree >= floor - (0.02 if kind == "unquantized" else 0)  # fp: bf16 summation-order ties


@pytest.mark.parametrize("kind,bits", [("int8", 8), ("int4", 4), ("fp8", 8)])
def test_bytes_per_token_match_format(kind, bits):
    model = tiny_llama(head_dim=32, num_attention_heads=4)  # 2 layers, 2 KV heads
    ids, mask = left_padded(2, 160, 128, [0, 9])
    dyn = make_cache("model-dtype", model.config)
    quant = make_cache(kind, model.config, window=16, block=16, group_size=32)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, cache=dyn)
        model(input_ids=ids, attention_mask=mask, cache=quant)
    bf16 = bytes_per_token("model-dtype", 2, 2, 32)
    dyn_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in dyn.layers)
    assert dyn_bytes / (2 * 160) == 2 * bf16  # the tiny model runs in fp32
    window_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in quant.layers)
    n_q = quant.layers[0].n_quant
    assert n_q == 144
    measured = (quant.nbytes() - window_bytes) / (2 * n_q)
    assert measured == bytes_per_token(kind, 2, 2, 32, group_size=32)
    scales = 2 * 4 * 2 * 2 * 2  # (scale, zero) x fp32 x (K, V) x heads x layers, one group per head
    assert measured / bf16 == pytest.approx(bits / 16 + scales / bf16)


def test_bytes_per_token_7b_ratios():
    bf16 = bytes_per_token("model-dtype", 32, 32, 128)
    assert bf16 == 2 * 128 * 2 * 32 * 32  # 512 KiB per token
    assert bytes_per_token("int8", 32, 32, 128, group_size=128) / bf16 <= 0.55
    assert bytes_per_token("int4", 32, 32, 128, group_size=128) / bf16 <= 0.30


def test_window_and_blocks():
    layer = QuantizedKVLayer(bits=4, group_size=16, window=16, block=16)
    k, v = torch.randn(2, 2, 300, 32), torch.randn(2, 2, 300, 32)
    out_k, out_v = layer.update(k, v)
    assert out_k is k and out_v is v  # prefill attends over the full-precision inputs
    assert layer.n_quant == 272 and layer.keys.shape[2] == 28
    assert torch.equal(layer.keys, k[:, :, 272:])
    for step in range(20):
        hk, hv = layer.update(torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32))
        assert isinstance(hk, QuantizedKV) and hk is hv
        assert 16 <= layer.keys.shape[2] < 32
    assert layer.get_seq_length() == 320
    deq_k, _ = layer.dequantize(torch.float32)
    assert deq_k.shape == (2, 2, 320, 32)
    err = (deq_k[:, :, :272] - k[:, :, :272]).abs()
    assert err.max() < 0.5 and err.mean() < 0.1


@pytest.mark.parametrize("key_quant", ["token", "channel"])
def test_crop(key_quant):
    layer = QuantizedKVLayer(bits=8, group_size=16, window=4, block=8, key_quant=key_quant)
    k, v = torch.randn(1, 2, 50, 16), torch.randn(1, 2, 50, 16)
    layer.update(k, v)
    full_k, full_v = layer.dequantize()
    layer.crop(-3)  # inside the window: exact
    assert layer.get_seq_length() == 47
    torch.testing.assert_close(layer.dequantize()[0], full_k[:, :, :47])
    layer.crop(-10)  # into the quantized part
    assert layer.get_seq_length() == 37
    ck, cv = layer.dequantize()
    torch.testing.assert_close(ck, full_k[:, :, :37])
    torch.testing.assert_close(cv, full_v[:, :, :37])
    layer.crop(30)  # legacy: keep the first 30 tokens
    assert layer.get_seq_length() == 30
    layer.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16))
    assert layer.get_seq_length() == 31


def test_batch_reorder_select_repeat():
    cache = QuantizedKVCache(bits=4, group_size=16, window=4, block=8, num_layers=1)
    k, v = torch.randn(3, 2, 40, 16), torch.randn(3, 2, 40, 16)
    cache.update(k, v, 0)
    before = cache.layers[0].dequantize()
    idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(idx)
    after = cache.layers[0].dequantize()
    for a, b in zip(after, before):
        assert torch.equal(a, b[idx])
    cache.batch_select_indices(torch.tensor([1, 2]))
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].dequantize()[0].shape[0] == 4
    assert cache.batch_size == 4


def test_handle_needs_pllava_attention():
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    ids, mask = left_padded(1, 40, 128, [0])
    with pytest.raises(AttributeError, match="install_attention"):
        greedy(model, ids, mask, make_cache("int8", model.config, window=4, block=8), n=3)


def test_make_cache_kinds_and_errors():
    cfg = LlamaConfig(num_hidden_layers=3)
    assert isinstance(make_cache("model-dtype", cfg), DynamicCache)
    for kind, bits in (("unquantized", 16), ("int8", 8), ("int4", 4), ("fp8", 8)):
        cache = make_cache(kind, cfg, window=64, group_size=128)
        assert isinstance(cache, QuantizedKVCache) and cache.bits == bits and len(cache.layers) == 3
        assert cache.fp8 == (kind == "fp8") and cache.layers[0].fp8 == cache.fp8
    with pytest.raises(ValueError, match="fp8 codes are per token group"):
        make_cache("fp8", cfg, key_quant="channel")
    with pytest.raises(ValueError, match="unknown cache kind"):
        make_cache("int2", cfg)
    with pytest.raises(ValueError, match="group_size"):
        make_cache("int4", cfg, group_size=48)
    with pytest.raises(ValueError, match="key_quant"):
        make_cache("int4", cfg, key_quant="tensor")
    with pytest.raises(ValueError, match="no options"):
        make_cache("model-dtype", cfg, window=3)
    with pytest.raises(ValueError, match="even head dim"):
        QuantizedKVLayer(bits=4).update(torch.randn(1, 1, 4, 15), torch.randn(1, 1, 4, 15))


def test_tiny_pllava_video_generate():
    testing = pytest.importorskip("pllava_fast.testing")
    if not hasattr(testing, "tiny_pllava"):
        pytest.skip("pllava_fast.testing.tiny_pllava not available yet")
    model, tok = testing.tiny_pllava()
    model = install_attention(model.eval())
    cfg = model.config
    prompts = ["USER:<image> What is happening in the video? ASSISTANT:", "USER:<image> Describe it. ASSISTANT:"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    pv = testing.random_pixel_values(2 * cfg.num_frames, cfg)
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=cfg.pad_token_id)
    ref = model.generate(**enc, pixel_values=pv, cache=DynamicCache(), **kw)
    cache = make_cache("unquantized", cfg, window=4, block=8)
    assert torch.equal(model.generate(**enc, pixel_values=pv, cache=cache, **kw), ref)
    assert cache.layers[0].n_quant > 0
    out = model.generate(**enc, pixel_values=pv, cache=make_cache("int8", cfg, window=4, block=8), **kw)
    assert out.shape == ref.shape


def train_toy_model(path=TOY_MODEL):
    """The recipe of the committed toy model (~90k parameters, stored fp16): repeated-motif
    continuation, an induction task whose answers need attention over the whole context. AdamW
    (lr 3e-3, restarted per phase): 1200 steps of 16 x 128 tokens, then 400 steps of 8 x 352
    tokens so that 300+ token contexts are in distribution. Takes a few minutes on 2 CPU cores."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=1024, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    for steps, batch, length, seed in ((400, 16, 128, 1), (800, 16, 128, 2), (400, 8, 352, 3)):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            period = int(torch.randint(8, 25, (1,), generator=g))
            motif = torch.randint(0, 64, (batch, period), generator=g)
            x = motif.repeat(1, length // period + 1)[:, :length]
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.to(torch.float16).save_pretrained(path)


if __name__ == "__main__":
    train_toy_model()
