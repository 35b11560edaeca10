"""Dynamic batching for one model: a bounded queue in front of worker threads that run the pipeline.

Requests wait in a bounded queue (full -> `QueueFull`, answered 503). A worker thread takes
the oldest request, then gathers later ones with the same options until the batch holds
`max_batch_size` inputs or `max_wait_ms` has passed (waiting only if others were already
queued), and runs them as list calls, `pipe.run([...], options, batch_size=n)`, one per group
of similar input lengths. Only the pipeline's public request contract is used (base.py): whether
it joins requests or streams, how a list call's results split per item and go back to each
request. Results go back to the event loop as encoded JSON, so the loop never
blocks on inference or on serialising a large result. A request that timed out or whose client
went away is marked cancelled and skipped if it has not started; a stream stops at its next token.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from onnxpipe.base import CallOptions, RequestInputs
from onnxpipe.cancel import Cancelled, cancel_when
from onnxpipe.errors import ModelOutputError, ModelRunError
from onnxpipe.results_json import encode_json

from .errors import RequestError

log = logging.getLogger("onnxpipe.server")


class QueueFull(Exception):
    pass


class ClientGone(Exception):
    """Raised inside generation when the streaming client has disconnected, to stop it early."""


class WorkerClosed(Exception):
    pass


@dataclass(eq=False)
class Job:
    """One request on its way through the queue; `future` gets JSON bytes or a RequestError."""

    inputs: RequestInputs
    options: CallOptions
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    stream: bool = False
    # stream jobs: ("piece", text) items, then ("end", StreamEnd | RequestError)
    pieces: asyncio.Queue | None = None
    cancelled: bool = False
    created: float = field(default_factory=time.monotonic)   # arrival, for time-to-first-token
    pipe: object = None     # the pipeline to run, when not the worker's own (e.g. embeddings of a feature extractor)
    render: object = None   # answer -> what to send instead (a route's own response shape), in the worker thread

    @property
    def size(self) -> int:
        return len(self.inputs.items)

    def resolve(self, value) -> None:
        self._call_soon(_set_future, self.future, value)

    def push(self, kind: str, value) -> None:
        self._call_soon(self.pieces.put_nowait, (kind, value))

    def _call_soon(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is gone, nobody is waiting
            pass


def _set_future(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


class ModelWorker:
    def __init__(self, name: str, pipe, *, max_batch_size: int, max_wait_ms: float, max_queue: int,
                 threads: int = 1, metrics=None):
        self.name = name
        self.pipe = pipe
        self.task = pipe.task  # the pipeline's task (e.g. sentence-similarity over a feature-extraction export)
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_wait = max(0.0, float(max_wait_ms)) / 1000.0
        self.max_queue = max(1, int(max_queue))
        self.metrics = metrics
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"onnxpipe-{name}-{i}", daemon=True)
                         for i in range(max(1, int(threads)))]

    def depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    @property
    def alive(self) -> bool:
        """Every worker thread runs (a host that replaces broken replicas, such as Ray Serve, asks)."""
        return all(t.is_alive() for t in self._threads)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise WorkerClosed()
            if len(self._queue) >= self.max_queue:
                raise QueueFull()
            self._queue.append(job)
            self._cond.notify()

    def drain(self) -> None:
        """Stop waiting for batches to fill: the server is shutting down and no more requests will come."""
        with self._cond:
            self.max_wait = 0.0
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, let the queued ones run, and wait for the threads to end."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout)

    # -- worker threads -------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch[0].stream:
                self._run_stream(batch[0])
            else:
                self._run_batch(batch)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                while self._queue and self._queue[0].cancelled:
                    self._queue.popleft()
                if self._queue:
                    break
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, size = [first], first.size
            # Requests are combined only where the pipeline says results do not depend on their neighbours.
            if first.stream or not self.pipe_of(first).joins_requests:
                return batch
            # Wait for more only when requests are already queued behind this one: a request that
            # finds the worker idle runs at once (one client pays no batching delay), while under
            # load batches fill from the queue that builds up during each run.
            deadline = time.monotonic() + (self.max_wait if self._queue else 0.0)
            while size < self.max_batch_size:
                for job in list(self._queue):
                    if job.cancelled:
                        self._queue.remove(job)
                    elif not job.stream and job.pipe is first.pipe and job.render is first.render and \
                            job.options.key == first.options.key and size + job.size <= self.max_batch_size:
                        self._queue.remove(job)
                        batch.append(job)
                        size += job.size
                remaining = deadline - time.monotonic()
                if size >= self.max_batch_size or remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            return batch

    def _run_batch(self, batch: list[Job]) -> None:
        batch = [j for j in batch if not j.cancelled]
        if not batch:
            return
        if self.metrics is not None:
            self.metrics.batch_ran(self.name, sum(j.size for j in batch))
        if len(batch) == 1:
            self._run_alone(batch[0])
            return
        flat = [item for job in batch for item in job.inputs.items]
        lengths = [n for job in batch for n in (job.inputs.lengths or [None] * job.size)]
        options, pipe = batch[0].options, self.pipe_of(batch[0])
        results: list = [None] * len(flat)
        try:
            with cancel_when(lambda: all(j.cancelled for j in batch)):
                for chunk in length_buckets(lengths):
                    items = [flat[i] for i in chunk]
                    out = pipe.run(items, options, **self._batch_kw(pipe, len(items)))
                    for i, result in zip(chunk, pipe.results_per_item(out, len(items))):
                        results[i] = result
        except Cancelled:
            return  # every request of the batch has been answered already (timeout) or has gone
        except (ValueError, TypeError):
            # One bad input must not fail its neighbours: rerun each alone to answer each truly.
            for job in batch:
                self._run_alone(job)
            return
        except Exception as e:  # noqa: BLE001 - a server answers every request, whatever broke
            error = failure(self.name, e, f"batch of {len(flat)}")
            for job in batch:
                job.resolve(error)
            return
        start = 0
        for job in batch:
            part = results[start:start + job.size]
            start += job.size
            self._resolve(job, lambda: self._encode(job, pipe.answer(job.inputs, job.options, part)))

    def _run_alone(self, job: Job) -> None:
        """Exactly the in-process call `pipe(inputs, **parameters)`."""
        pipe = self.pipe_of(job)
        self._resolve(job, lambda: self._encode(job, pipe.run(job.inputs.value, job.options,
                                                              **self._batch_kw(pipe, job.size))))

    def _resolve(self, job: Job, make_answer) -> None:
        """Answer `job` with what make_answer() returns, or with the error it raised, as the status it deserves."""
        try:
            with cancel_when(lambda: job.cancelled):
                job.resolve(make_answer())
        except Cancelled:
            pass
        except (ValueError, TypeError) as e:
            job.resolve(RequestError(422, str(e)))
        except Exception as e:  # noqa: BLE001
            job.resolve(failure(self.name, e, "request"))

    def _run_stream(self, job: Job) -> None:
        """Generate with a streamer that hands each text piece to the event loop as it is decoded."""
        if self.metrics is not None:
            self.metrics.batch_ran(self.name, 1)
        tap = _StreamTap(self.pipe.tokenizer, job)
        cancelled = False
        try:
            with cancel_when(lambda: job.cancelled):
                result = self.pipe.run(job.inputs.value, job.options, streamer=tap)
            encode_json(result)  # NaN/infinity in the result: an error event rather than invalid JSON
            job.push("end", StreamEnd(result, tap.tokens, tap.finish_reason, tap.prompt_tokens))
        except (ClientGone, Cancelled):
            cancelled = True
        except (ValueError, TypeError) as e:
            job.push("end", RequestError(422, str(e)))
        except Exception as e:  # noqa: BLE001
            job.push("end", failure(self.name, e, "stream"))
        finally:
            if self.metrics is not None:
                self.metrics.stream_ended(self.name, tap.tokens, cancelled)

    def pipe_of(self, job: Job):
        return job.pipe if job.pipe is not None else self.pipe

    @staticmethod
    def _encode(job: Job, answer) -> bytes:
        return encode_json(job.render(answer) if job.render is not None else answer)

    def _batch_kw(self, pipe, n: int) -> dict:
        if not pipe.joins_requests or n < 2:
            return {}
        return {"batch_size": min(n, self.max_batch_size)}


def length_buckets(lengths: list, pad_budget: float = 0.25) -> list[list[int]]:
    """Indices grouped for padded runs: sorted by token length, a new group started whenever padding
    would add more than `pad_budget` of the group's real tokens. Unknown lengths: one group, as given.

    Padding every input to the longest of a mixed batch can cost more than batching saves; inputs
    of similar length batch almost for free.
    """
    if any(n is None for n in lengths):
        return [list(range(len(lengths)))]
    groups: list[list[int]] = []
    group, tokens = [], 0
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        n = lengths[i]
        if group and (len(group) + 1) * n > (1 + pad_budget) * (tokens + n):
            groups.append(group)
            group, tokens = [], 0
        group.append(i)
        tokens += n
    groups.append(group)
    return groups


@dataclass
class StreamEnd:
    result: object        # what the pipeline call returned
    new_tokens: int       # tokens generated
    finish_reason: str = "stop"   # "length": cut by max_new_tokens / max_length or the context window
    prompt_tokens: int = 0        # the prompt's tokens, as the model saw them (a chat: its rendered template)


def text_pieces(tokenizer, job: Job):
    """A TextStreamer that hands a stream job each token's text as soon as it decodes whole (not at word
    boundaries, as a console streamer waits for), as the request's skip_special_tokens says."""
    from onnxpipe.generation import TextStreamer

    return TextStreamer(tokenizer, callback=lambda piece: job.push("piece", piece), word_boundaries=False,
                        skip_special_tokens=job.options.given.get("skip_special_tokens", True))


class _StreamTap:
    """The pipeline's `streamer`: counts new tokens, decodes them into text pieces (text_pieces), and stops
    generation by raising once the client has gone."""

    def __init__(self, tokenizer, job: Job):
        self.job = job
        self.tokens = 0
        self.finish_reason = "stop"
        self.prompt_tokens = 0
        self.text = text_pieces(tokenizer, job)

    def put(self, token_ids) -> None:
        if self.job.cancelled:
            raise ClientGone()
        self.tokens += int(np.size(token_ids))
        self.text.put(token_ids)

    def end(self) -> None:
        if not self.job.cancelled:
            self.text.end()

    def on_finish(self, reason: str) -> None:
        self.finish_reason = reason

    def on_prompt(self, tokens: int) -> None:
        self.prompt_tokens = tokens


def failure(name: str, e: Exception, what: str) -> RequestError:
    """A 500 for a fault that is not the client's: the model's own (said as it is) or an unexpected one (logged)."""
    if isinstance(e, (ModelOutputError, ModelRunError)):
        log.error("model %s: %s", name, e)
        return RequestError(500, f"model {name!r}: {e}")
    log.exception("model %s: %s failed", name, what)
    return RequestError(500, f"inference failed: {type(e).__name__}: {str(e)[:300]}")

