"""pllava-fast: fast PLLaVA-style video-language inference.

Heavy submodules load lazily, so ``import pllava_fast`` stays cheap (the CLI starts fast and
``pllava_fast.video`` works without transformers being imported).
"""
import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    "PllavaConfig": "config",
    "PllavaForConditionalGeneration": "model",
    "QuantizedKVCache": "kv_cache",
    "patch": "patching",
    "unpatch": "patching",
    "profile_video": "profile",
    "frames_to_pixel_values": "preprocess",
    "sample_indices": "video",
    "read_video": "video",
    "read_videos": "video",
    "DecodedVideo": "video",
    "VideoDecodeError": "video",
    "profile_videos": "profile",
    "VideoPipeline": "pipeline",
}
_SUBMODULES = {
    "ops", "config", "model", "reference", "projector", "video", "preprocess", "conversation",
    "kv_cache", "attention", "patching", "profile", "plots", "testing", "cli", "demo", "caption",
    "pipeline", "chat", "bench", "loading",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pllava_fast' has no attribute {name!r}")
