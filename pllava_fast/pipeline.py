"""Video question answering end to end: video_decode -> preprocess -> prompt -> generate.

``VideoPipeline`` ties the stages together for one model: it samples and decodes the frames
(``pllava_fast.video``), turns them into model input (``pllava_fast.preprocess``), builds the
prompt (``pllava_fast.conversation``) and calls ``model.generate`` on a left-padded batch, with an
optional quantized KV cache and streaming. Every run records per-stage wall times
(``pllava_fast.timing``), synchronised with the device so GPU work is charged to the stage that
launched it.
"""
from __future__ import annotations

import dataclasses
import os
import threading
from typing import Iterable, Iterator, Sequence

import torch

from .attention import ATTENTION_CHOICES
from .checks import int_tuple, one_of, positive_int, time_span
from .compat import generate_cache_kwarg
from .conversation import build_prompt, get_template, load_tokenizer
from .devices import check_device, resolve_dtype
from .kv_cache import make_cache
from .kv_spec import KVCacheSpec
from .llm_decode import CompiledDecoder
from .model import PllavaForConditionalGeneration
from .patching import patch
from .preprocess import frames_to_pixel_values
from .timing import StageTimer, _ModelProbe, summarise
from .video.frames import DecodedVideo
from .video.read import read_videos

__all__ = ["PipelineOutput", "VideoPipeline"]


@dataclasses.dataclass
class PipelineOutput:
    """Answers of one pipeline run.

    texts: one answer per video; sequences: (B, new_tokens) generated token ids (left padding
    removed, right side padded with pad_token_id after EOS); timings: see ``VideoPipeline.timings``.
    """

    texts: list[str]
    sequences: torch.Tensor
    timings: dict


_OPTIONS = ("num_frames", "template", "image_size", "system", "attention", "pooling_shape",
            "compile")
# what one video can be (anything else iterable is several videos)
_VIDEO_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, DecodedVideo)


def _check_options(spec: KVCacheSpec, *, template=None, system=None, image_size=None,
                   num_frames=None, pooling_shape=None, compile=False, attention="auto",
                   **unknown) -> None:
    """ValueError naming the first VideoPipeline option that cannot work (checked before a
    checkpoint loads; ``patch`` checks the model-facing ones again when it applies them)."""
    if unknown:
        raise ValueError(f"unknown VideoPipeline option(s) {sorted(unknown)}; expected some of "
                         f"{_OPTIONS}")
    one_of("attention", attention, ATTENTION_CHOICES)
    if template is not None:
        get_template(template)  # an unknown name fails here, not at the first question
    if system is not None and not isinstance(system, str):
        raise ValueError(f"system must be a str, got {type(system).__name__}")
    if image_size is not None:
        positive_int("image_size", image_size)
    if num_frames is not None:
        positive_int("num_frames", num_frames)
    if pooling_shape is not None:
        int_tuple("pooling_shape", pooling_shape, 3)
    spec.check_compile(compile)


class VideoPipeline:
    """Answer questions about videos with a PLLaVA-style model.

    Args:
        model: a ``PllavaForConditionalGeneration`` (or a model with the same interface), already
            on ``device``.
        tokenizer: its tokenizer (``pllava_fast.conversation.load_tokenizer``).
        num_frames: frames sampled per video (default: the model's ``config.num_frames``).
        pooling_shape: (t, h, w) visual tokens per video (default: the model's).
        template: conversation template name for ``pllava_fast.conversation.build_prompt``.
        kv_cache: a ``KVCacheSpec`` or its kind: "model-dtype" (transformers' DynamicCache,
            answers unchanged), "int8", "int4" or "fp8".
        kv_cache_options: options of the quantized caches (``window``, ``group_size``,
            ``block``, ``key_quant``); checked here (ValueError).
        image_size: frame side of the model input (default: the vision tower's image size).
        attention: LLM attention backend installed with ``pllava_fast.patch`` ("auto": flash-attn
            when usable on CUDA, else SDPA; None leaves the model's). The quantized caches need
            pllava-fast attention, so None with a quantized kind installs "auto".
        compile: decode greedily with a static cache of the ``kv_cache`` kind and a compiled
            step (``pllava_fast.llm_decode``); the timings then add ``compile_s``, the first
            compilation of a new (batch, length bucket), which later runs reuse.
    """

    def __init__(self, model, tokenizer, *, num_frames: int | None = None,
                 template: str | None = None, kv_cache="model-dtype",
                 image_size: int | None = None, system: str | None = None,
                 attention: str | None = "auto", pooling_shape: Sequence[int] | None = None,
                 kv_cache_options: dict | None = None, compile: bool = False):
        self.kv_cache_spec = KVCacheSpec.of(kv_cache, kv_cache_options)
        _check_options(self.kv_cache_spec, template=template, system=system,
                       image_size=image_size, num_frames=num_frames, pooling_shape=pooling_shape,
                       compile=compile, attention=attention)
        self.compile = compile
        if attention is None and (self.kv_cache_spec.quantized or compile):
            attention = "auto"  # the quantized caches and the compiled loop need ours
        # the pipeline's own compiled loop (the model object itself is left as it is)
        self.decoder = CompiledDecoder(model, self.kv_cache_spec) if compile else None
        if attention is not None or pooling_shape is not None or num_frames is not None:
            # the pipeline makes its cache per call: the model's own settings stay as they are
            patch(model, attention=attention, pooling_shape=pooling_shape, num_frames=num_frames,
                  kv_cache=getattr(model, "kv_cache_spec", "model-dtype"),
                  compile=getattr(model, "compile_decode", False))
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = model.config
        self.num_frames = int(config.num_frames)
        self.template = template
        self.system = system
        self.image_size = int(image_size or config.vision_config.image_size)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.timings: dict = {}
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    @classmethod
    def from_pretrained(cls, model_dir, *, device="cpu", dtype="auto", kv_cache="model-dtype",
                        attn_implementation: str | None = None, device_map=None,
                        max_memory=None, kv_cache_options: dict | None = None,
                        weights=None, weight_options: dict | None = None,
                        **kwargs) -> "VideoPipeline":
        """Load ``model_dir`` (PLLaVA checkpoint layout + tokenizer) onto ``device``.

        ``weights`` / ``weight_options``: weight-only int8 / int4 LLM (``weight_quant``), as
        ``PllavaForConditionalGeneration.from_pretrained`` takes them.

        ``device_map`` ("auto", "balanced", "sequential" or a {module name: device} dict) splits the
        model over several devices with accelerate instead (e.g. the 34B model over GPUs);
        ``max_memory`` ({device: "40GiB"}) bounds each device for the automatic maps. Both go to
        ``PllavaForConditionalGeneration.from_pretrained`` (``pllava_fast.loading.dispatch_model``).
        """
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        # every argument before the weights are read: a typo fails in a moment, not after a load
        spec = KVCacheSpec.of(kv_cache, kv_cache_options)
        _check_options(spec, **kwargs)
        device = check_device(device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {str(device)!r}")
        if device_map is not None and device.type == "cpu" and torch.cuda.is_available():
            device = torch.device("cuda")  # the dtype of a split model follows its GPUs
        resolve_dtype(dtype, device)  # checked now; the model resolves it (weights: bf16 on CPU)
        load_kwargs = {"torch_dtype": dtype, "max_memory": max_memory, "weights": weights,
                       "weight_options": weight_options}
        if device_map is not None:
            load_kwargs["device_map"] = device_map
        else:
            load_kwargs["device"] = device
        if attn_implementation:
            load_kwargs["attn_implementation"] = attn_implementation
        # the pipeline builds its cache per call, so the model keeps the model-dtype default
        model = PllavaForConditionalGeneration.from_pretrained(model_dir, **load_kwargs)
        return cls(model, load_tokenizer(model_dir), kv_cache=spec, **kwargs)

    # -- stages --------------------------------------------------------------------------------
    def video_decode(self, sources: Sequence, *, start=None, end=None,
                     timer: StageTimer | None = None):
        """Sample and decode ``num_frames`` frames of each source -> list of DecodedVideo.

        ``sources`` may also hold already decoded videos, which pass through unchanged. Several
        files decode concurrently (``read_videos``' background threads; FFmpeg releases the GIL).
        """
        for i, s in enumerate(sources):
            if not isinstance(s, _VIDEO_TYPES):
                raise ValueError(f"videos[{i}] must be a path, bytes or a DecodedVideo, got "
                                 f"{type(s).__name__}")
        timer = timer or StageTimer(self.device)
        with timer.stage("video_decode"):
            # bytes stay data (read_video opens them in memory); only path-likes become paths
            paths = [os.fspath(s) if isinstance(s, os.PathLike) else s for s in sources
                     if not isinstance(s, DecodedVideo)]
            ahead = max(0, min(len(paths) - 1, 3))
            decoded = iter(read_videos(paths, self.num_frames, prefetch=ahead, start=start,
                                       end=end))
            return [s if isinstance(s, DecodedVideo) else next(decoded) for s in sources]

    def preprocess(self, videos, *, timer: StageTimer | None = None) -> tuple[torch.Tensor, list[int]]:
        """Decoded videos -> (pixel_values (sum T, 3, S, S) on the model's device, frames per video)."""
        timer = timer or StageTimer(self.device)
        with timer.stage("preprocess"):
            pixel_values = frames_to_pixel_values(
                list(videos), device=self.device, dtype=self.dtype, image_size=self.image_size)
        return pixel_values, [len(v) for v in videos]

    def prompts(self, questions: Sequence[str]) -> list[str]:
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

    def check_context(self, questions: Sequence[str], max_new_tokens: int) -> None:
        """ValueError when ``questions`` (in this pipeline's template) with their visual tokens
        and ``max_new_tokens`` would not fit the LM's positions; nothing runs."""
        max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
        prompt_len = self.tokenize(self.prompts(questions))["input_ids"].shape[1]
        self._check_context(prompt_len, max_new_tokens)

    def _check_context(self, prompt_len: int, max_new_tokens: int) -> None:
        """ValueError before any work when the prompt, its visual tokens and the new tokens do
        not fit the LM's positions (one image token per row expands to the pooled tokens)."""
        limit = getattr(self.model.config.text_config, "max_position_embeddings", None)
        visual = self.model.multi_modal_projector.num_visual_tokens
        total = prompt_len - 1 + visual + max_new_tokens
        if limit is not None and total > limit:
            raise ValueError(f"the prompt does not fit the model's context: {prompt_len - 1} "
                             f"prompt + {visual} visual + {max_new_tokens} new tokens = {total} > "
                             f"max_position_embeddings {limit}")

    def make_cache(self):
        """The KV cache for one ``generate`` call, or None for transformers' default."""
        if not self.kv_cache_spec.quantized:
            return None
        return make_cache(self.kv_cache_spec, self.model.config)

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
        for i, q in enumerate(questions):
            if not isinstance(q, str):
                raise ValueError(f"questions[{i}] must be a str, got {type(q).__name__}")
        start, end = time_span(start, end)
        timer = timer or StageTimer(self.device)
        decoded = self.video_decode(videos, start=start, end=end, timer=timer)
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
        # 2.5 or True must not reach generate() as a token budget
        max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
        batch, prompt_len = inputs["input_ids"].shape
        self._check_context(prompt_len, max_new_tokens)
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False,
                  "pad_token_id": self.tokenizer.pad_token_id}
        kwargs.update(generate_kwargs)
        if kwargs.get("do_sample") is False:
            # greedy: drop sampling knobs a checkpoint's generation_config may carry
            kwargs.setdefault("temperature", None)
            kwargs.setdefault("top_p", None)
            kwargs.setdefault("top_k", None)
        if "past_key_values" not in kwargs and "cache" not in kwargs and not self.compile:
            cache = self.make_cache()
            if cache is not None:
                kwargs[generate_cache_kwarg(self.model)] = cache
        probe = _ModelProbe(self.model, timer, lm=not self.compile)
        generate = self.decoder if self.compile else self.model.generate
        with torch.inference_mode(), probe, timer.stage("model"):
            out = generate(**inputs, streamer=streamer, **kwargs)
        if self.compile:
            stats = self.decoder.stats
            timer.add("prefill", stats["prefill_s"])
            timer.add("llm_decode", stats["llm_decode_s"], count=stats["steps"])
        sequences = out.sequences if hasattr(out, "sequences") else out
        # generate() returns the prompt followed by the new tokens; keep the new ones
        new = sequences[:, prompt_len:] if sequences.shape[1] > prompt_len else sequences
        texts = [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        self.timings = summarise(timer, batch, new.shape[1])
        if self.compile:
            self.timings["compile_s"] = self.decoder.stats["compile_s"]
        return PipelineOutput(texts=texts, sequences=new.cpu(), timings=self.timings)

    def __call__(self, videos, questions, *, start=None, end=None, max_new_tokens: int = 64,
                 streamer=None, **generate_kwargs) -> PipelineOutput:
        """Answer ``questions`` (one string for all, or one per video) about ``videos``."""
        if isinstance(videos, _VIDEO_TYPES) or not isinstance(videos, Iterable):
            videos = [videos]  # one video
        max_new_tokens = positive_int("max_new_tokens", max_new_tokens)  # before any decoding
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

