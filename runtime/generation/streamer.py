"""Streaming decoded text while tokens arrive, as transformers' TextStreamer / TextIteratorStreamer do.

Text is only released at a safe boundary: after a newline, after a CJK character, or up to the
last space; and never while the decoded tail ends in U+FFFD (a multi-byte character whose bytes are
split over byte-level BPE tokens that have not all arrived yet). `end()` flushes the rest.
`word_boundaries=False` (the server's streams, as OpenAI's and llama-server's stream tokens) releases
each token's text as soon as it decodes whole, holding back only trailing spaces (a tokenizer's
clean-up may fold a space into the punctuation that follows): a client sees the first word one decode
step sooner, not when the second word starts.

    streamer = TextStreamer(tokenizer, callback=print_piece)
    for piece in TextIteratorStreamer(tokenizer): ...      # fed by generate() in another thread
"""
from __future__ import annotations

import queue
from typing import Callable

import numpy as np

REPLACEMENT_CHAR = "\ufffd"


class TextStreamer:
    """Calls `callback(text)` with each printable piece. `put(ids)` takes the new ids of one sequence."""

    def __init__(self, tokenizer, callback: Callable[[str], None] | None = None, skip_special_tokens: bool = True,
                 word_boundaries: bool = True, **decode_kwargs):
        self.tokenizer = tokenizer
        self.callback = callback
        self.word_boundaries = word_boundaries
        self.decode_kwargs = {"skip_special_tokens": skip_special_tokens, **decode_kwargs}
        self.token_cache: list[int] = []
        self.print_len = 0

    def put(self, token_ids) -> None:
        ids = np.asarray(token_ids).reshape(-1).tolist()
        self.token_cache.extend(int(i) for i in ids)
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith(REPLACEMENT_CHAR):
            return  # the rest of a multi-byte character is still to come
        if text.endswith("\n"):
            printable = text[self.print_len:]
            self.token_cache = []
            self.print_len = 0
        elif text and _is_cjk(ord(text[-1])):
            printable = text[self.print_len:]
            self.print_len += len(printable)
        elif not self.word_boundaries:
            printable = text[self.print_len:max(self.print_len, len(text.rstrip(" ")))]
            self.print_len += len(printable)
        else:
            printable = text[self.print_len:text.rfind(" ") + 1]
            self.print_len += len(printable)
        if printable:
            self.on_finalized_text(printable)

    def end(self) -> None:
        printable = ""
        if self.token_cache:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            printable = text[self.print_len:]
        self.token_cache = []
        self.print_len = 0
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.callback is not None and text:
            self.callback(text)


class StreamCancelled(Exception):
    """Raised inside generation when the consumer of a TextIteratorStreamer has stopped reading."""


class TextIteratorStreamer(TextStreamer):
    """The pieces as an iterator; generation runs in another thread and `put`s into a queue."""

    _END = object()

    def __init__(self, tokenizer, timeout: float | None = None, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.queue: queue.Queue = queue.Queue()
        self.timeout = timeout
        self.cancelled = False

    def cancel(self) -> None:
        """Stop the producing generation at its next token (the consumer broke out of the loop)."""
        self.cancelled = True

    def put(self, token_ids) -> None:
        if self.cancelled:
            raise StreamCancelled()
        super().put(token_ids)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.queue.put(text)
        if stream_end:
            self.queue.put(self._END)

    def put_error(self, error: BaseException) -> None:
        self.queue.put(error)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        value = self.queue.get(timeout=self.timeout)
        if value is self._END:
            raise StopIteration
        if isinstance(value, BaseException):
            raise value
        return value


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)
