"""The LLM's token loop, compiled: a static KV cache and one captured decode step (gpt-fast style).

The prefill runs eagerly through the PLLaVA model (vision tower, pooled projector, visual-token
merge) into a static cache sized for batch x (expanded prompt + max_new_tokens), rounded up to a
length bucket so nearby prompt lengths share a graph. Every later token is one call of a
``torch.compile``'d step with fixed shapes and no host syncs: (B, 1) token and PLLaVA positions
(the count of attended tokens), a (B, bucket) mask, the cache's buffers written in place at the
cache's length tensor. CPU: inductor with ``fullgraph=True, dynamic=False``, module guards skipped
and the C++ wrapper (each saves 15-20% of a tiny step). CUDA: ``mode="reduce-overhead"`` (CUDA
graphs), outputs cloned, end-of-sequence checked every ``CHECK_EVERY`` steps (unverified on GPU).

Greedy only: sampling and beam search go through ``generate()`` with ``compile=False``. One
compiled step exists per (batch, length bucket); ``stats["graphs"]`` counts them. Compiled code is
cached on disk by torch (``TORCHINDUCTOR_CACHE_DIR``), so a later process compiles in seconds.
"""
from __future__ import annotations

import time
import types

import torch
from torch import Tensor

from .compat import cache_kwarg_name
from .kv_cache import make_static_cache

LENGTH_BUCKET = 64
# steps between end-of-sequence checks (a host sync): every step on CPU, where a sync is free
CHECK_EVERY = {"cpu": 1, "cuda": 8}
# generate() keywords the compiled loop honours; anything else asks for generate() itself
_GREEDY_DEFAULTS = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1,
                    "temperature": None, "top_p": None, "top_k": None, "use_cache": True,
                    "return_dict_in_generate": False, "output_scores": False,
                    "output_logits": False, "repetition_penalty": None}


# generation_config fields that would make generate() other than greedy
_GENERATION_CONFIG_CHECKED = ("do_sample", "num_beams", "num_return_sequences")


class CompiledDecoder:
    """Greedy generation with a static cache of ``spec``'s kind and a compiled decode step.

    ``generate(...)`` returns what ``model.generate`` returns for greedy decoding: the prompt ids
    followed by the new ones (rows padded with ``pad_token_id`` after their end-of-sequence).
    ``stats`` after a call: prefill_s, llm_decode_s, steps, compile_s (first call of a new graph),
    graphs. ``generate(..., teacher_tokens=T)`` feeds T's (B, max_new_tokens) tokens instead of
    its own and returns its argmax at every step: the teacher-forced agreement of the compiled
    loop with another run (the eager one) without the divergence of free-running decoding.
    """

    def __init__(self, model, spec, *, compile: bool = True):
        self.model, self.lm, self.spec, self.compile = model, model.language_model, spec, compile
        self._cache_kw = cache_kwarg_name(self.lm)
        self._entries: dict[tuple, tuple] = {}
        self.stats: dict = {"graphs": 0}

    # -- the step ------------------------------------------------------------------------------
    def _make_step(self, cache, device: torch.device):
        model, lm, kw = self.model, self.lm, self._cache_kw

        def step(tok: Tensor, pos: Tensor, mask: Tensor, done: Tensor, allow_eos: Tensor,
                 eos: Tensor, pad: Tensor):
            logits = lm(inputs_embeds=model.embed_text(tok), attention_mask=mask,
                        position_ids=pos, use_cache=True, logits_to_keep=1,
                        **{kw: cache}).logits[:, -1]
            # min_new_tokens: end-of-sequence ids cannot win before they are allowed
            logits = logits.masked_fill(eos[None, :] & ~allow_eos, float("-inf"))
            nxt = logits.argmax(-1, keepdim=True)
            nxt = torch.where(done, pad, nxt)
            return nxt, pos + 1, done | eos[nxt]

        if not self.compile:
            return step
        # a fresh code object per (batch, bucket): each compiled step keeps its own graph and
        # guards instead of recompiling one shared function
        code = step.__code__.replace(co_name=f"pllava_decode_step_{len(self._entries)}")
        fresh = types.FunctionType(code, step.__globals__, code.co_name, step.__defaults__,
                                   step.__closure__)
        if device.type == "cuda":
            return torch.compile(fresh, mode="reduce-overhead", fullgraph=True, dynamic=False)
        return torch.compile(fresh, fullgraph=True, dynamic=False, options={
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
            "cpp_wrapper": True})

    def _entry(self, batch: int, length: int, device: torch.device, dtype: torch.dtype):
        bucket = -(-length // LENGTH_BUCKET) * LENGTH_BUCKET
        key = (batch, bucket, device, dtype)
        if key not in self._entries:
            cache = make_static_cache(self.spec, self.model.config, bucket)
            self._entries[key] = (cache, self._make_step(cache, device), bucket)
            self.stats["graphs"] = len(self._entries)
            return self._entries[key], True
        cache = self._entries[key][0]
        cache.reset()
        return self._entries[key], False

    # -- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                 pixel_values: Tensor | None = None, frames_per_video=None, media_type=None,
                 max_new_tokens: int, min_new_tokens: int = 0, eos_token_id=None,
                 pad_token_id: int | None = None, streamer=None,
                 teacher_tokens: Tensor | None = None) -> Tensor:
        model = self.model
        device = model.get_input_embeddings().weight.device
        input_ids = input_ids.to(device)
        b = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        n_img = int((input_ids == model.config.image_token_index).sum(-1).max())
        expanded = input_ids.shape[1] + n_img * (model.multi_modal_projector.num_visual_tokens - 1)
        (cache, step, bucket), fresh = self._entry(b, expanded + max_new_tokens, device,
                                                   model.get_input_embeddings().weight.dtype)
        eos_ids = [] if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = torch.tensor(pad_token_id if pad_token_id is not None else 0, device=device)
        vocab = self.lm.get_output_embeddings().weight.shape[0]
        eos = torch.zeros(vocab, dtype=torch.bool, device=device)
        eos[[i for i in eos_ids if 0 <= i < vocab]] = True
        if streamer is not None:
            streamer.put(input_ids.cpu())

        t0 = time.perf_counter()
        out = model(input_ids=input_ids, attention_mask=attention_mask.to(device),
                    pixel_values=pixel_values, frames_per_video=frames_per_video,
                    media_type=media_type, logits_to_keep=1, use_cache=True,
                    **{self._cache_kw: cache})
        merged = out.attention_mask if out.attention_mask is not None else attention_mask
        logits = out.logits[:, -1].masked_fill(eos[None, :] & (min_new_tokens > 0), float("-inf"))
        tok = logits.argmax(-1, keepdim=True)
        done = eos[tok]
        mask = merged.new_ones(b, bucket)
        mask[:, :merged.shape[1]] = merged
        pos = merged.long().sum(-1, keepdim=True)  # PLLaVA: attended tokens so far
        self._sync(device)
        t1 = time.perf_counter()
        self.stats.update(prefill_s=t1 - t0, compile_s=0.0)

        tokens, flags = [tok], [done]
        if streamer is not None:
            streamer.put(tok.cpu())
        every = CHECK_EVERY.get(device.type, 8)
        allowed = (torch.tensor(False, device=device), torch.tensor(True, device=device))
        for i in range(1, max_new_tokens):
            if teacher_tokens is not None:
                tok, done = teacher_tokens[:, i - 1:i].to(device), torch.zeros_like(done)
            elif i % every == 0 and bool(done.all()):
                break
            allow = allowed[i >= min_new_tokens]  # no host-to-device copy per step
            if device.type == "cuda" and self.compile:
                torch.compiler.cudagraph_mark_step_begin()
            ts = time.perf_counter()
            tok, pos, done = step(tok, pos, mask, done, allow, eos, pad)
            if device.type == "cuda" and self.compile:  # graph outputs are reused on replay
                tok, pos, done = tok.clone(), pos.clone(), done.clone()
            if fresh and i == 1:
                self._sync(device)
                self.stats["compile_s"] = time.perf_counter() - ts
            tokens.append(tok)
            flags.append(done)
            if streamer is not None:
                streamer.put(tok.cpu())
        self._sync(device)
        new = torch.cat(tokens, 1)
        # generate() stops at the step where every row has ended: drop the columns after it
        all_done = torch.stack([f.all() for f in flags]).cpu()
        if bool(all_done.any()):
            new = new[:, :int(all_done.nonzero()[0]) + 1]
        self.stats.update(llm_decode_s=time.perf_counter() - t1 - self.stats["compile_s"],
                          steps=new.shape[1] - 1)
        if streamer is not None:
            streamer.end()
        return torch.cat([input_ids, new], 1)

    def __call__(self, input_ids=None, *, attention_mask=None, pixel_values=None,
                 frames_per_video=None, media_type=None, max_new_tokens=None, min_new_tokens=None,
                 eos_token_id=None, pad_token_id=None, streamer=None, **options) -> Tensor:
        """``generate()``'s keywords; defaults from the model's generation_config; any option
        the greedy loop cannot honour raises a ValueError naming it, whether passed or set in
        the model's generation_config (a checkpoint that samples by default)."""
        gc = self.model.generation_config
        decoding = {name: getattr(gc, name, None) for name in _GENERATION_CONFIG_CHECKED}
        check_greedy({**decoding, **options})
        if input_ids is None:
            raise ValueError("compile=True generates from input_ids (pass them, not inputs_embeds)")
        return self.generate(
            input_ids, attention_mask, pixel_values=pixel_values,
            frames_per_video=frames_per_video, media_type=media_type,
            max_new_tokens=int(max_new_tokens or gc.max_new_tokens or 20),
            min_new_tokens=int(min_new_tokens or gc.min_new_tokens or 0),
            eos_token_id=eos_token_id if eos_token_id is not None else gc.eos_token_id,
            pad_token_id=pad_token_id if pad_token_id is not None else gc.pad_token_id,
            streamer=streamer)

    @staticmethod
    def _sync(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def check_greedy(kwargs: dict) -> None:
    """ValueError naming the first ``generate()`` option the compiled loop cannot honour."""
    for name, value in kwargs.items():
        if name in _GREEDY_DEFAULTS and value not in (_GREEDY_DEFAULTS[name], None):
            if name == "repetition_penalty" and value == 1.0:
                continue
            raise ValueError(f"compile=True decodes greedily with a static cache; {name}={value!r} "
                             "needs compile=False (transformers' generate())")
        if name not in _GREEDY_DEFAULTS:
            raise ValueError(f"compile=True does not support generate(..., {name}=...): use "
                             "compile=False for it")
