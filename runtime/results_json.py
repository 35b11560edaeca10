"""A pipeline result as JSON, one rule for every front end (the server's bodies, `onnxpipe run`, `onnxpipe batch`,
Ray): numpy arrays and scalars become lists and numbers, and NaN or infinity is a broken model, not JSON."""
from __future__ import annotations

import json

import numpy as np

from .errors import ModelOutputError


def encode_json(result) -> bytes:
    """Compact UTF-8 JSON; numpy arrays and scalars become lists and numbers. NaN and infinity are not JSON: a
    result holding them (a broken model) is a ModelOutputError, never a body a client cannot parse."""
    return result_json(result).encode("utf-8")


def result_json(result, indent: int | None = None) -> str:
    """`encode_json` as text (indent: pretty-printed for a terminal)."""
    separators = None if indent else (",", ":")
    try:
        return json.dumps(result, ensure_ascii=False, indent=indent, separators=separators, default=_np_default,
                          allow_nan=False)
    except ValueError:
        raise ModelOutputError("the model's output holds NaN or infinite values: its weights or export are broken "
                               "(export it again, and check the checkpoint)") from None


def _np_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cannot encode {type(o).__name__} as JSON")
