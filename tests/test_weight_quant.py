"""Weight-only int8 / int4 LLM through torchao: which modules, how many bytes, how close the
answers stay (teacher-forced on the trained toy model), and the whole pipeline with each option."""
import pathlib

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

pytest.importorskip("torchao")

from pllava_fast.kv_cache import teacher_forced_logits  # noqa: E402
from pllava_fast.model import PllavaForConditionalGeneration  # noqa: E402
from pllava_fast.pipeline import VideoPipeline  # noqa: E402
from pllava_fast.testing import make_clip  # noqa: E402
from pllava_fast.weight_quant import (LM_LINEARS, WeightSpec, check_weights, parameter_bytes,  # noqa: E402
                                      quantize_weights, tensor_bytes)

TOY = pathlib.Path(__file__).parent / "data" / "kv_cache_toy_llama"


def _quantized(module) -> bool:
    return hasattr(getattr(module, "weight", None), "__tensor_flatten__")


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_decoder_linears_quantized_and_bytes(kind):
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=512)).to(torch.bfloat16).eval()
    linears = {n: m for n, m in lm.named_modules() if n.rsplit(".", 1)[-1] in LM_LINEARS}
    before = sum(tensor_bytes(m.weight) for m in linears.values())
    report = quantize_weights(lm, WeightSpec(kind, group_size=128))
    assert sorted(report["quantized"]) == sorted(linears) and report["skipped"] == []
    assert all(_quantized(m) for m in linears.values())
    assert not _quantized(lm.lm_head) and not _quantized(lm.model.embed_tokens)
    ratio = sum(tensor_bytes(m.weight) for m in linears.values()) / before  # scales included
    assert ratio <= (0.53 if kind == "int8" else 0.30), ratio
    assert report["bytes_after"] < report["bytes_before"] == parameter_bytes(
        LlamaForCausalLM(lm.config).to(torch.bfloat16))


@pytest.mark.parametrize("kind,group,dtype,floor", [("int8", 128, torch.float32, 0.99),
                                                    ("int4", 64, torch.bfloat16, 0.95)])
def test_teacher_forced_agreement_on_the_toy_model(kind, group, dtype, floor):
    model = LlamaForCausalLM.from_pretrained(TOY, dtype=dtype).eval()
    g = torch.Generator().manual_seed(5)
    rows = []
    for _ in range(20):
        period = int(torch.randint(8, 25, (1,), generator=g))
        rows.append(torch.randint(0, 64, (period,), generator=g).repeat(400 // period + 1)[:336])
    ids, mask = torch.stack(rows), torch.ones(20, 336, dtype=torch.long)
    ref = teacher_forced_logits(model, ids, mask, 320, DynamicCache()).argmax(-1)
    report = quantize_weights(model, WeightSpec(kind, group_size=group))
    assert len(report["quantized"]) == 14  # every decoder linear of the 2 layers
    got = teacher_forced_logits(model, ids, mask, 320, DynamicCache()).argmax(-1)
    assert (got == ref).float().mean().item() >= floor


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_clip(tmp_path_factory.mktemp("wq") / "c.mp4", num_frames=8, height=48, width=64)


@pytest.mark.parametrize("weights,options,kv", [
    ("int8", {}, "model-dtype"),
    ("int4", {"group_size": 32}, "int4"),
    ("int8", {"lm_head": True, "vision": True, "projector": True, "embeddings": True}, "int8"),
])
def test_pipeline_answers_with_quantized_weights(tiny_model_dir, clip, weights, options, kv):
    pipe = VideoPipeline.from_pretrained(tiny_model_dir, weights=weights, weight_options=options,
                                         kv_cache=kv)
    model = pipe.model
    assert pipe.dtype == torch.bfloat16  # "auto" with quantized weights on CPU
    assert _quantized(model.language_model.model.layers[0].mlp.down_proj)
    assert _quantized(model.multi_modal_projector.linear_1) == options.get("projector", False)
    assert _quantized(model.language_model.lm_head) == options.get("lm_head", False)
    out = pipe([clip], "What happens?", max_new_tokens=6, min_new_tokens=6)
    assert out.sequences.shape == (1, 6) and isinstance(out.texts[0], str)
    with pytest.raises(ValueError, match="cannot be saved"):
        model.save_pretrained(tiny_model_dir + "-copy")


def test_quantized_weights_with_compiled_decode(tiny_model_dir, clip):
    eager = VideoPipeline.from_pretrained(tiny_model_dir, weights="int8")
    compiled = VideoPipeline(eager.model, eager.tokenizer, compile=True)
    want = eager([clip], "What happens?", max_new_tokens=8, min_new_tokens=8).sequences
    assert torch.equal(compiled([clip], "What happens?", max_new_tokens=8,
                                min_new_tokens=8).sequences, want)


def test_bad_weight_arguments_fail_before_loading(tiny_model_dir, monkeypatch):
    for kwargs, match in ((dict(weights="int2"), "weights must be"),
                          (dict(weights="int4", weight_options={"group_size": 48}), "group_size"),
                          (dict(weights="int8", weight_options={"heads": True}), "unknown"),
                          (dict(weight_options={"lm_head": True}), "need weights")):
        with pytest.raises(ValueError, match=match):
            PllavaForConditionalGeneration.from_pretrained(tiny_model_dir, **kwargs)
    from pllava_fast import weight_quant

    monkeypatch.setattr(weight_quant, "_trial", lambda *a: "RuntimeError: no kernel here")
    with pytest.raises(ValueError, match="does not run on cpu in bfloat16: RuntimeError.*cpu_opaque"):
        check_weights(WeightSpec("int4"), "cpu", torch.bfloat16)


def test_missing_torchao_is_named(monkeypatch):
    import sys

    from pllava_fast import weight_quant

    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    with pytest.raises(ImportError, match=r"pip install 'pllava-fast\[quant\]'"):
        weight_quant._torchao()


def test_patch_quantizes_a_llava_language_model_only():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    import pllava_fast

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, image_size=28, patch_size=14)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_index=127)).eval()
    pllava_fast.patch(llava, weights="int8", num_frames=2)
    named = dict(llava.named_modules())
    assert _quantized(named["model.language_model.layers.0.self_attn.q_proj"])
    vision_q = [m for n, m in named.items() if "vision_tower" in n and n.endswith("q_proj")]
    assert vision_q and not any(_quantized(m) for m in vision_q)
    assert not _quantized(llava.lm_head)
