"""A generation model's worker with continuous batching: its requests decode together, one session call per step.

The same queue as ModelWorker's (bounded: full -> 503), but one thread runs a GenerationEngine: between steps it
moves as many queued requests into the engine as it has room for (max_running), aborts those whose client left
or that timed out (their rows leave the cache at once), runs a step, and hands each request its new tokens
(stream: text pieces as they decode) and, when it finishes, the answer the pipeline would give. Requests the
engine does not take (a list of prompts, beam search, several return sequences) run alone between two steps.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from onnxpipe.generation.engine import GenerationEngine
from onnxpipe.results_json import encode_json

from .batching import Job, ModelWorker, StreamEnd, failure, text_pieces
from .errors import RequestError

log = logging.getLogger("onnxpipe.server")


class EngineWorker(ModelWorker):
    def __init__(self, name: str, pipe, *, max_running: int, max_queue: int, prefix_cache_mb: float = 64,
                 metrics=None):
        super().__init__(name, pipe, max_batch_size=1, max_wait_ms=0, max_queue=max_queue, threads=1, metrics=metrics)
        self.engine = GenerationEngine(pipe, max_running=max_running, prefix_cache_mb=prefix_cache_mb)
        self.max_running, self.prefix_cache_mb = max_running, prefix_cache_mb
        self._prompt_tokens = (0, 0)  # an engine replaced after a failed step: its counts carry on
        self._active: dict[Job, _Active] = {}

    def counts(self) -> tuple[int, int, int, int]:
        """(running sequences, waiting requests, prompt tokens joined, those a known prefix gave), for the metrics."""
        joined, cached = self.engine.prompt_tokens
        return (len(self.engine.running), len(self.engine.waiting) + len(self._queue),
                self._prompt_tokens[0] + joined, self._prompt_tokens[1] + cached)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self.engine.has_unfinished():
                    if self._closed:
                        return
                    self._cond.wait()
                room = self.max_running - len(self.engine.running) - len(self.engine.waiting)
                taken = [self._queue.popleft() for _ in range(min(room, len(self._queue)))]
            for job in taken:
                if not job.cancelled:
                    self._admit(job)
            for job in [j for j in self._active if j.cancelled]:
                self.engine.abort(job)
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - every request of the batch gets the error
                self._fail_all(e)
                continue
            if self.metrics is not None and outputs:
                self.metrics.generation_step(self.name, len(outputs))
            for out in outputs:
                self._deliver(out)

    def _admit(self, job: Job) -> None:
        work = self.pipe.generation_work(job.options)
        if job.inputs.is_list or work.num_beams > 1 or work.num_return_sequences > 1:
            (self._run_stream if job.stream else self._run_alone)(job)  # alone, between two steps
            return
        try:
            self.engine.add_request(job, job.inputs.value, options=job.options)
        except (ValueError, TypeError) as e:
            self._finish(job, RequestError(422, str(e)))
            return
        self._active[job] = _Active(self.pipe.tokenizer, job)
        if self.metrics is not None:
            self.metrics.batch_ran(self.name, 1)

    def _deliver(self, out) -> None:
        job, state = out.request_id, self._active.get(out.request_id)
        if state is None:
            return
        if out.new_token_ids:
            if state.first_token_at is None:
                state.first_token_at = time.monotonic()
                if self.metrics is not None:
                    self.metrics.first_token(self.name, state.first_token_at - job.created)
            if state.text is not None:
                state.text.put(np.array(out.new_token_ids))
        if not out.finished:
            return
        del self._active[job]
        tokens = len(out.token_ids)
        if self.metrics is not None:
            if job.stream:
                self.metrics.stream_ended(self.name, tokens, out.finish_reason == "aborted")
            if out.finish_reason != "aborted":
                self.metrics.request_generated(self.name, tokens, time.monotonic() - job.created)
        if out.finish_reason == "aborted":
            return  # its request was answered already (timeout) or its client has gone
        try:
            encoded = encode_json(out.result)
        except Exception as e:  # noqa: BLE001 - NaN in the result: the model's fault, said as such
            self._finish(job, failure(self.name, e, "generation"))
            return
        if job.stream:
            state.text.end()
            job.push("end", StreamEnd(out.result, tokens, out.finish_reason, out.prompt_tokens))
        else:
            job.resolve(encoded)

    def _finish(self, job: Job, error: RequestError) -> None:
        if job.stream:
            job.push("end", error)
        else:
            job.resolve(error)

    def _fail_all(self, e: Exception) -> None:
        error = failure(self.name, e, "generation step")
        for job in list(self._active):
            self.engine.abort(job)
            self._finish(job, error)
        self._active.clear()
        self._prompt_tokens = self.counts()[2:]
        # a clean batch for what comes next
        self.engine = GenerationEngine(self.pipe, max_running=self.max_running, prefix_cache_mb=self.prefix_cache_mb)


class _Active:
    """A request decoding in the engine: its text streamer (stream jobs) and when its first token came."""

    def __init__(self, tokenizer, job: Job):
        self.first_token_at = None
        self.text = text_pieces(tokenizer, job) if job.stream else None
