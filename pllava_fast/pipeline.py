"""Video question answering end to end: decode -> preprocess -> prompt -> generate.

``VideoPipeline`` ties the stages together for one model: it samples and decodes the frames
(``pllava_fast.video``), turns them into model input (``pllava_fast.preprocess``), builds the
prompt (``pllava_fast.conversation``) and calls ``model.generate`` on a left-padded batch, with an
optional quantized KV cache and streaming. Every run records per-stage wall times (decode,
preprocess, vision, projector, prefill, decode tokens/s), synchronised with the device so GPU work
is charged to the stage that launched it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from typing import Iterable, Iterator, Sequence

import torch

__all__ = ["KV_CACHE_KINDS", "PipelineOutput", "StageTimer", "VideoPipeline", "resolve_dtype",
           "add_kv_cache_arguments", "kv_cache_options"]

KV_CACHE_KINDS = ("bf16", "int8", "int4")

# Stages in pipeline order; the timing table prints them in this order.
STAGES = ("decode", "preprocess", "vision", "projector", "prefill", "generate")


def resolve_dtype(dtype, device) -> torch.dtype:
    """``"auto"``/None -> bf16 on CUDA, fp32 on CPU; a name ("bf16", "float16", ...) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
             "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
             "float32": torch.float32, "float": torch.float32}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(names)} or 'auto'")
    return names[dtype]


def generate_cache_kwarg(model) -> str:
    """``generate()``'s keyword for a KV cache: "cache" from transformers 5.24, else
    "past_key_values" (the rename reached the causal LMs' forward and generate together)."""
    from .model import cache_kwarg_name

    return cache_kwarg_name(getattr(model, "language_model", None) or model)


def add_kv_cache_arguments(parser) -> None:
    """The KV-cache flags every subcommand takes: ``--kv-cache`` and the quantized cache's
    ``--kv-window``, ``--kv-group-size``, ``--kv-key-quant`` (read back with ``kv_cache_options``)."""
    group = parser.add_argument_group("KV cache")
    group.add_argument("--kv-cache", default="bf16", choices=KV_CACHE_KINDS,
                       help="KV-cache format: bf16 (transformers' cache, answers unchanged), "
                            "int8 or int4 (quantized, less memory)")
    group.add_argument("--kv-window", type=int, default=None, metavar="N",
                       help="int8/int4: most recent tokens kept in full precision (default 128)")
    group.add_argument("--kv-group-size", type=int, default=None, metavar="N",
                       help="int8/int4: channels per scale group, a power of two (default 64)")
    group.add_argument("--kv-key-quant", default=None, choices=("token", "channel"),
                       help="int8/int4: key scales per token group or per channel (KIVI) "
                            "(default token)")


_KV_FLAGS = {"window": "--kv-window", "group_size": "--kv-group-size", "key_quant": "--kv-key-quant"}


def kv_cache_options(args) -> dict:
    """The QuantizedKVCache options given on the command line (``add_kv_cache_arguments``),
    checked against ``--kv-cache``: a ``cli.UsageError`` (exit code 2) naming the flags when they
    do not fit."""
    from .cli import UsageError
    from .patching import check_kv_cache_options

    options = {key: getattr(args, flag[2:].replace("-", "_"), None)
               for key, flag in _KV_FLAGS.items()}
    options = {k: v for k, v in options.items() if v is not None}
    if options and args.kv_cache == "bf16":
        raise UsageError(f"{', '.join(_KV_FLAGS[k] for k in options)}: only with --kv-cache int8 "
                         "or int4")
    try:
        return check_kv_cache_options(args.kv_cache, options)
    except ValueError as exc:
        raise UsageError(f"bad KV-cache flags ({', '.join(_KV_FLAGS[k] for k in options)}): "
                         f"{exc}") from exc


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

    def add(self, name: str, seconds: float):
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.counts[name] = self.counts.get(name, 0) + 1

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
                 rest="vision"):
        self.model, self.timer = model, timer
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
        lm = getattr(m, "language_model", None)
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
        self.timer.add("prefill" if self.lm_calls == 0 else "generate", dt)
        self.lm_calls += 1

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if "get_video_features" in vars(self.model):
            del self.model.get_video_features
        return False


@dataclasses.dataclass
class PipelineOutput:
    """Answers of one pipeline run.

    texts: one answer per video; sequences: (B, new_tokens) generated token ids (left padding
    removed, right side padded with pad_token_id after EOS); timings: see ``VideoPipeline.timings``.
    """

    texts: list[str]
    sequences: torch.Tensor
    timings: dict


class VideoPipeline:
    """Answer questions about videos with a PLLaVA-style model.

    Args:
        model: a ``PllavaForConditionalGeneration`` (or a model with the same interface), already
            on ``device``.
        tokenizer: its tokenizer (``pllava_fast.conversation.load_tokenizer``).
        num_frames: frames sampled per video (default: the model's ``config.num_frames``).
        pooling_shape: (t, h, w) visual tokens per video (default: the model's).
        template: conversation template name for ``pllava_fast.conversation.build_prompt``.
        kv_cache: "bf16" (transformers' DynamicCache, answers unchanged), "int8" or "int4"
            (``pllava_fast.kv_cache.make_cache``).
        kv_cache_options: options of the int8/int4 cache (``window``, ``group_size``, ``block``,
            ``key_quant``), passed to ``make_cache``; checked here (ValueError).
        image_size: frame side of the model input (default: the vision tower's image size).
        attention: LLM attention backend installed with ``pllava_fast.patch`` ("auto": flash-attn
            when usable on CUDA, else SDPA; None leaves the model's). The quantized caches need
            pllava-fast attention, so None with "int8"/"int4" installs "auto".
    """

    def __init__(self, model, tokenizer, *, num_frames: int | None = None,
                 template: str | None = None, kv_cache: str = "bf16",
                 image_size: int | None = None, system: str | None = None,
                 attention: str | None = "auto", pooling_shape: Sequence[int] | None = None,
                 kv_cache_options: dict | None = None):
        from .patching import check_kv_cache_options

        kv_cache_options = check_kv_cache_options(kv_cache, kv_cache_options, model.config)
        if attention is None and kv_cache != "bf16":
            attention = "auto"
        if attention is not None or pooling_shape is not None or num_frames is not None:
            from .patching import patch

            # the pipeline makes its cache per call, so the patch keeps generate() as it is
            patch(model, attention=attention, pooling_shape=pooling_shape, num_frames=num_frames)
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = model.config
        self.num_frames = int(config.num_frames)
        self.template = template
        self.system = system
        self.kv_cache = kv_cache
        self.kv_cache_options = kv_cache_options
        self.image_size = int(image_size or config.vision_config.image_size)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.timings: dict = {}
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    @classmethod
    def from_pretrained(cls, model_dir, *, device="cpu", dtype="auto", kv_cache="bf16",
                        attn_implementation: str | None = None, device_map=None,
                        max_memory=None, kv_cache_options: dict | None = None,
                        **kwargs) -> "VideoPipeline":
        """Load ``model_dir`` (PLLaVA checkpoint layout + tokenizer) onto ``device``.

        ``device_map`` ("auto", "balanced", "sequential" or a {module name: device} dict) splits the
        model over several devices with accelerate instead (e.g. the 34B model over GPUs);
        ``max_memory`` ({device: "40GiB"}) bounds each device for the automatic maps. Both go to
        ``PllavaForConditionalGeneration.from_pretrained`` (``pllava_fast.model.dispatch_model``).
        """
        from .conversation import load_tokenizer
        from .model import PllavaForConditionalGeneration
        from .patching import check_kv_cache_options

        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        check_kv_cache_options(kv_cache, kv_cache_options)  # before the weights are read
        device = torch.device(device)
        if device_map is not None and device.type == "cpu" and torch.cuda.is_available():
            device = torch.device("cuda")  # the dtype of a split model follows its GPUs
        load_kwargs = {"torch_dtype": resolve_dtype(dtype, device), "max_memory": max_memory}
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        else:
            load_kwargs["device"] = device
        if attn_implementation:
            load_kwargs["attn_implementation"] = attn_implementation
        # the pipeline builds its cache per call, so the model is loaded with the bf16 default
        model = PllavaForConditionalGeneration.from_pretrained(model_dir, **load_kwargs)
        return cls(model, load_tokenizer(model_dir), kv_cache=kv_cache,
                   kv_cache_options=kv_cache_options, **kwargs)

    # -- stages --------------------------------------------------------------------------------
    def decode(self, sources: Sequence, *, start=None, end=None, timer: StageTimer | None = None):
        """Sample and decode ``num_frames`` frames of each source -> list of DecodedVideo.

        ``sources`` may also hold already decoded videos, which pass through unchanged. Several
        files decode concurrently (``read_videos``' background threads; FFmpeg releases the GIL).
        """
        from .video import DecodedVideo, read_videos

        timer = timer or StageTimer(self.device)
        with timer.stage("decode"):
            paths = [os.fspath(s) for s in sources if not isinstance(s, DecodedVideo)]
            ahead = max(0, min(len(paths) - 1, 3))
            decoded = iter(read_videos(paths, self.num_frames, prefetch=ahead, start=start,
                                       end=end))
            return [s if isinstance(s, DecodedVideo) else next(decoded) for s in sources]

    def preprocess(self, videos, *, timer: StageTimer | None = None) -> tuple[torch.Tensor, list[int]]:
        """Decoded videos -> (pixel_values (sum T, 3, S, S) on the model's device, frames per video)."""
        from .preprocess import frames_to_pixel_values

        timer = timer or StageTimer(self.device)
        with timer.stage("preprocess"):
            pixel_values = frames_to_pixel_values(
                list(videos), device=self.device, dtype=self.dtype, image_size=self.image_size)
        return pixel_values, [len(v) for v in videos]

    def prompts(self, questions: Sequence[str]) -> list[str]:
        from .conversation import build_prompt

        kwargs = {}
        if self.template is not None:
            kwargs["template"] = self.template
        if self.system is not None:
            kwargs["system"] = self.system
        return [build_prompt(q, **kwargs) for q in questions]

    def tokenize(self, prompts: Sequence[str]) -> dict:
        """Left-padded input_ids / attention_mask with exactly one image token per prompt."""
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=True)
        finally:
            tok.padding_side = side
        image_token = self.model.config.image_token_index
        per_row = (enc["input_ids"] == image_token).sum(dim=1)
        if not bool((per_row == 1).all()):
            raise ValueError(
                f"every prompt needs exactly one image token (id {image_token}); got counts "
                f"{per_row.tolist()} (prompts: {list(prompts)!r})")
        return {"input_ids": enc["input_ids"].to(self.device),
                "attention_mask": enc["attention_mask"].to(self.device)}

    def make_cache(self):
        """The KV cache for one ``generate`` call, or None for transformers' default (bf16)."""
        if self.kv_cache == "bf16":
            return None
        from .kv_cache import make_cache

        return make_cache(self.kv_cache, config=self.model.config, **self.kv_cache_options)

    # -- whole runs ----------------------------------------------------------------------------
    def prepare(self, videos, questions, *, start=None, end=None,
                timer: StageTimer | None = None) -> dict:
        """Videos (paths or DecodedVideo) + questions -> the keyword arguments of ``generate``."""
        videos = list(videos)
        if isinstance(questions, str):
            questions = [questions] * len(videos)
        questions = list(questions)
        if len(questions) != len(videos):
            raise ValueError(f"got {len(videos)} videos but {len(questions)} questions")
        if not videos:
            raise ValueError("no videos given")
        timer = timer or StageTimer(self.device)
        decoded = self.decode(videos, start=start, end=end, timer=timer)
        pixel_values, frames = self.preprocess(decoded, timer=timer)
        return self.build_inputs(pixel_values, frames, questions)

    def build_inputs(self, pixel_values: torch.Tensor, frames_per_video: Sequence[int],
                     questions: Sequence[str]) -> dict:
        """Preprocessed frames (sum T, 3, S, S) + questions -> the keyword arguments of ``generate``."""
        if sum(frames_per_video) != pixel_values.shape[0]:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} frames but frames_per_video "
                             f"{list(frames_per_video)} sums to {sum(frames_per_video)}")
        inputs = self.tokenize(self.prompts(questions))
        inputs["pixel_values"] = pixel_values.to(self.device, self.dtype, non_blocking=True)
        if any(f != self.num_frames for f in frames_per_video):
            inputs["frames_per_video"] = list(frames_per_video)
        return inputs

    def generate(self, inputs: dict, *, max_new_tokens: int = 64, streamer=None,
                 timer: StageTimer | None = None, **generate_kwargs) -> PipelineOutput:
        """Run ``model.generate`` on prepared inputs; returns answers, new token ids and timings."""
        timer = timer or StageTimer(self.device)
        batch, prompt_len = inputs["input_ids"].shape
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False,
                  "pad_token_id": self.tokenizer.pad_token_id}
        kwargs.update(generate_kwargs)
        if kwargs.get("do_sample") is False:
            # greedy: drop sampling knobs a checkpoint's generation_config may carry
            kwargs.setdefault("temperature", None)
            kwargs.setdefault("top_p", None)
            kwargs.setdefault("top_k", None)
        if "past_key_values" not in kwargs and "cache" not in kwargs:
            cache = self.make_cache()
            if cache is not None:
                kwargs[generate_cache_kwarg(self.model)] = cache
        with torch.inference_mode(), _ModelProbe(self.model, timer), timer.stage("model"):
            out = self.model.generate(**inputs, streamer=streamer, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        # generate() returns the prompt followed by the new tokens; keep the new ones
        new = sequences[:, prompt_len:] if sequences.shape[1] > prompt_len else sequences
        texts = [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        self.timings = self._summarise(timer, batch, new)
        return PipelineOutput(texts=texts, sequences=new.cpu(), timings=self.timings)

    def __call__(self, videos, questions, *, start=None, end=None, max_new_tokens: int = 64,
                 streamer=None, **generate_kwargs) -> PipelineOutput:
        """Answer ``questions`` (one string for all, or one per video) about ``videos``."""
        if isinstance(videos, (str, os.PathLike)) or not isinstance(videos, Iterable):
            videos = [videos]
        timer = StageTimer(self.device)
        inputs = self.prepare(videos, questions, start=start, end=end, timer=timer)
        return self.generate(inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                             timer=timer, **generate_kwargs)

    def answer(self, video, question: str, **kwargs) -> str:
        """The answer to one question about one video."""
        return self([video], [question], **kwargs).texts[0]

    def stream(self, video, question: str, *, max_new_tokens: int = 64,
               **kwargs) -> Iterator[str]:
        """Yield the answer's text piece by piece as tokens are generated (batch of one)."""
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        error = []

        def work():
            try:
                self([video], [question], max_new_tokens=max_new_tokens, streamer=streamer,
                     **kwargs)
            except BaseException as exc:  # surfaced in the consumer thread below
                error.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if error:
            raise error[0]

    # -- helpers -------------------------------------------------------------------------------
    def _summarise(self, timer: StageTimer, batch: int, new_tokens: torch.Tensor) -> dict:
        s = dict(timer.seconds)
        steps = timer.counts.get("generate", 0)
        out = {f"{k}_s": s.get(k, 0.0) for k in STAGES}
        out["batch_size"] = batch
        out["new_tokens"] = int(new_tokens.shape[1])
        out["decode_steps"] = steps
        out["decode_tokens_per_s"] = steps / s["generate"] if s.get("generate") else None
        # time to first token: everything up to the end of the prefill (which yields token 1)
        out["ttft_s"] = sum(s.get(k, 0.0) for k in ("decode", "preprocess", "vision",
                                                     "projector", "prefill"))
        out["total_s"] = s.get("decode", 0.0) + s.get("preprocess", 0.0) + s.get("model", 0.0)
        if self.device.type == "cuda":
            out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out


def format_timings(timings: dict) -> str:
    """A small aligned table of per-stage times (ms) and decode speed."""
    rows = [(name, timings.get(f"{name}_s")) for name in STAGES]
    lines = [f"{'stage':<12}{'ms':>10}"]
    for name, sec in rows:
        if sec is not None:
            label = "decode LLM" if name == "generate" else name
            lines.append(f"{label:<12}{sec * 1e3:>10.1f}")
    lines.append(f"{'TTFT':<12}{timings.get('ttft_s', 0.0) * 1e3:>10.1f}")
    lines.append(f"{'total':<12}{timings.get('total_s', 0.0) * 1e3:>10.1f}")
    tps = timings.get("decode_tokens_per_s")
    if tps:
        lines.append(f"decode: {timings['decode_steps']} steps, {tps:.1f} tokens/s per sequence "
                     f"(batch {timings['batch_size']})")
    return "\n".join(lines)
