"""Stopping criteria: max_length, EOS and stop strings, combined as transformers' StoppingCriteriaList.

`build_stopping(config, tokenizer)` returns `stopping(input_ids) -> bool [batch]`, True where a row is done.
"""
from __future__ import annotations

import numpy as np


def build_stopping(config, tokenizer=None):
    checks = []
    if config.max_length is not None:
        checks.append(lambda ids: np.full(ids.shape[0], ids.shape[1] >= config.max_length))
    if config.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings needs the model's tokenizer")
        checks.append(StopStrings(config.stop_strings, tokenizer))
    eos = np.asarray(config.eos_token_ids, dtype=np.int64)
    if eos.size:
        # a comparison against the few EOS ids: np.isin's set machinery costs ~80 us a step
        checks.append(lambda ids: (ids[:, -1:] == eos).any(axis=1))

    def stopping(input_ids: np.ndarray) -> np.ndarray:
        done = np.zeros(input_ids.shape[0], dtype=bool)
        for check in checks:
            done |= check(input_ids)
        return done

    return stopping


class StopStrings:
    """transformers' StopStringCriteria: a row stops when a stop string ends inside its last token's text.

    Each token's text is what it adds after a fixed prefix (so byte-level BPE's 'Ġ' becomes a space),
    as StopStringCriteria.clean_tokenizer_vocab computes it; the match is checked on the text of the
    last `max(len(stop string))` tokens, which always covers the longest string.
    """

    STATIC_PREFIX = "abcdef"

    def __init__(self, stop_strings, tokenizer):
        self.stop_strings = (stop_strings,) if isinstance(stop_strings, str) else tuple(stop_strings)
        self.window = max(len(s) for s in self.stop_strings)
        self.tokenizer = tokenizer
        base = tokenizer.encode_batch([self.STATIC_PREFIX], add_special_tokens=False)[0].ids
        self._base_tokens = tokenizer.convert_ids_to_tokens(base)
        self._text: dict[int, str] = {}

    def token_text(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            token = self.tokenizer.convert_ids_to_tokens(token_id)
            full = self.tokenizer.convert_tokens_to_string(self._base_tokens + [token]) if token is not None else ""
            text = full[full.index(self.STATIC_PREFIX) + len(self.STATIC_PREFIX):] if self.STATIC_PREFIX in full else ""
            self._text[token_id] = text
        return text

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        done = np.zeros(input_ids.shape[0], dtype=bool)
        for row, ids in enumerate(input_ids[:, -self.window:].tolist()):
            pieces = [self.token_text(i) for i in ids]
            text = "".join(pieces)
            last_start = len(text) - len(pieces[-1])
            for s in self.stop_strings:
                # an occurrence of s that ends after the last token starts, i.e. the last token completes it
                start = text.find(s, max(0, last_start - len(s) + 1))
                if start != -1:
                    done[row] = True
                    break
        return done
