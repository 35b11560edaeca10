"""One request's way through the server, shared by every route: its body read, its parameters and inputs checked
through the pipeline's request contract, its job queued, its answer (or stream) awaited with a timeout, and a
client that leaves cancelling the work."""
from __future__ import annotations

import asyncio
import json
import time

from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from onnxpipe.base import CallOptions, RequestInputs

from .batching import Job, ModelWorker, StreamEnd, encode_json
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

    async def handle(self, request: Request, endpoint: str, name: str | None, run):
        """Metrics and error answers around one request: `run(request, body)` makes the response."""
        t0 = time.perf_counter()
        self.metrics.request_started()
        # The route template, not the path: unknown names must not grow the metrics without bound.
        status, label = 500, name if name in self.pool.workers else ""
        try:
            body = await read_json(request, self.config.max_body_bytes)
            if name is None and isinstance(body.get("model"), str) and body["model"] in self.pool.workers:
                label = body["model"]
            response = await run(request, body)
            status = response.status_code
            return response
        except RequestError as e:
            status = e.status
            return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
        finally:
            self.metrics.request_finished(label, endpoint, status, time.perf_counter() - t0)

    # -- checks, all through the pipeline's public contract ------------------------------------------------------

    def check_parameters(self, worker: ModelWorker, parameters) -> CallOptions:
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise RequestError(422, f"'parameters' must be a JSON object of pipeline options, got {json.dumps(parameters)[:80]}")
        owned = SERVER_OWNED if worker.combines else ("streamer",)
        try:
            return worker.pipe.check_parameters({k: v for k, v in parameters.items() if k not in owned})
        except (ValueError, TypeError) as e:
            raise RequestError(422, f"bad parameters: {e}") from None

    def check_inputs(self, worker: ModelWorker, value, options: CallOptions, where: str = "inputs") -> RequestInputs:
        """The request's inputs split per item, each checked for type and length (token counts kept for batching)."""
        try:
            inputs = worker.pipe.split_inputs(value, where)
            lengths = [worker.pipe.check_input_length(item, options, where if not inputs.is_list else f"{where}[{i}]")
                       for i, item in enumerate(inputs.items)]
        except (ValueError, TypeError) as e:
            raise RequestError(422, str(e)) from None
        inputs.lengths = None if None in lengths else lengths
        return inputs

    # -- running -------------------------------------------------------------------------------------------------

    async def run(self, request: Request, worker: ModelWorker, inputs: RequestInputs, options: CallOptions) -> bytes:
        """Queue one request and wait for its JSON answer; a timeout or a client leaving cancels it."""
        job = Job(inputs, options, self.loop, self.loop.create_future())
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

    async def collect(self, worker: ModelWorker, inputs: RequestInputs, options: CallOptions) -> StreamEnd:
        """Generate through the streaming path, which counts the new tokens, and return its end."""
        job = self._start_stream(worker, inputs, options)
        try:
            while True:
                kind, value = await self._next_piece(worker, job)
                if kind == "end":
                    return value
        finally:
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


async def read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object, refusing more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body is {int(declared)} bytes; this server takes at most {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"the request body is over {limit} bytes, the most this server takes")
    try:
        data = json.loads(body)
    except ValueError as e:
        raise RequestError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(422, "the request body must be a JSON object such as {\"inputs\": \"some text\"}")
    return data


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read in full already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
