"""The model's `tokenizer.json` through the `tokenizers` library, with the transformers behaviours pipelines rely on.

transformers' fast tokenizers are this same Rust tokenizer plus a little Python:
truncation/padding set per call, and `clean_up_tokenization_spaces` on decode.
Those are reproduced here from the manifest's `tokenizer` section.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np


class Tokenizer:
    def __init__(self, path: str | Path, info: dict):
        from tokenizers import Tokenizer as _RustTokenizer

        self.path = Path(path)
        if not self.path.exists():
            raise ValueError(f"model dir '{self.path.parent}' has no {self.path.name}: export it again")
        try:
            self._tok = _RustTokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
            raise ValueError(f"model dir '{self.path.parent}': {self.path.name} is not a tokenizer file tokenizers can "
                             f"read ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}): export it again") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self._lock = threading.Lock()
        self._counter = None  # count_tokens' own tokenizer, made on first use
        self.info = info
        # a null field reads as an absent one (manifest_checks lets either through)
        ids = info.get("special_token_ids") or {}
        toks = info.get("special_tokens") or {}
        for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
            setattr(self, f"{name}_token", toks.get(f"{name}_token"))
            setattr(self, f"{name}_token_id", ids.get(f"{name}_token_id"))
        self.all_special_ids = set(info.get("all_special_ids") or [])
        self.model_max_length = info.get("model_max_length")
        self.padding_side = info.get("padding_side") or "right"
        self.truncation_side = info.get("truncation_side") or "right"
        self.clean_up_tokenization_spaces = bool(info.get("clean_up_tokenization_spaces", False))
        self.model_input_names = info.get("model_input_names") or ["input_ids", "attention_mask"]

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` itself (truncation and padding off)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode_batch(self, texts, pairs=None, *, add_special_tokens: bool = True, truncation=False,
                     max_length: int | None = None, stride: int = 0, padding=False, pad_to_multiple_of=None,
                     padding_side: str | None = None, is_pretokenized: bool = False):
        """Encode like transformers' `tokenizer(texts, text_pair=pairs, ...)`; returns `tokenizers.Encoding`s.

        truncation: False | True/'longest_first' | 'only_first' | 'only_second'.
        padding: False | True/'longest' | 'max_length'. Overflowing windows (with `stride`)
        are in each encoding's `.overflowing`, as the Rust tokenizer returns them.
        """
        inputs = list(texts) if pairs is None else list(zip(texts, pairs))
        with self._lock:
            try:
                if truncation:
                    strategy = "longest_first" if truncation is True else truncation
                    limit = max_length if max_length is not None else self.model_max_length
                    if limit is None:
                        raise ValueError("truncation needs max_length: this tokenizer has no model_max_length")
                    self._tok.enable_truncation(limit, stride=stride, strategy=strategy, direction=self.truncation_side)
                if padding:
                    length = None
                    if padding == "max_length":
                        length = max_length if max_length is not None else self.model_max_length
                    pad_id = self.pad_token_id if self.pad_token_id is not None else 0
                    pad_tok = self.pad_token if self.pad_token is not None else "[PAD]"
                    self._tok.enable_padding(direction=padding_side or self.padding_side, pad_id=pad_id,
                                             pad_token=pad_tok, length=length, pad_to_multiple_of=pad_to_multiple_of)
                return self._tok.encode_batch(inputs, add_special_tokens=add_special_tokens, is_pretokenized=is_pretokenized)
            finally:
                self._tok.no_truncation()
                self._tok.no_padding()

    def count_tokens(self, text: str, pair: str | None = None, add_special_tokens: bool = True) -> int:
        """Tokens in `text` (and `pair`), untruncated. Runs on a second tokenizer whose settings never change, so a
        front end counting a request's tokens neither waits for nor disturbs the encode_batch calls of a pipeline
        running in another thread."""
        if self._counter is None:
            from tokenizers import Tokenizer as _RustTokenizer

            counter = _RustTokenizer.from_file(str(self.path))
            counter.no_truncation()
            counter.no_padding()
            self._counter = counter
        return len(self._counter.encode(text, pair, add_special_tokens=add_special_tokens).ids)

    def __call__(self, texts, pairs=None, **kwargs) -> dict[str, np.ndarray]:
        """Numpy feeds (input_ids, attention_mask, token_type_ids) for a batch; pads to the longest."""
        kwargs.setdefault("padding", True)
        encs = self.encode_batch(texts, pairs, **kwargs)
        return to_numpy(encs)

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None) -> str:
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, np.ndarray) else ids)]
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean else text

    def batch_decode(self, sequences, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None):
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, (int, np.integer)):
            return self._tok.id_to_token(int(ids))
        return [self._tok.id_to_token(int(i)) for i in ids]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self._tok.token_to_id(tokens)
        return [self._tok.token_to_id(t) for t in tokens]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self._tok.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)


def to_numpy(encodings) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def clean_up_tokenization(out_string: str) -> str:
    """transformers' PreTrainedTokenizerBase.clean_up_tokenization, verbatim."""
    return (
        out_string.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )
