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
    "KVCacheSpec": "kv_spec",
    "WeightSpec": "weight_spec",
    "QuantizedKVCache": "quantized_cache",
    "make_cache": "kv_cache",
    "patch": "patching",
    "unpatch": "patching",
    "profile_video": "profile",
    "profile_videos": "profile",
    "frames_to_pixel_values": "preprocess",
    "sample_indices": "video",
    "read_video": "video",
    "read_videos": "video",
    "DecodedVideo": "video",
    "VideoDecodeError": "video",
    "VideoPipeline": "pipeline",
}
_SUBMODULES = {
    "attention", "chat", "checks", "cli", "comparison", "compat", "config", "config_json",
    "conversation", "dataset", "devices", "inputs", "jsonio", "kernels", "kv_cache", "kv_spec",
    "llm_decode", "loading", "merge", "model", "ops", "original", "patching", "pipeline",
    "preflight", "preprocess", "profile", "projector", "quantized_cache", "shapes",
    "static_cache", "testing", "timing", "video", "weight_quant", "weight_spec",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pllava_fast' has no attribute {name!r}")
