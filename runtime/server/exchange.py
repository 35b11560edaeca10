"""One request's way through the server, shared by every route: its body read, its parameters and inputs checked
through the pipeline's request contract, its job queued, its answer (or stream) awaited with a timeout, and a
client that leaves cancelling the work."""
from __future__ import annotations

import asyncio
import json
import math
import time

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, StreamingResponse

from onnxpipe.base import CallOptions, RequestInputs
from onnxpipe.results_json import encode_json

from .batching import Job, ModelWorker, StreamEnd
from .errors import RequestError
from .pool import ModelPool

# Call options a server sets itself: it sizes batches where they do not change results, and streams itself.
SERVER_OWNED = ("batch_size", "streamer")


class Exchange:
    """What the routes share: the model pool, the limits, the metrics, and the event loop."""

    def __init__(self, pool: ModelPool, config, metrics):
        self.pool = pool
        self.config = config      # ServerConfig
        self.metrics = metrics
        self.loop: asyncio.AbstractEventLoop | None = None

    async def handle(self, request: Request, endpoint: str, name: str | None, run, error_body=None):
        """Metrics and error answers around one request: `run(request, body)` makes the response; error_body(e)
        shapes an error's JSON (default: {"error": message})."""
        t0 = time.perf_counter()
        self.metrics.request_started()
        # The route template, not the path: unknown names must not grow the metrics without bound.
        status, label = 500, name if name in self.pool.workers else ""
        size = 0
        try:
            body, size = await read_json(request, self.config.max_body_bytes)
            if name is None and isinstance(body.get("model"), str) and body["model"] in self.pool.workers:
                label = body["model"]
            response = await run(request, body)
            status = response.status_code
            return response
        except RequestError as e:
            status = e.status
            return JSONResponse(error_body(e) if error_body else {"error": e.message}, status_code=e.status,
                                headers=e.headers)
        finally:
            self.metrics.request_finished(label, endpoint, status, time.perf_counter() - t0)
            if size >= LARGE_BODY_BYTES:
                await asyncio.to_thread(give_back_memory)

    # -- checks, all through the pipeline's public contract ------------------------------------------------------

    def check_parameters(self, worker: ModelWorker, parameters, pipe=None) -> CallOptions:
        """`parameters` checked by the pipeline (`pipe`, else the worker's) once, as CallOptions."""
        pipe = pipe or worker.pipe
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise RequestError(422, f"'parameters' must be a JSON object of pipeline options, got {json.dumps(parameters)[:80]}")
        owned = SERVER_OWNED if pipe.joins_requests else ("streamer",)
        try:
            return pipe.check_parameters({k: v for k, v in parameters.items() if k not in owned})
        except (ValueError, TypeError) as e:
            raise RequestError(422, f"bad parameters: {e}") from None

    async def check_inputs(self, worker: ModelWorker, value, options: CallOptions,
                           where: str = "inputs", pipe=None, copies: int = 1) -> RequestInputs:
        """The request's inputs split per item, each checked for type and length, and the request for the
        server's budgets (copies: runs of each input the route makes, e.g. OpenAI's n). Tokenizing a large body
        takes a while: it runs in a thread, not on the event loop."""
        return await asyncio.to_thread(self._check_inputs, pipe or worker.pipe, value, options, where, copies)

    def _check_inputs(self, pipe, value, options: CallOptions, where: str, copies: int) -> RequestInputs:
        c = self.config
        try:
            inputs = pipe.split_inputs(value, where)
            if len(inputs.items) > c.max_inputs:
                raise RequestError(422, f"the request has {len(inputs.items)} inputs; this server takes at most "
                                        f"{c.max_inputs} per request (--max-inputs): split it")
            self._check_generation_budget(pipe.generation_work(options), len(inputs.items), copies)
            lengths = [pipe.check_input_length(item, options, where if not inputs.is_list else f"{where}[{i}]")
                       for i, item in enumerate(inputs.items)]
            tokens = sum(n if n is not None else pipe.count_input_tokens(item) for n, item in zip(lengths, inputs.items))
        except (ValueError, TypeError) as e:
            raise RequestError(422, str(e)) from None
        if tokens > c.max_input_tokens:
            raise RequestError(422, f"the request's inputs are {tokens} tokens in all; this server takes at most "
                                    f"{c.max_input_tokens} per request (--max-input-tokens): split it")
        inputs.lengths = None if None in lengths else lengths
        inputs.tokens = tokens
        return inputs

    def _check_generation_budget(self, work, n_inputs: int, copies: int) -> None:
        if work is None:
            return
        c = self.config
        sequences = copies * max(work.num_beams, work.num_return_sequences)
        for value, limit, name, flag in ((work.num_beams, c.max_num_beams, "num_beams", "--max-beams"),
                                         (copies * work.num_return_sequences, c.max_return_sequences,
                                          "num_return_sequences (n)", "--max-return-sequences"),
                                         (work.new_tokens, c.max_new_tokens, "max_new_tokens", "--max-new-tokens")):
            if value > limit:
                raise RequestError(422, f"{name}={value} is over this server's limit of {limit} ({flag})")
        total = n_inputs * sequences * work.new_tokens
        if total > c.max_generated_tokens:
            raise RequestError(422, f"the request may generate {total} tokens ({n_inputs} inputs x {sequences} "
                                    f"sequences x {work.new_tokens} new tokens); this server generates at most "
                                    f"{c.max_generated_tokens} per request (--max-generated-tokens): ask for fewer")

    # -- running -------------------------------------------------------------------------------------------------

    async def run(self, request: Request, worker: ModelWorker, inputs: RequestInputs, options: CallOptions,
                  pipe=None, render=None) -> bytes:
        """Queue one request and wait for its JSON answer; a timeout or a client leaving cancels it. pipe: the
        pipeline to run instead of the worker's; render: the answer -> the body to send (in the worker thread)."""
        job = Job(inputs, options, self.loop, self.loop.create_future(), pipe=pipe, render=render)
        self.pool.submit(worker, job)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({job.future, gone}, timeout=self.config.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if job.future not in done:
            job.cancelled = True
            if gone in done:  # nobody to answer; 499 is nginx's "client closed request", for the metrics
                raise RequestError(499, "the client closed the connection")
            raise RequestError(504, f"model {worker.name!r} did not answer within {self.config.request_timeout_s:g} s")
        result = job.future.result()
        if isinstance(result, RequestError):
            raise result
        return result

    def stream(self, worker: ModelWorker, inputs: RequestInputs, options: CallOptions, render, finish) -> StreamingResponse:
        """Queue a streamed generation: `render(piece)` makes each text piece an SSE event, `finish(end)`
        (end: a StreamEnd) the events after the last piece; then `data: [DONE]`."""
        job = self._start_stream(worker, inputs, options)

        async def events():
            try:
                while True:
                    try:
                        kind, value = await self._next_piece(worker, job)
                    except RequestError as e:
                        yield sse({"error": e.message})
                        return
                    if kind == "piece":
                        yield render(value)
                        continue
                    for event in finish(value):
                        yield event
                    yield b"data: [DONE]\n\n"
                    return
            finally:
                # Runs when the stream ends and when the client disconnects (the generator is closed):
                # generation stops at its next token and the worker takes the next request.
                job.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def collect(self, request: Request, worker: ModelWorker, inputs: RequestInputs,
                      options: CallOptions) -> StreamEnd:
        """Generate through the streaming path, which counts the new tokens, and return its end; a client that
        leaves stops the generation at its next token."""
        job = self._start_stream(worker, inputs, options)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                piece = asyncio.ensure_future(self._next_piece(worker, job))
                await asyncio.wait({piece, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not piece.done():
                    piece.cancel()
                    raise RequestError(499, "the client closed the connection")
                kind, value = piece.result()
                if kind == "end":
                    return value
        finally:
            gone.cancel()
            job.cancelled = True

    def _start_stream(self, worker: ModelWorker, inputs: RequestInputs, options: CallOptions) -> Job:
        job = Job(inputs, options, self.loop, self.loop.create_future(), stream=True, pieces=asyncio.Queue())
        self.pool.submit(worker, job)
        return job

    async def _next_piece(self, worker: ModelWorker, job: Job):
        """("piece", text) or ("end", StreamEnd); a failure or a silence longer than the timeout raises."""
        timeout = self.config.request_timeout_s
        try:
            kind, value = await asyncio.wait_for(job.pieces.get(), timeout)
        except asyncio.TimeoutError:
            raise RequestError(504, f"model {worker.name!r} sent nothing for {timeout:g} s") from None
        if isinstance(value, RequestError):
            raise value
        return kind, value


def sse(payload) -> bytes:
    return b"data: " + encode_json(payload) + b"\n\n"


# A body this large leaves megabytes freed but kept by the C allocator (the tokenizer's encodings, in the thread
# that counted them): after one, they are given back to the system.
LARGE_BODY_BYTES = 256 << 10


def give_back_memory() -> None:
    """glibc's malloc_trim: return the free memory of every malloc arena to the system. Measured here: 20 bodies
    of 1 MiB took a server from 81 to 238 MiB resident, for good; after a trim each time it stays near its
    start. A no-op where the C library has no malloc_trim."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()
# JSON nesting deeper than any real request: deeper bodies are refused before anything walks them.
MAX_JSON_DEPTH = 64


async def read_json(request: Request, limit: int) -> tuple[dict, int]:
    """The body as a JSON object, and its size in bytes, refusing more than `limit` bytes before reading them all, and refusing what
    no later step should meet: nesting deeper than MAX_JSON_DEPTH, NaN/Infinity (not JSON; Python's parser takes
    them), numbers too large for a float, and strings that are not Unicode text (lone surrogates)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body is {int(declared)} bytes; this server takes at most {limit}")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"the request body is over {limit} bytes, the most this server takes")
    except ClientDisconnect:  # left before sending the whole body: nobody to answer
        raise RequestError(499, "the client closed the connection before sending its body") from None
    return parse_json_body(bytes(body)), len(body)


def parse_json_body(body: bytes) -> dict:
    """read_json's checks on a body already read (the fuzz tests call it directly)."""
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise RequestError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:
        raise RequestError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(422, "the request body must be a JSON object such as {\"inputs\": \"some text\"}")
    _check_values(data)
    return data


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _check_values(data) -> None:
    """Walk the parsed body (without recursion) for depth, non-finite numbers and lone surrogates."""
    stack = [(data, "body", 1)]
    while stack:
        value, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestError(400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, where)
                stack.append((item, f"{where}.{key}"[:200], depth + 1))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]"[:200], depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            _check_text(value, where)
        elif isinstance(value, float) and not math.isfinite(value):
            raise RequestError(422, f"{where} is a number out of range ({value})")


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(400, f"{where} is not valid Unicode text: {e.reason} at position {e.start} (a lone "
                                "\\u surrogate escape)") from None


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read in full already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
