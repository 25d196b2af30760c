"""Per-stage wall times of a pipeline run: ``StageTimer``, the probe that times the model's
stages inside ``generate()``, and the timings table.

Stages, in pipeline order: ``video_decode`` (sampled frames from the file), ``preprocess``,
``vision`` (CLIP), ``projector``, ``prefill`` (the LLM over prompt + visual tokens), ``llm_decode``
(the LLM's token loop after the first token).
"""
from __future__ import annotations

import contextlib
import time

import torch

STAGES = ("video_decode", "preprocess", "vision", "projector", "prefill", "llm_decode")


class StageTimer:
    """Accumulates wall time per named stage.

    Each measurement synchronises the device before and after, so asynchronous CUDA work is charged
    to the stage that launched it (the cost: one sync per measurement, which the decode loop pays
    anyway when it checks for end-of-sequence).
    """

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def add(self, name: str, seconds: float, count: int = 1):
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + count

    @contextlib.contextmanager
    def stage(self, name: str):
        self.sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.add(name, time.perf_counter() - t0)


class _ModelProbe:
    """Times the vision tower, projector, prefill and decode steps inside ``model.generate``.

    Installed for one run and removed afterwards: an instance-level wrapper around
    ``get_video_features`` (all visual work), forward hooks on one of its parts (``part``: (stage,
    attribute), the projector by default) and on the language model. The other visual stage
    (``rest``) is the wrapper's time minus the part's. The first language-model call of a run is
    the prefill; later calls are decode steps.
    """

    def __init__(self, model, timer: StageTimer, *, part=("projector", "multi_modal_projector"),
                 rest="vision", lm: bool = True):
        # lm=False: the language model runs inside a compiled step, where a Python hook would
        # break the graph; the compiled loop reports its own prefill / llm_decode times
        self.model, self.timer, self.hook_lm = model, timer, lm
        self.part_stage, self.part_attr = part
        self.rest = rest
        self.handles = []
        self.lm_calls = 0
        self._t0 = {}

    def _start(self, key):
        self.timer.sync()
        self._t0[key] = time.perf_counter()

    def _stop(self, key):
        self.timer.sync()
        return time.perf_counter() - self._t0.pop(key)

    def __enter__(self):
        m, stage = self.model, self.part_stage
        part = getattr(m, self.part_attr, None)
        if part is not None:
            self.handles.append(part.register_forward_pre_hook(lambda *a: self._start(stage)))
            self.handles.append(part.register_forward_hook(
                lambda *a: self.timer.add(stage, self._stop(stage))))
        lm = getattr(m, "language_model", None) if self.hook_lm else None
        if lm is not None:
            self.handles.append(lm.register_forward_pre_hook(lambda *a: self._start("lm")))
            self.handles.append(lm.register_forward_hook(self._lm_done))
        features = getattr(m, "get_video_features", None)
        if features is not None:
            def timed_features(*args, **kwargs):
                before = self.timer.seconds.get(stage, 0.0)
                self._start("visual")
                out = features(*args, **kwargs)
                total = self._stop("visual")
                self.timer.add(self.rest, total - (self.timer.seconds.get(stage, 0.0) - before))
                return out
            m.get_video_features = timed_features
        return self

    def _lm_done(self, module, args, output):
        dt = self._stop("lm")
        self.timer.add("prefill" if self.lm_calls == 0 else "llm_decode", dt)
        self.lm_calls += 1

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if "get_video_features" in vars(self.model):
            del self.model.get_video_features
        return False


def summarise(timer: StageTimer, batch: int, new_tokens: int) -> dict:
    """The timings dict of one run (see ``VideoPipeline.timings``): ``<stage>_s`` per stage,
    ``ttft_s``, ``total_s``, ``llm_decode_steps``, ``llm_decode_tokens_per_s`` (per sequence) and,
    on CUDA, ``peak_memory_bytes``."""
    s = dict(timer.seconds)
    steps = timer.counts.get("llm_decode", 0)
    out = {f"{k}_s": s.get(k, 0.0) for k in STAGES}
    out["batch_size"] = batch
    out["new_tokens"] = int(new_tokens)
    out["llm_decode_steps"] = steps
    out["llm_decode_tokens_per_s"] = steps / s["llm_decode"] if s.get("llm_decode") else None
    # time to first token: everything up to the end of the prefill (which yields token 1)
    out["ttft_s"] = sum(s.get(k, 0.0) for k in STAGES[:-1])
    out["total_s"] = s.get("video_decode", 0.0) + s.get("preprocess", 0.0) + s.get("model", 0.0)
    if timer.device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(timer.device)
    return out


def format_timings(timings: dict) -> str:
    """A small aligned table of per-stage times (ms) and the LLM's decode speed."""
    lines = [f"{'stage':<14}{'ms':>10}"]
    for name in STAGES:
        sec = timings.get(f"{name}_s")
        if sec is not None:
            lines.append(f"{name:<14}{sec * 1e3:>10.1f}")
    lines.append(f"{'TTFT':<14}{timings.get('ttft_s', 0.0) * 1e3:>10.1f}")
    lines.append(f"{'total':<14}{timings.get('total_s', 0.0) * 1e3:>10.1f}")
    tps = timings.get("llm_decode_tokens_per_s")
    if tps:
        lines.append(f"llm_decode: {timings['llm_decode_steps']} steps, {tps:.1f} tokens/s per "
                     f"sequence (batch {timings['batch_size']})")
    return "\n".join(lines)
