"""Helpers shared by the encoder tasks: input checks, batching with padding, softmax/sigmoid.

`run_batched` is transformers' DataLoader + `pad_collate_fn` + unbatching in numpy: items
preprocessed one by one are padded into batches of `batch_size`, run, and split back into
one-row results, so postprocess sees exactly what it would see with batch_size=1 (plus the
padding positions, as in transformers).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

# transformers' pad_collate_fn pads these keys with 1 (they mark "not a real token"); input_ids
# takes the tokenizer's pad id, everything else 0.
_PAD_WITH_ONE = {"p_mask", "special_tokens_mask"}


def check_texts(inputs, arg_name: str = "inputs") -> tuple[list[str], bool]:
    """`inputs` as a str or a non-empty list of str -> (texts, was_single_str)."""
    if isinstance(inputs, str):
        return [inputs], True
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError(f"{arg_name} is an empty list: pass a string or a non-empty list of strings")
        for i, x in enumerate(inputs):
            if not isinstance(x, str):
                raise TypeError(f"{arg_name}[{i}] must be a string, got {type(x).__name__}")
        return list(inputs), False
    raise TypeError(f"{arg_name} must be a string or a list of strings, got {type(inputs).__name__}")


def check_batch_size(batch_size) -> int:
    if batch_size is None:
        return 1
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def check_positive_int(value, arg_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{arg_name} must be a positive integer, got {value!r}")
    return int(value)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """transformers.pipelines' softmax (max-shifted), in float32 like the model's logits."""
    shifted = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def pad_values(tokenizer) -> dict[str, int]:
    """Padding value per feed name, as transformers' pad_collate_fn chooses them (0 for others)."""
    return {"input_ids": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
            **{k: 1 for k in _PAD_WITH_ONE}}


def run_batched(items: list[dict], batch_size: int, forward: Callable[[dict], dict], *,
                pad: dict[str, int] | None = None, padding_side: str = "right") -> list[dict]:
    """Run `forward` on `items` in padded batches and return one result dict per item.

    items: what preprocess returned for each input: numpy arrays shaped [1, seq, ...] (feeds and
    anything else per token, e.g. offset_mapping) plus plain python values (kept as they are).
    forward: padded arrays -> dict of arrays with the batch first.
    Each result holds the item's padded arrays, forward's outputs sliced to [1, ...], and the
    item's python values.
    """
    pad = pad or {}
    results: list[dict] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        array_keys = [k for k, v in chunk[0].items() if isinstance(v, np.ndarray)]
        if len(chunk) == 1:
            batch = {k: chunk[0][k] for k in array_keys}
        else:
            batch = {k: _pad([it[k] for it in chunk], pad.get(k, 0), padding_side) for k in array_keys}
        outputs = {**batch, **forward(batch)}
        for i, item in enumerate(chunk):
            row = {k: v[i:i + 1] for k, v in outputs.items()}
            row.update({k: v for k, v in item.items() if k not in array_keys})
            results.append(row)
    return results


def _pad(arrays: list[np.ndarray], value, side: str) -> np.ndarray:
    if arrays[0].ndim < 2:
        return np.concatenate(arrays, axis=0)
    longest = max(a.shape[1] for a in arrays)
    out = np.full((len(arrays), longest, *arrays[0].shape[2:]), value, dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        n = a.shape[1]
        if side == "left":
            out[i, longest - n:] = a[0]
        else:
            out[i, :n] = a[0]
    return out

