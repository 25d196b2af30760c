"""A checkpoint's JSON files read as plain JSON (no transformers or torch import): the CLI checks
a checkpoint with them before anything heavy loads, ``PllavaConfig`` reads config.json and
``loading`` the weight index through them."""
from __future__ import annotations

import json
import os


def read_config_json(file: str) -> dict:
    """The JSON object in ``file``, or ValueError naming the file and what is wrong with it."""
    try:
        with open(file, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: invalid JSON ({exc.msg} at line {exc.lineno} column "
                         f"{exc.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def index_shards(index_file: str) -> list[str]:
    """The shard file names a weight index (``model.safetensors.index.json``) lists, sorted, or
    ValueError naming the file."""
    weight_map = read_config_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(v, str) and v and os.path.basename(v) == v for v in weight_map.values()):
        raise ValueError(f"{index_file}: expected a weight_map of tensor name -> shard file name "
                         "in the same folder")
    return sorted(set(weight_map.values()))
