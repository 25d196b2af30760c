"""What every subcommand shares: exit codes, the flags declared once, and how errors print.

Exit codes (the same for every command):

* 0 success;
* 1 some inputs failed (their rows say why) while the others were done;
* 2 bad arguments or inputs, found before any model loads (``UsageError``);
* 3 the run itself failed (model load, out of memory, ...);
* 130 interrupted (SIGINT / Ctrl-C).

An error prints one line ``error: ...`` on stderr naming the file, frame, argument or shape; the
traceback follows only with ``--debug`` or ``PLLAVA_FAST_DEBUG=1``.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import traceback
import warnings

from ..devices import DTYPE_CHOICES
from ..kv_spec import CACHE_KINDS, KEY_QUANT, KVCacheSpec
from ..weight_spec import GROUP_SIZES, WEIGHT_KINDS, WeightSpec
from ..shapes import TINY_DEFAULTS, TINY_MAX_POSITIONS

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_RUN_FAILED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UsageError(ValueError):
    """Arguments or inputs that cannot work: exit code 2, one line, no traceback."""


def debug_enabled(args=None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("PLLAVA_FAST_DEBUG", "") not in ("", "0")


def one_line(exc: BaseException) -> str:
    """An exception as one line: its message with line breaks folded (e.g. a checkpoint's list
    of missing keys), or its type when it has no message."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror:  # not "[Errno 28] ...": the file, then why
        text = exc.strerror if exc.filename is None else f"{exc.filename}: {exc.strerror}"
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return text or type(exc).__name__


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


# notices that say nothing about the user's run (shown with --debug): torchao's CUDA-only .so
# files on a CPU build, torch's pytree deprecation notes about torchao's enums, and the AOT
# autograd cache's hint about torchao's tensor subclasses
_QUIET_LOGGERS = ("torchao", "torch.utils._pytree")
_QUIET_WARNINGS = (".*_stable_hash_for_caching",)


def quiet_libraries() -> None:
    """Keep third-party import-time notices to errors (``--debug`` keeps them)."""
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def run_command(module, args) -> int:
    """``module.check(args)`` (cheap checks: any ValueError / OSError is a usage error), then
    ``module.run(args)``; exceptions become the documented exit codes and one line."""
    debug = debug_enabled(args)
    if not debug:
        quiet_libraries()
    stage = "check"
    try:
        check = getattr(module, "check", None)
        if check is not None:
            try:
                check(args)
            except (ValueError, OSError) as exc:
                raise UsageError(one_line(exc)) from exc
        stage = "run"
        return int(module.run(args) or 0)
    except UsageError as exc:
        _report(exc, debug)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `pllava-fast caption ... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return EXIT_OK
    except MemoryError as exc:
        _report(exc, debug, prefix="out of memory: ")
        return EXIT_RUN_FAILED
    except Exception as exc:  # the one place that turns a failure into one line
        _report(exc, debug, prefix="" if stage == "run" else "while checking: ")
        return EXIT_RUN_FAILED


def _report(exc: BaseException, debug: bool, prefix: str = "") -> None:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    error(prefix + one_line(exc))


# -- flags declared once ---------------------------------------------------------------------------
def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error (also PLLAVA_FAST_DEBUG=1)")


def add_model_argument(parser, *, required: bool, help_text: str | None = None) -> None:
    parser.add_argument("--model", metavar="DIR", required=required,
                        help=help_text or "PLLaVA checkpoint directory")


def add_device_arguments(parser) -> None:
    parser.add_argument("--device", default=None,
                        help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, metavar="DTYPE",
                        help="auto (bf16 on CUDA, fp32 on CPU) | checkpoint | bf16 | fp16 | fp32")


def add_runtime_arguments(parser, json_help: str, weights: bool = True) -> None:
    """What every model-running command takes last: the KV-cache and speed flags, --device /
    --dtype and --json."""
    add_kv_cache_arguments(parser)
    add_speed_arguments(parser, weights=weights)
    add_device_arguments(parser)
    parser.add_argument("--json", action="store_true", help=json_help)


def add_num_frames_argument(parser) -> None:
    parser.add_argument("--num-frames", type=int, default=None, metavar="N",
                        help="frames sampled per video (default: the model's num_frames)")


def add_max_new_tokens_argument(parser, default: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=default, metavar="N",
                        help=f"tokens to generate at most (default {default})")


def add_kv_cache_arguments(parser) -> None:
    """``--kv-cache`` and the quantized cache's ``--kv-window``, ``--kv-group-size``,
    ``--kv-key-quant`` (read back with ``kv_cache_spec``)."""
    group = parser.add_argument_group("KV cache")
    group.add_argument("--kv-cache", default="model-dtype", choices=CACHE_KINDS,
                       help="KV-cache format: model-dtype (transformers' cache in the model's "
                            "dtype, answers unchanged), int8, int4 or fp8 (e4m3) (quantized, less "
                            "memory)")
    group.add_argument("--kv-window", type=int, default=None, metavar="N",
                       help="quantized kinds: most recent tokens kept in full precision "
                            "(default 128)")
    group.add_argument("--kv-group-size", type=int, default=None, metavar="N",
                       help="quantized kinds: channels per scale group, a power of two "
                            "(default 64)")
    group.add_argument("--kv-key-quant", default=None, choices=KEY_QUANT,
                       help="int8/int4: key scales per token group or per channel (KIVI) "
                            "(default token)")


_KV_FLAGS = {"window": "--kv-window", "group_size": "--kv-group-size", "key_quant": "--kv-key-quant"}


def kv_cache_spec(args) -> KVCacheSpec:
    """The ``KVCacheSpec`` of the ``--kv-*`` flags; a UsageError naming the flags when they do
    not fit together."""
    options = {key: getattr(args, flag[2:].replace("-", "_"), None)
               for key, flag in _KV_FLAGS.items()}
    options = {k: v for k, v in options.items() if v is not None}
    named = ", ".join(_KV_FLAGS[k] for k in options)
    if options and args.kv_cache == "model-dtype":
        raise UsageError(f"{named}: only with a quantized --kv-cache (int8, int4 or fp8)")
    try:
        return KVCacheSpec.of(args.kv_cache, options)
    except ValueError as exc:
        raise UsageError(f"bad KV-cache flags ({named}): {exc}") from None


def add_speed_arguments(parser, weights: bool = True) -> None:
    """``--compile`` and (``weights``) ``--weights`` / ``--weight-group-size`` (read back with
    ``runtime_options``)."""
    group = parser.add_argument_group("speed")
    group.add_argument("--compile", action="store_true",
                       help="greedy decode with a static KV cache and a compiled step "
                            "(torch.compile, CUDA graphs on GPU): the same tokens; the first "
                            "answer pays the compilation (about a minute)")
    if not weights:
        return
    group.add_argument("--weights", default=None, choices=WEIGHT_KINDS,
                       help="weight-only int8 / int4 LLM linears through torchao "
                            "(pllava-fast[quant]); default: the checkpoint's weights as stored")
    group.add_argument("--weight-group-size", type=int, default=None, metavar="N",
                       help=f"--weights int4: channels per scale, one of {GROUP_SIZES} "
                            "(default 128)")


def runtime_options(args) -> dict:
    """``VideoPipeline.from_pretrained`` keywords of the KV-cache and speed flags (call after
    ``kv_cache_spec``); a UsageError naming the flags that do not fit together."""
    options = {}
    if getattr(args, "weight_group_size", None) is not None:
        if args.weights is None:
            raise UsageError("--weight-group-size: only with --weights int4 (or int8)")
        options["group_size"] = args.weight_group_size
    try:
        weights = WeightSpec.of(getattr(args, "weights", None), options)
    except ValueError as exc:
        raise UsageError(f"--weight-group-size: {exc}") from None
    if args.compile and args.kv_spec.key_quant == "channel":
        raise UsageError("--compile needs per-token key scales: not with --kv-key-quant channel")
    return dict(kv_cache=args.kv_spec, compile=args.compile, weights=weights)


def check_weights_runnable(args) -> None:
    """``--weights`` tried on one small layer on ``args.device`` (imports torch and torchao:
    after ``device_of``), so a missing torchao or a layout the device lacks is one line before
    any weights load."""
    spec = args.runtime["weights"]
    if spec is None:
        return
    import torch

    from ..devices import resolve_dtype
    from ..weight_quant import check_weights

    # as the model resolves it: auto (and checkpoint, for this trial) is bf16 with --weights
    dtype = (torch.bfloat16 if args.dtype in ("auto", "checkpoint") else
             resolve_dtype(args.dtype, args.device))
    try:
        check_weights(spec, args.device, dtype)
    except (ImportError, ValueError) as exc:
        raise UsageError(f"--weights {spec.kind}: {one_line(exc)}") from None


# -- checks shared by the commands (cheap: no model, torch only for the device) -----------------
def positive(name: str, value, minimum: int = 1, maximum: int | None = None):
    """A UsageError unless the int flag ``name`` is in [``minimum``, ``maximum``] (None passes)."""
    if value is not None and value < minimum:
        raise UsageError(f"{name} must be >= {minimum}, got {value}")
    if value is not None and maximum is not None and value > maximum:
        raise UsageError(f"{name} must be <= {maximum}, got {value}")
    return value


def finite_times(start, end) -> None:
    """--start / --end: finite seconds >= 0, start before end (argparse's float takes 'nan')."""
    for name, t in (("--start", start), ("--end", end)):
        if t is not None and not (math.isfinite(t) and t >= 0):
            raise UsageError(f"{name} must be a finite time >= 0 seconds, got {t}")
    if start is not None and end is not None and end <= start:
        raise UsageError(f"--end ({end} s) must be after --start ({start} s)")


def start_within(header, start) -> None:
    """--start past the end of a video whose header gives its duration: a UsageError naming it."""
    if start is not None and header.duration is not None and start >= header.duration:
        raise UsageError(f"--start {start:g} s is past the end of {header.path} "
                         f"({header.duration:.3f} s long)")


def parse_pooling(spec):
    """--pooling T,H,W (or TxHxW) -> a tuple of three positive ints, or None."""
    if spec is None:
        return None
    parts = str(spec).replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) <= 0:
        raise UsageError(f"--pooling must be three positive ints T,H,W (e.g. 16,12,12), got {spec!r}")
    return shape


def check_prompt(name: str, text: str, template: str = "plain") -> str:
    """The whole prompt ``text`` becomes (``conversation.build_prompt``), for counting its tokens:
    a UsageError when ``text`` is not UTF-8 or the prompt would not hold exactly one video token
    (a question may place ``<image>`` itself, once)."""
    from ..conversation import IMAGE_TOKEN, build_prompt
    from ..preflight import utf8

    utf8(name, text)
    prompt = build_prompt(text, template=template)
    if prompt.count(IMAGE_TOKEN) != 1:
        raise UsageError(f"{name} holds {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} tokens: the prompt "
                         f"needs exactly one (the template adds it when the text has none)")
    return prompt


def device_of(args, local_rank: int | None = None) -> str:
    """--device checked against this machine (imports torch: call it after the cheap checks).
    Without --device: cuda when available (``cuda:<local_rank % GPUs>`` under torchrun), else cpu."""
    from ..devices import check_device, default_device

    device = args.device or default_device()
    if args.device is None and device == "cuda" and local_rank is not None:
        import torch

        device = f"cuda:{local_rank % torch.cuda.device_count()}"
    try:
        checked = check_device(device)
    except ValueError as exc:
        raise UsageError(f"--device: {exc}") from None
    if checked.type not in ("cpu", "cuda"):  # "meta" holds no data: nothing could run there
        raise UsageError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    return str(checked)


# the tiny random model's sizes as preflight.CheckpointInfo names them (shapes.TINY_DEFAULTS)
TINY = dict(num_frames=TINY_DEFAULTS["num_frames"], pooling_shape=TINY_DEFAULTS["pooling_shape"],
            image_size=TINY_DEFAULTS["image_size"], patch_size=TINY_DEFAULTS["patch_size"],
            vision_hidden=TINY_DEFAULTS["vision_hidden"], vision_layers=TINY_DEFAULTS["vision_layers"],
            text_hidden=TINY_DEFAULTS["text_hidden"], text_layers=TINY_DEFAULTS["text_layers"],
            max_positions=TINY_MAX_POSITIONS)


def tiny_info(path: str, **overrides):
    """A ``preflight.CheckpointInfo`` of the tiny model (no tokenizer: prompt tokens unknown)."""
    from ..preflight import CheckpointInfo

    return CheckpointInfo(path=path, tokenizer_file=None, **{**TINY, **overrides})


def _elem_bytes(dtype: str, device, info) -> int:
    from ..devices import DTYPE_NAMES

    on_host = not str(device).startswith("cuda")
    if dtype == "checkpoint" and info is not None and info.dtype is not None:
        name = DTYPE_NAMES.get(str(info.dtype).replace("torch.", ""))
        if name is None:
            raise UsageError(f"--dtype checkpoint: {info.path}/config.json records dtype "
                             f"{info.dtype!r}, not one of {sorted(set(DTYPE_NAMES.values()))}")
        return 4 if name == "float32" else 2
    if dtype in ("auto", "checkpoint"):
        return 4 if on_host else 2
    return 4 if DTYPE_NAMES[dtype] == "float32" else 2


def check_context_fit(info, *, prompt: str, pooling, max_new_tokens: int,
                      what: str = "the prompt") -> None:
    """Prompt (its tokens from tokenizer.json) + visual tokens + new tokens within the LM's
    positions (``info``: ``preflight.CheckpointInfo``). Without a tokenizer file (a model not
    written yet) the prompt counts its whitespace-separated words: every tokenizer here splits
    at spaces first, so each word is at least one token."""
    from .. import preflight
    from ..conversation import IMAGE_TOKEN

    visual = math.prod(pooling) if pooling else info.visual_tokens
    tokens = preflight.prompt_tokens(info, prompt)
    bound = tokens is None
    if bound:
        tokens = len(prompt.split())
    # the image token itself is replaced by the visual tokens, as the model expands it
    tokens = max(0, tokens - prompt.count(IMAGE_TOKEN))
    preflight.check_context(info, tokens, max_new_tokens, visual_tokens=visual, what=what,
                            at_least=bound)


def check_memory_fit(info, *, headers, num_frames, batch_size: int, device, dtype) -> None:
    """The weights (on the host while they load) and the visual stage of one batch (the largest
    of the videos' ``preflight.VideoHeader``s) within the available memory. ``info`` None: a
    model not written yet (the demo's), only the decoded frames count."""
    from .. import preflight

    on_host = not str(device).startswith("cuda")
    elem = _elem_bytes(dtype, device, info)
    frames = num_frames or (info.num_frames if info is not None else None)
    need, parts = 0, []
    if info is not None and info.params:
        need += preflight.weights_bytes(info, elem, on_host)
        count = (f"{info.params / 1e9:.2f}B" if info.params >= 1e9 else
                 f"{info.params / 1e6:.1f}M" if info.params >= 1e6 else f"{info.params}")
        parts.append(f"the weights ({count} parameters at {elem} bytes)")
    if headers and frames:
        largest = max(headers, key=lambda h: h.width * h.height)
        need += preflight.visual_bytes([largest] * batch_size, frames, info, elem, on_host)
        parts.append(f"{batch_size} video(s) of {largest.width}x{largest.height} at {frames} "
                     f"frames ({largest.path})")
    if parts:
        preflight.check_memory(need, " + ".join(parts))
