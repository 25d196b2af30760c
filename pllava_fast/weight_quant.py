"""Weight-only int8 / int4 quantization of the LLM through torchao (``pllava-fast[quant]``).

``quantize_weights(model, WeightSpec("int4"))`` runs torchao's ``quantize_`` on the LLM's decoder
linears (q/k/v/o/gate/up/down) by default; ``lm_head``, the vision tower, the projector and the
token embeddings are options. No GEMM is written here: torchao's layouts pick the kernels.

* int8: ``Int8WeightOnlyConfig`` per row; any device and dtype (under torch.compile in bf16
  inductor uses its int8 kernel; eager dequantizes per call, saving memory, not time).
* int4: per group (``group_size`` 32 / 64 / 128 / 256): on CUDA torchao's tinygemm layout
  (``tile_packed_to_4d``, bf16, sm80+); on CPU its prototype x86 layout (aten's
  ``_weight_int4pack_mm_for_cpu``), fast in bf16 only. A linear whose in_features the group does
  not divide, or whose out_features is not a multiple of 16, stays unquantized (reported).

``check_weights`` quantizes one small Linear on the target device and dtype first (milliseconds),
so a missing torchao or a layout the device cannot run fails with one message naming the layouts
that do run there, before any weights load. A quantized model cannot be saved (torchao's tensor
subclasses are not safetensors): quantize at load time instead.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .weight_spec import WeightSpec

LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# int4 layout -> (device types, activation dtypes)
INT4_LAYOUTS = {"cpu_opaque": (("cpu",), (torch.bfloat16, torch.float32, torch.float16)),
                "tile_packed_to_4d": (("cuda",), (torch.bfloat16,))}


def _torchao():
    """torchao's quantization API, imported with its import-time log noise (CUDA-only .so files
    it cannot load on CPU builds, torch's pytree notices) kept to errors."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import torchao.quantization as tq
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    except ImportError as exc:
        raise ImportError(f"weights='int8'/'int4' need torchao: pip install 'pllava-fast[quant]' "
                          f"({exc})") from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    logging.getLogger("torchao").setLevel(logging.WARNING)  # its per-layer INFO lines
    return tq, PrototypeInt4WeightOnlyConfig


def _config(spec: WeightSpec, device: torch.device):
    tq, cpu_int4 = _torchao()
    if spec.kind == "int8":
        return tq.Int8WeightOnlyConfig(granularity=tq.PerRow())
    if device.type == "cpu":
        return cpu_int4(group_size=spec.group_size)
    return tq.Int4WeightOnlyConfig(group_size=spec.group_size,
                                   int4_packing_format="tile_packed_to_4d")


def _trial(spec: WeightSpec, device: torch.device, dtype: torch.dtype) -> str | None:
    """Quantize and run one small Linear: None when it works, else what went wrong."""
    tq, _ = _torchao()
    lin = nn.Linear(max(256, spec.group_size), 64, bias=False, device=device, dtype=dtype)
    try:
        tq.quantize_(lin, _config(spec, device))
        if not hasattr(lin.weight, "__tensor_flatten__"):
            return "the weight stayed unquantized"
        with torch.no_grad():
            lin(torch.randn(2, lin.in_features, device=device, dtype=dtype))
    except Exception as exc:  # torchao / aten raise many types; the message is what matters
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return None


def check_weights(spec: WeightSpec | None, device, dtype) -> None:
    """ValueError (ImportError without torchao) unless ``spec`` runs on ``device`` / ``dtype``,
    naming the int4 layouts and dtypes that do; cheap: one small Linear, before any load."""
    if spec is None:
        return
    device = torch.device(device)
    problem = _trial(spec, device, dtype)
    if problem is None:
        return
    runs = [f"{name} ({', '.join(str(d).replace('torch.', '') for d in dtypes)})"
            for name, (devices, dtypes) in INT4_LAYOUTS.items() if device.type in devices]
    raise ValueError(f"weights={spec.kind!r} does not run on {device} in "
                     f"{str(dtype).replace('torch.', '')}: {problem}"
                     + (f"; int4 layouts for {device.type}: {', '.join(runs)}" if runs else ""))


def _targets(model: nn.Module, spec: WeightSpec) -> tuple[list[str], list[str]]:
    """(module names to quantize, names skipped because int4 cannot take their shape)."""
    chosen, skipped = [], []
    for name, mod in model.named_modules():
        parts = name.split(".")  # PLLaVA's names, or a transformers Llava's (under "model.")
        if isinstance(mod, nn.Embedding):
            want = spec.embeddings and "vision_tower" not in parts
        elif isinstance(mod, nn.Linear):
            leaf = parts[-1]
            if "vision_tower" in parts:
                want = spec.vision
            elif "multi_modal_projector" in parts:
                want = spec.projector
            elif leaf == "lm_head":
                want = spec.lm_head
            else:
                want = leaf in LM_LINEARS
            # int4 packs groups of in_features and tiles of 16 out_features
            if want and spec.kind == "int4" and (mod.in_features % spec.group_size
                                                 or mod.out_features % 16):
                skipped.append(name)
                want = False
        else:
            want = False
        if want:
            chosen.append(name)
    return chosen, skipped


def quantize_weights(model: nn.Module, spec: WeightSpec) -> dict:
    """Quantize ``model``'s chosen weights in place (see the module docstring); returns
    {"quantized": names, "skipped": names int4 could not take, "bytes_before", "bytes_after"}.
    Embeddings quantize int8 only (torchao has no CPU int4 embedding)."""
    tq, _ = _torchao()
    device = next(model.parameters()).device
    chosen, skipped = _targets(model, spec)
    names = set(chosen)
    before = parameter_bytes(model)
    linear = {n for n in names if isinstance(model.get_submodule(n), nn.Linear)}
    if linear:
        tq.quantize_(model, _config(spec, device), filter_fn=lambda m, fqn: fqn in linear)
    embeds = names - linear
    if embeds:
        tq.quantize_(model, tq.Int8WeightOnlyConfig(granularity=tq.PerRow()),
                     filter_fn=lambda m, fqn: fqn in embeds)
    model._weight_spec = spec
    return {"quantized": chosen, "skipped": skipped, "bytes_before": before,
            "bytes_after": parameter_bytes(model)}


def tensor_bytes(t) -> int:
    """Bytes a tensor holds; a torchao subclass counts its inner tensors (codes, scales,
    zero points), not the dense size ``nbytes`` reports."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def parameter_bytes(module: nn.Module) -> int:
    """Parameters and buffers of ``module``, a tied tensor once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total
