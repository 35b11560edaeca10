"""The Starlette application and `serve()`: routes, limits, model loading, graceful shutdown.

Routes (every error is JSON `{"error": "..."}` with a 4xx/5xx status):

    GET  /health                   liveness: 200 while the process serves HTTP
    GET  /ready                    200 once every model is loaded; 503 while loading or shutting down
    GET  /metrics                  Prometheus text format
    GET  /v1/models                the loaded models: name, task, limits
    POST /v1/models/{name}         {"inputs": ..., "parameters": {...}, "stream": false}
                                   -> exactly what pipe(inputs, **parameters) returns, as JSON;
                                   "stream": true (text-generation) -> server-sent events
    POST /v1/chat/completions      OpenAI-style chat for text-generation models with a chat template
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .batching import Job, ModelWorker, QueueFull, StreamEnd, WorkerClosed, encode_json
from .errors import RequestError
from .inputs import length_limit, parse_inputs, texts_to_measure
from .metrics import CONTENT_TYPE, Metrics

log = logging.getLogger("onnxpipe.server")


# The worker threads give up the GIL for every tokenizer and ONNX Runtime call and must take it
# back from the event loop; at Python's default 5 ms interval, while the loop is busy parsing
# requests, each of those returns can wait up to 5 ms (a batch makes dozens of them).
SWITCH_INTERVAL_S = 0.0005


@dataclass
class ServerConfig:
    max_batch_size: int = 8
    max_wait_ms: float = 5.0
    workers: int = 1                     # inference threads per model
    max_queue: int = 64                  # requests waiting per model before 503
    request_timeout_s: float = 30.0      # from arrival to answer (or to each streamed piece)
    max_body_bytes: int = 1 << 20
    precision: str = "fp32"
    device: str = "cpu"
    intra_op_num_threads: int | None = None
    retry_after_s: int = 1

    def __post_init__(self):
        for name in ("max_batch_size", "workers", "max_queue", "max_body_bytes", "retry_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_wait_ms", "request_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or \
                    (name == "request_timeout_s" and value == 0):
                raise ValueError(f"{name} must be a {'positive' if name == 'request_timeout_s' else 'non-negative'} "
                                 f"number, got {value!r}")
        if self.intra_op_num_threads is not None and (not isinstance(self.intra_op_num_threads, int)
                                                      or self.intra_op_num_threads < 1):
            raise ValueError(f"intra_op_num_threads must be a positive integer or None, got {self.intra_op_num_threads!r}")


def serve(models, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8, max_wait_ms: float = 5.0,
          workers: int = 1, *, access_log: bool = False, graceful_timeout_s: float | None = None, **options) -> None:
    """Serve model folders over HTTP until SIGINT/SIGTERM, then finish in-flight requests and exit.

    models: model folder paths, "NAME=DIR" to name one (the name defaults to the folder's name), or
    "NAME=DIR@TASK" to serve it with another pipeline than its manifest's task (e.g. sentence-similarity).
    workers: inference threads per model. options: the other ServerConfig fields.
    """
    config = ServerConfig(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, workers=workers, **options)
    app = create_app(models, config)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    grace = graceful_timeout_s if graceful_timeout_s is not None else config.request_timeout_s + 5
    server = _GracefulServer(uvicorn.Config(app, host=host, port=port, access_log=access_log, log_level="info",
                                            timeout_graceful_shutdown=grace, lifespan="on"))
    app.state.onnxpipe.stop_server = lambda: setattr(server, "should_exit", True)
    server.run()
    if app.state.onnxpipe.load_error is not None:
        raise ValueError(app.state.onnxpipe.load_error)


def create_app(models, config: ServerConfig | None = None) -> Starlette:
    """The ASGI app for `models` ("DIR", "NAME=DIR" or "NAME=DIR@TASK"); models load in the background."""
    state = _State(parse_model_specs(models), config or ServerConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state.loop = asyncio.get_running_loop()
        threading.Thread(target=state.load, name="onnxpipe-load", daemon=True).start()
        yield
        state.begin_drain()
        await asyncio.to_thread(state.close)

    routes = [
        Route("/health", lambda request: JSONResponse({"status": "ok"})),
        Route("/ready", state.ready_endpoint),
        Route("/metrics", lambda request: Response(state.metrics.render(), media_type=CONTENT_TYPE)),
        Route("/v1/models", state.list_models),
        Route("/v1/models/{name}", state.predict, methods=["POST"]),
        Route("/v1/chat/completions", state.chat_completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, RequestError: _request_error})
    app.state.onnxpipe = state
    return app


@dataclass
class ModelSpec:
    path: Path
    task: str | None = None    # None: the manifest's task


def parse_model_specs(models) -> dict[str, ModelSpec]:
    """["dir", "name=dir", "name=dir@task"] -> {name: ModelSpec}, checking each folder's manifest now so
    that a typo fails at start. The task, when given, is any pipeline task or alias the export
    serves (e.g. sentence-similarity over a feature-extraction export)."""
    from onnxpipe.model_dir import read_manifest
    from onnxpipe.registry import normalize_task

    if isinstance(models, (str, os.PathLike)):
        models = [models]
    specs: dict[str, ModelSpec] = {}
    for spec in models:
        spec = str(spec)
        rest, task = spec, None
        if "@" in spec and not os.path.isdir(spec):
            rest, _, task = spec.rpartition("@")
            normalize_task(task)  # a clear ValueError for an unknown task
        name, sep, path = rest.partition("=")
        if not sep or os.path.isdir(rest):
            name, path = Path(rest).resolve().name, rest
        if not name or "/" in name:
            raise ValueError(f"--model {spec!r}: a model name must be non-empty and without '/'")
        if name in specs:
            raise ValueError(f"two models are named {name!r}: name them with --model NAME=DIR")
        read_manifest(path)
        specs[name] = ModelSpec(Path(path), task)
    if not specs:
        raise ValueError("serve needs at least one --model DIR")
    return specs


def session_options(intra_op_num_threads: int | None):
    """ONNX Runtime options for a server: its thread pool sleeps between runs instead of spinning.

    A spinning pool keeps its cores busy after every run, taking them from the event loop that
    parses requests and from the next batch's tokenization.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if intra_op_num_threads:
        so.intra_op_num_threads = int(intra_op_num_threads)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return so


class _GracefulServer(uvicorn.Server):
    """Marks the app as draining the moment shutdown begins, before uvicorn waits for open connections."""

    async def shutdown(self, sockets=None):
        self.config.app.state.onnxpipe.begin_drain()
        await super().shutdown(sockets)


async def _http_error(request, exc: HTTPException):
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _request_error(request, exc: RequestError):
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


class _State:
    """Everything the routes share: the models and their workers, the limits, the metrics."""

    def __init__(self, specs: dict[str, ModelSpec], config: ServerConfig):
        self.specs = specs
        self.config = config
        self.metrics = Metrics()
        self.workers: dict[str, ModelWorker] = {}
        self.counters: dict[str, object] = {}     # name -> a private tokenizer for length checks
        self.loop: asyncio.AbstractEventLoop | None = None
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        # How a failed load stops the server; serve() replaces it with uvicorn's own flag.
        self.stop_server = lambda: os.kill(os.getpid(), signal.SIGTERM)

    # -- lifecycle ------------------------------------------------------------------------

    def load(self) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        from onnxpipe import pipeline

        c = self.config
        try:
            for name, spec in self.specs.items():
                t0 = time.perf_counter()
                path = spec.path
                pipe = pipeline(spec.task, model=str(path), precision=c.precision, device=c.device,
                                session_options=session_options(c.intra_op_num_threads))
                for role in pipe.model.roles:  # create sessions now, not on the first request
                    pipe.model.session(role)
                manifest = pipe.model.manifest
                counter = RustTokenizer.from_file(str(path / manifest["tokenizer"].get("file", "tokenizer.json")))
                counter.no_truncation()
                counter.no_padding()
                worker = ModelWorker(name, pipe, max_batch_size=c.max_batch_size, max_wait_ms=c.max_wait_ms,
                                     max_queue=c.max_queue, threads=c.workers, metrics=self.metrics)
                worker.start()
                self.counters[name] = counter
                self.workers[name] = worker
                self.metrics.watch_queue(name, worker.depth)
                log.info("loaded %s (%s) from %s in %.2f s", name, pipe.task, path, time.perf_counter() - t0)
            self.ready = True
            log.info("ready: %s", ", ".join(self.workers))
        except Exception as e:  # noqa: BLE001 - reported, then the server stops
            self.load_error = f"could not load model {name!r} from {spec.path}: {e}"
            log.error("%s", self.load_error)
            self.stop_server()

    def begin_drain(self) -> None:
        self.draining = True
        for worker in list(self.workers.values()):
            worker.drain()

    def close(self) -> None:
        for worker in list(self.workers.values()):
            worker.close(timeout=self.config.request_timeout_s)

    # -- routes ---------------------------------------------------------------------------

    async def ready_endpoint(self, request: Request):
        if self.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not self.ready:
            status = "failed: " + self.load_error if self.load_error else "loading"
            return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready", "models": {n: w.task for n, w in self.workers.items()}})

    async def list_models(self, request: Request):
        return JSONResponse({"models": [self._describe(name) for name in self.workers]})

    def chat_models(self) -> list[str]:
        return [name for name, w in self.workers.items()
                if w.task == "text-generation" and w.pipe.model.manifest.get("chat_template")]

    def _describe(self, name: str) -> dict:
        worker = self.workers[name]
        manifest = worker.pipe.model.manifest
        return {"name": name, "task": worker.task, "model_type": manifest.get("model_type"),
                "architecture": manifest.get("architecture"), "precision": worker.pipe.model.precision,
                "max_input_tokens": length_limit(manifest), "stream": worker.can_stream,
                "chat": name in self.chat_models()}

    async def predict(self, request: Request):
        # The route template, not the path: unknown names must not grow the metrics without bound.
        return await self._handle(request, "/v1/models/{name}", request.path_params["name"], self._predict)

    async def chat_completions(self, request: Request):
        from .chat import chat_completion

        return await self._handle(request, "/v1/chat/completions", None, lambda r, b: chat_completion(self, r, b))

    async def _handle(self, request: Request, endpoint: str, name: str | None, run):
        """Metrics and error answers around one request."""
        t0 = time.perf_counter()
        self.metrics.request_started()
        status, label = 500, name if name in self.workers else ""
        try:
            body = await read_json(request, self.config.max_body_bytes)
            if name is None and isinstance(body.get("model"), str) and body["model"] in self.workers:
                label = body["model"]
            response = await run(request, body)
            status = response.status_code
            return response
        except RequestError as e:
            status = e.status
            return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
        finally:
            self.metrics.request_finished(label, endpoint, status, time.perf_counter() - t0)

    async def _predict(self, request: Request, body: dict):
        worker = self.worker(request.path_params["name"])
        unknown = sorted(set(body) - {"inputs", "parameters", "stream"})
        if unknown:
            raise RequestError(422, f"unknown field(s) {', '.join(unknown)}: the body takes 'inputs', "
                                    "'parameters' and 'stream'")
        parameters = self.check_parameters(worker, body.get("parameters"))
        parsed = parse_inputs(worker.task, body.get("inputs"))
        parsed.lengths = self.check_lengths(worker, parsed.items, parameters)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(422, f"'stream' must be true or false, got {json.dumps(stream)}")
        if stream:
            if not worker.can_stream:
                raise RequestError(422, f"model {worker.name!r} ({worker.task}) cannot stream: streaming is for "
                                        "text-generation models")
            if parsed.is_list:
                raise RequestError(422, "a streamed request takes one prompt or chat, not a list")
            return self.stream(worker, parsed, parameters, lambda piece: sse({"token": piece}),
                               lambda end: [sse({"result": end.result})])
        return Response(await self.run(request, worker, parsed, parameters), media_type="application/json")

    # -- helpers shared with the chat route -----------------------------------------------

    def worker(self, name) -> ModelWorker:
        if self.draining:
            raise RequestError(503, "the server is shutting down", {"Retry-After": str(self.config.retry_after_s)})
        if not self.ready:
            raise RequestError(503, "models are still loading: retry when /ready answers 200",
                               {"Retry-After": str(self.config.retry_after_s)})
        if name not in self.workers:
            raise RequestError(404, f"no model named {name!r}: this server has {', '.join(sorted(self.workers))}")
        return self.workers[name]

    def check_parameters(self, worker: ModelWorker, parameters) -> dict:
        if parameters is None:
            return {}
        if not isinstance(parameters, dict):
            raise RequestError(422, f"'parameters' must be a JSON object of pipeline options, got {json.dumps(parameters)[:80]}")
        # The server sizes batches where they do not change results, and streams itself.
        owned = ("batch_size", "streamer") if worker.combines else ("streamer",)
        parameters = {k: v for k, v in parameters.items() if k not in owned}
        sanitize = getattr(worker.pipe, "_sanitize_parameters", None)
        if sanitize is not None:
            try:
                sanitize(**parameters)
            except (ValueError, TypeError) as e:
                raise RequestError(422, f"bad parameters: {e}") from None
        return parameters

    def check_lengths(self, worker: ModelWorker, items: list, parameters: dict) -> list[int] | None:
        """Refuse inputs longer than the manifest allows; return each item's token count (None: not measured)."""
        limit = length_limit(worker.pipe.model.manifest)
        if limit is None:
            return None
        new_tokens = parameters.get("max_new_tokens") if worker.task == "text-generation" else None
        new_tokens = new_tokens if isinstance(new_tokens, int) and not isinstance(new_tokens, bool) else 0
        counter = self.counters[worker.name]
        lengths = []
        for i, item in enumerate(items):
            texts = texts_to_measure(worker.task, parameters, item)
            if texts is None:
                lengths.append(None)
                continue
            n = len(counter.encode(*texts).ids)
            lengths.append(n)
            if n + new_tokens <= limit:
                continue
            where = "inputs" if len(items) == 1 else f"inputs[{i}]"
            if worker.task == "text-generation":
                extra = f" plus max_new_tokens={new_tokens}" if new_tokens else ""
                raise RequestError(422, f"{where} is {n} tokens long{extra}; model {worker.name!r} takes at most "
                                        f"{limit} positions (manifest max length): shorten the prompt or max_new_tokens")
            raise RequestError(422, f"{where} is {n} tokens long; model {worker.name!r} takes at most {limit} tokens "
                                    "(manifest max length): shorten it, or pass \"truncation\": true in parameters "
                                    "to cut it")
        return None if None in lengths else lengths

    def submit(self, worker: ModelWorker, job: Job) -> None:
        try:
            worker.submit(job)
        except QueueFull:
            raise RequestError(503, f"model {worker.name!r} is overloaded ({worker.max_queue} requests queued): "
                                    "retry later", {"Retry-After": str(self.config.retry_after_s)}) from None
        except WorkerClosed:
            raise RequestError(503, "the server is shutting down",
                               {"Retry-After": str(self.config.retry_after_s)}) from None

    async def run(self, request: Request, worker: ModelWorker, parsed, parameters: dict) -> bytes:
        """Queue one request and wait for its JSON answer; a timeout or a client leaving cancels it."""
        job = Job(parsed, parameters, self.loop, self.loop.create_future())
        self.submit(worker, job)
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

    def stream(self, worker: ModelWorker, parsed, parameters: dict, render, finish) -> StreamingResponse:
        """Queue a streamed generation: `render(piece)` makes each text piece an SSE event, `finish(end)`
        (end: a StreamEnd) the events after the last piece; then `data: [DONE]`."""
        job = self._start_stream(worker, parsed, parameters)

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

    async def collect(self, worker: ModelWorker, parsed, parameters: dict) -> StreamEnd:
        """Generate through the streaming path, which counts the new tokens, and return its end."""
        job = self._start_stream(worker, parsed, parameters)
        try:
            while True:
                kind, value = await self._next_piece(worker, job)
                if kind == "end":
                    return value
        finally:
            job.cancelled = True

    def _start_stream(self, worker: ModelWorker, parsed, parameters: dict) -> Job:
        job = Job(parsed, parameters, self.loop, self.loop.create_future(), stream=True, pieces=asyncio.Queue())
        self.submit(worker, job)
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
