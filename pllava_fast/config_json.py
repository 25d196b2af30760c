"""config.json read as plain JSON (no transformers import): the CLI checks a checkpoint with it
before anything heavy loads, and ``PllavaConfig`` reads through it."""
from __future__ import annotations

import json


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
