"""Attention backends registered with transformers: masks honoured, flash adapter (fake module)."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.masking_utils import AttentionMaskInterface

from pllava_fast import attention
from pllava_fast.kv_cache import make_cache


def tiny_llama(dtype=torch.float32, attn="sdpa"):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=512, attn_implementation=attn)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def padded_batch():
    ids = torch.randint(0, 128, (3, 24))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :13] = 0
    return ids, mask


def test_registered_with_mask_functions():
    for name in attention.ATTENTION_NAMES.values():
        assert name in AttentionInterface._global_mapping
        # without a mask function transformers would build no mask at all for the name
        assert name in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_padded_logits_match_eager(backend):
    model = tiny_llama()
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = model.set_attn_implementation("eager") or model(input_ids=ids, attention_mask=mask).logits
        attention.install_attention(model, backend)
        assert model.config._attn_implementation == attention.ATTENTION_NAMES[backend]
        out = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], rtol=1e-4, atol=1e-5)
    # padding is really applied: the unpadded row alone gives the same logits
    with torch.no_grad():
        alone = model(input_ids=ids[2:, 13:]).logits
    torch.testing.assert_close(out[2, 13:], alone[0], rtol=1e-4, atol=1e-5)


def test_chunked_prefill_over_quantized_cache():
    # a multi-token step after tokens were quantized goes through the dequantized SDPA path
    model = attention.install_attention(tiny_llama())
    ids, mask = padded_batch()
    outs = []
    for cache in (DynamicCache(), make_cache("unquantized", model.config, window=2, block=4)):
        with torch.no_grad():
            model(input_ids=ids[:, :16], attention_mask=mask[:, :16], cache=cache)
            outs.append(model(input_ids=ids[:, 16:], attention_mask=mask, cache=cache).logits)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


class FakeFlashAttn:
    """flash_attn's two entry points with its signatures and (B, L, H, D) layout, in torch."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _attend(q, k, v, softmax_scale, causal):
        # (L, H, D) one sequence; causal aligned bottom-right as flash-attn >= 2.1
        r = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(r, 1), v.repeat_interleave(r, 1)
        lq, lk = q.shape[0], k.shape[0]
        m = None
        if causal:
            m = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
        out = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k.transpose(0, 1).float(),
                                             v.transpose(0, 1).float(), attn_mask=m, scale=softmax_scale)
        return out.transpose(0, 1).to(q.dtype)

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
        self.calls.append(("func", tuple(q.shape), causal))
        return torch.stack([self._attend(q[i], k[i], v[i], softmax_scale, causal) for i in range(q.shape[0])])

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False):
        self.calls.append(("varlen", tuple(cu_seqlens_q.tolist()), causal))
        assert cu_seqlens_q.dtype == torch.int32
        outs = [self._attend(q[a:b], k[a:b], v[a:b], softmax_scale, causal)
                for a, b in zip(cu_seqlens_q[:-1].tolist(), cu_seqlens_q[1:].tolist())]
        return torch.cat(outs)


@pytest.fixture
def fake_flash(monkeypatch):
    fake = FakeFlashAttn()
    monkeypatch.setattr(attention, "_flash_attn", lambda: fake)
    monkeypatch.setattr(attention, "flash_available", lambda device: True)
    return fake


def test_flash_adapter_against_fake_module(fake_flash):
    """Unverified against the real flash-attn (not installable here): checks the adapter's
    layout, unpadding and fallbacks against a fake with flash-attn's signatures."""
    model = tiny_llama(torch.bfloat16)
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = attention.install_attention(model, "sdpa")(input_ids=ids, attention_mask=mask).logits
        out = attention.install_attention(model, "flash")(input_ids=ids, attention_mask=mask).logits
        assert [c[0] for c in fake_flash.calls] == ["varlen", "varlen"]  # one per layer
        assert fake_flash.calls[0][1] == (0, 24, 43, 54)
        valid = mask.bool()
        torch.testing.assert_close(out[valid].float(), ref[valid].float(), rtol=0.05, atol=0.05)
        fake_flash.calls.clear()
        out = model(input_ids=ids[:1]).logits  # no padding: plain flash_attn_func, causal
        assert fake_flash.calls[0] == ("func", (1, 24, 8, 16), True)
        torch.testing.assert_close(out.float(), ref[:1].float(), rtol=0.05, atol=0.05)


def test_flash_adapter_decode_and_fallbacks(fake_flash):
    model = attention.install_attention(tiny_llama(torch.bfloat16), "flash")
    ids, mask = padded_batch()
    ref_model = attention.install_attention(tiny_llama(torch.bfloat16), "sdpa")
    ref_model.load_state_dict(model.state_dict())
    kw = dict(max_new_tokens=4, do_sample=False)
    out = model.generate(input_ids=ids[:1], cache=DynamicCache(), **kw)
    ref = ref_model.generate(input_ids=ids[:1], cache=DynamicCache(), **kw)
    assert torch.equal(out, ref)
    assert ("func", (1, 1, 8, 16), False) in fake_flash.calls  # decode step, not causal
    # a mask flash-attn cannot express (not causal + padding) falls back to SDPA
    q = torch.randn(1, 8, 6, 16, dtype=torch.bfloat16)
    k = v = torch.randn(1, 2, 6, 16, dtype=torch.bfloat16)
    full = torch.ones(1, 1, 6, 6, dtype=torch.bool)
    assert attention._flash_forward(model.model.layers[0].self_attn, q, k, v, full, 0.0, 0.25, None) is None


def test_select_backend():
    q = torch.randn(1, 2, 3, 16)
    assert attention.select_backend(q) == "sdpa"
    assert attention.select_backend(q, "sdpa") == "sdpa"
    with pytest.raises(ValueError, match="flash backend needs"):
        attention.select_backend(q, "flash")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.select_backend(q, "xformers")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention.install_attention(tiny_llama(), "xformers")
