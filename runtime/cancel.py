"""Stopping a pipeline call that nobody waits for any more, between its steps.

A front end runs `pipe.run(...)` inside `cancel_when(predicate)`; the long loops (padded encoder batches,
QA/NER windows, every decode step of generation) call `check()`, which raises `Cancelled` once the predicate
is true. So a request whose client left, or that timed out, frees its worker within one batch or one token,
instead of holding the model until its work is done. Thread-local: each worker thread has its own.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable

_local = threading.local()


class Cancelled(Exception):
    """The call was cancelled by its caller (see cancel_when); nothing is returned."""


@contextlib.contextmanager
def cancel_when(predicate: Callable[[], bool]):
    """Within this block, `check()` raises Cancelled once `predicate()` is true."""
    previous = getattr(_local, "predicate", None)
    _local.predicate = predicate
    try:
        yield
    finally:
        _local.predicate = previous


def check() -> None:
    predicate = getattr(_local, "predicate", None)
    if predicate is not None and predicate():
        raise Cancelled()
