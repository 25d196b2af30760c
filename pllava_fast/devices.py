"""Default device and dtype: the one meaning of ``"auto"`` in pllava-fast.

``"auto"`` (and None) is bf16 on CUDA, fp32 on CPU, for the model, the pipeline and every
command; ``"checkpoint"`` keeps the dtype the checkpoint's config.json records.
"""
from __future__ import annotations

# torch is imported inside the functions: the CLI checks --dtype before torch loads
DTYPE_NAMES = {
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "fp32": "float32", "float32": "float32", "float": "float32",
}
DTYPE_CHOICES = ("auto", "checkpoint", *DTYPE_NAMES)


def default_device() -> str:
    """"cuda" when a GPU is visible, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device):
    """``device`` as a torch.device that exists here, or ValueError naming what is missing."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}: expected cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but no CUDA GPU is available "
                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: {torch.cuda.device_count()} "
                             "CUDA device(s) visible")
    elif dev.type not in ("cpu", "meta"):
        raise ValueError(f"unsupported device {device!r}: expected cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype, device=None, config=None):
    """A torch dtype from a dtype, its name ("bf16", "float16", ...), "auto" / None (bf16 on
    CUDA, fp32 on CPU) or "checkpoint" (``config``'s recorded dtype, else as "auto")."""
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype == "checkpoint":
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if stored is not None:
            return resolve_dtype(str(stored).replace("torch.", ""), device)
        dtype = "auto"
    if dtype in (None, "auto"):
        cuda = device is not None and torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda else torch.float32
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {list(DTYPE_CHOICES)}")
    return getattr(torch, DTYPE_NAMES[name])
