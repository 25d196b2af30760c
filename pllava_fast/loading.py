"""Read PLLaVA checkpoints from a local directory into PLLaVA's weight names.

Layouts accepted (all end up as the names of ``PllavaForConditionalGeneration``):

* PLLaVA / pre-4.45 LLaVA: ``vision_tower.vision_model.*``, ``multi_modal_projector.linear_{1,2}.*``,
  ``language_model.model.*``, ``language_model.lm_head.*``;
* the same saved from a peft-wrapped LM, as the released PLLaVA weights are:
  ``language_model.base_model.model.model.layers.N.self_attn.q_proj.base_layer.weight`` plus
  ``...q_proj.lora_A.default.weight`` (r, in) and ``...lora_B.default.weight`` (out, r); LoRA is
  merged at load, ``W += (lora_alpha / r) * B @ A`` (r from the shapes), without peft;
* transformers >= 4.52 LLaVA: ``model.vision_tower.*``, ``model.multi_modal_projector.*``,
  ``model.language_model.*``, ``lm_head.*``.

Weights come from ``model.safetensors``, safetensors shards with or without an index json, or
``pytorch_model*.bin`` shards; a ``{"model": state_dict}`` wrapper is unwrapped.
"""
from __future__ import annotations

import contextlib
import glob
import os
import re
from typing import Iterable

import torch
from torch import Tensor, nn

from .checks import finite_float
from .compat import no_init_weights
from .devices import check_device
from .config_json import index_shards

# benign extras in old checkpoints: buffers the modules recompute
_IGNORED = re.compile(r"(\.position_ids|\.rotary_emb\.inv_freq)$")
_PEFT_PREFIX = "language_model.base_model.model."
_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_NEW_LAYOUT = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match the model: lists what is missing, extra or misshapen."""


def weight_files(path: str) -> list[str]:
    """The weight files of checkpoint directory ``path`` (safetensors preferred over .bin)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = os.path.join(path, index)
        if os.path.isfile(index_path):
            shards = index_shards(index_path)
            files = [os.path.join(path, s) for s in shards]
            absent = [f for f in files if not os.path.isfile(f)]
            if absent:
                raise FileNotFoundError(f"{index_path} lists shards that are absent: {absent}")
            return files
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin"))
                       or glob.glob(os.path.join(path, "model*.bin")))
    if not files:
        raise FileNotFoundError(
            f"no weights in {path!r}: expected model.safetensors, safetensors shards (with or "
            f"without model.safetensors.index.json) or pytorch_model*.bin")
    return files


def read_state_dict(path: str) -> dict[str, Tensor]:
    """All tensors of the checkpoint directory ``path``, on CPU, names as stored."""
    state: dict[str, Tensor] = {}
    for file in weight_files(path):
        try:
            if file.endswith(".safetensors"):
                from safetensors.torch import load_file
                part = load_file(file, device="cpu")
            else:
                part = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated / corrupt files fail in many library-specific ways
            raise CheckpointError(f"{file}: cannot read weights ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'})") from exc
        if not isinstance(part, dict):
            raise CheckpointError(f"{file}: expected a state dict, got {type(part).__name__}")
        if isinstance(part.get("model"), dict):
            part = part["model"]
        state.update(part)
    return state


def _rename(name: str) -> str:
    if name.startswith(_PEFT_PREFIX):
        name = "language_model." + name[len(_PEFT_PREFIX):]
    name = name.replace(".base_layer.", ".")
    for old, new in _NEW_LAYOUT:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def merge_lora(state: dict[str, Tensor], lora_alpha: float = 4.0) -> dict[str, Tensor]:
    """Rename peft/new-layout names to PLLaVA's and fold LoRA pairs into their base weights.

    ``W += (lora_alpha / r) * B @ A`` computed and returned in (at least) fp32; r = A.shape[0].
    """
    # checked before any tensor is touched: a NaN alpha would silently make every merged weight NaN
    lora_alpha = finite_float("lora_alpha", lora_alpha)
    plain: dict[str, Tensor] = {}
    lora: dict[str, dict[str, Tensor]] = {}
    for name, tensor in state.items():
        m = _LORA.match(name)
        if m:
            lora.setdefault(_rename(m["module"] + ".weight"), {})[m["which"]] = tensor
        else:
            plain[_rename(name)] = tensor
    for target, pair in lora.items():
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"LoRA for {target} has only lora_{''.join(pair)}: need both A and B")
        if target not in plain:
            raise CheckpointError(f"LoRA weights for {target} but no base weight for it")
        a, b, w = pair["A"], pair["B"], plain[target]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0] or (b.shape[0], a.shape[1]) != w.shape:
            raise CheckpointError(
                f"LoRA shapes do not fit {target}: base {tuple(w.shape)}, lora_A {tuple(a.shape)}, "
                f"lora_B {tuple(b.shape)}")
        scale = lora_alpha / a.shape[0]
        # kept in at least fp32: the copy into the model rounds once, to the model's dtype
        merged = w.float() + scale * (b.float() @ a.float())
        plain[target] = merged.to(torch.promote_types(w.dtype, torch.float32))
    return plain


def _listing(title: str, names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"{title} ({len(names)}): " + ", ".join(names[:limit]) + more


_VISION_FULL, _VISION_FLAT = "vision_tower.vision_model.", "vision_tower."


def checkpoint_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Model state (any transformers 5.x) -> PLLaVA checkpoint names (``vision_tower.vision_model.*``;
    5.24's CLIPVisionModel keeps its modules directly under ``vision_tower.``)."""
    out = {}
    for k, v in state.items():
        if k.startswith(_VISION_FLAT) and not k.startswith(_VISION_FULL):
            k = _VISION_FULL + k[len(_VISION_FLAT):]
        out[k] = v
    return out


def _match_vision_layout(state: dict[str, Tensor], expected) -> dict[str, Tensor]:
    full = any(k.startswith(_VISION_FULL) for k in expected)
    out = {}
    for k, v in state.items():
        if k.startswith(_VISION_FULL) and not full:
            k = _VISION_FLAT + k[len(_VISION_FULL):]
        elif k.startswith(_VISION_FLAT) and not k.startswith(_VISION_FULL) and full:
            k = _VISION_FULL + k[len(_VISION_FLAT):]
        out[k] = v
    return out


def save_checkpoint(model: torch.nn.Module, path: str, *, tied: Iterable[str] = ()) -> None:
    """Write ``model``'s weights to ``path/model.safetensors`` under PLLaVA's names (tied copies
    left out)."""
    from safetensors.torch import save_file

    tied = set(tied)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(checkpoint_names(state), os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


def load_into(model: torch.nn.Module, state: dict[str, Tensor], *, source: str = "checkpoint",
              tied: Iterable[str] = (), optional: Iterable[str] = ()) -> None:
    """Copy ``state`` (PLLaVA names) into ``model``; any missing, unexpected or misshapen tensor
    raises CheckpointError listing all of them. ``tied``: names filled by weight tying;
    ``optional``: names no output depends on, zeroed when absent."""
    expected = model.state_dict()
    tied = set(tied)
    optional = set(optional)
    state = _match_vision_layout(state, expected)
    state = {k: v for k, v in state.items() if not (_IGNORED.search(k) and k not in expected)}
    for k in optional - set(state):
        state[k] = torch.zeros_like(expected[k])
    missing = [k for k in expected if k not in state and k not in tied]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    problems = [_listing(title, items) for title, items in (
        ("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
        if items]
    if problems:
        raise CheckpointError(f"{source} does not match the model:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=False)


# -- building and placing the model ---------------------------------------------------------------
@contextlib.contextmanager
def fast_init(dtype: torch.dtype | None):
    """Build modules without random init (weights come from the checkpoint), in ``dtype``."""
    previous = torch.get_default_dtype()
    if dtype is not None and dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            yield
    finally:
        torch.set_default_dtype(previous)


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map) -> None:
    """ValueError unless ``device_map`` is None, one of ``DEVICE_MAPS`` or a dict."""
    if device_map is not None and not (isinstance(device_map, dict) or device_map in DEVICE_MAPS):
        raise ValueError(f"device_map must be one of {DEVICE_MAPS} or a dict, got {device_map!r}")


def dispatch_model(model: nn.Module, device_map, max_memory=None) -> nn.Module:
    """Place ``model``'s modules on devices with accelerate; returns the model.

    ``device_map`` as in transformers: "auto" / "balanced" / "balanced_low_0" / "sequential" or an
    explicit {module name: device} dict; ``max_memory`` ({device: "40GiB"}) bounds each device for
    the automatic maps. Modules in ``model._no_split_modules`` (decoder and encoder layers) are
    never split; accelerate's hooks move activations between devices, so ``generate()`` works
    unchanged.
    """
    from accelerate import dispatch_model as accelerate_dispatch
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    check_device_map(device_map)
    if isinstance(device_map, str):
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        if device_map != "sequential":
            max_memory = get_balanced_memory(
                model, max_memory=max_memory, no_split_module_classes=no_split,
                low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=no_split)
    return accelerate_dispatch(model, device_map=device_map)


# attn_implementation values from_pretrained passes on (transformers' own and ours)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def check_load_arguments(spec, *, device, device_map, max_memory, attn_implementation,
                         lora_alpha, compile, pllava_attention) -> None:
    """ValueError naming the first ``from_pretrained`` argument that cannot work, before any
    weights are read: a mistake fails in a moment, not after a 34B load."""
    spec.check_compile(compile)
    if device is not None and device_map is not None:
        raise ValueError("pass device or device_map, not both")
    if device is not None:
        dev = check_device(device)
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {str(dev)!r}")
    if max_memory is not None and device_map is None:
        raise ValueError("max_memory needs a device_map")
    check_device_map(device_map)
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got "
                         f"{attn_implementation!r}")
    if spec.quantized and attn_implementation not in pllava_attention:
        raise ValueError(f"kv_cache={spec.kind!r} needs pllava-fast attention: "
                         f"attn_implementation one of {pllava_attention}, got "
                         f"{attn_implementation!r}")
    finite_float("lora_alpha", lora_alpha)
