"""The Starlette application and `serve()`: the routes, the server's settings, graceful shutdown.

Routes (every error is JSON `{"error": "..."}` with a 4xx/5xx status):

    GET  /health                   liveness: 200 while the process serves HTTP
    GET  /ready                    200 once every model is loaded; 503 while loading or shutting down
    GET  /metrics                  Prometheus text format
    GET  /v1/models                OpenAI's model list; each entry also has onnxpipe's details (task, limits)
    POST /v1/models/{name}         {"inputs": ..., "parameters": {...}, "stream": false}
                                   -> exactly what pipe(inputs, **parameters) returns, as JSON;
                                   "stream": true (text-generation) -> server-sent events
    POST /v1/chat/completions      OpenAI chat for text-generation models with a chat template
    POST /v1/completions           OpenAI completions for text-generation models
    POST /v1/embeddings            OpenAI embeddings for sentence-embedding (feature-extraction) models

The OpenAI routes answer errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}.

The parts: pool.py holds the models (loading, readiness, a worker per model), batching.py the workers'
queues and batches, exchange.py one request's way through them, routes.py and openai_*.py the routes.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import sys
import threading

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .config import ServerConfig
from .connections import guarded_protocol
from .errors import RequestError
from .exchange import Exchange
from .metrics import CONTENT_TYPE, Metrics
from .openai_chat import ChatCompletions
from .openai_common import list_models
from .openai_completions import Completions
from .openai_embeddings import Embeddings
from .origins import OriginGuard
from .pool import ModelPool, parse_model_specs
from .routes import NativeRoutes

log = logging.getLogger("onnxpipe.server")


# The worker threads give up the GIL for every tokenizer and ONNX Runtime call and must take it
# back from the event loop; at Python's default 5 ms interval, while the loop is busy parsing
# requests, each of those returns can wait up to 5 ms (a batch makes dozens of them).
SWITCH_INTERVAL_S = 0.0005


def serve(models, host: str = "127.0.0.1", port: int = 8000, max_batch_size: int = 8, max_wait_ms: float = 5.0,
          workers: int = 1, *, access_log: bool = False, graceful_timeout_s: float | None = None, **options) -> None:
    """Serve model folders over HTTP until SIGINT/SIGTERM, then finish in-flight requests and exit.

    models: model folder paths, "NAME=DIR" to name one (the name defaults to the folder's name), or
    "NAME=DIR@TASK" to serve it with another pipeline than its manifest's task (e.g. sentence-similarity); DIR may
    be a Hugging Face Hub id ORG/NAME, fetched first as pipeline(model=...) fetches it (the `hub` extra).
    workers: inference threads per model. options: the other ServerConfig fields.
    """
    from onnxpipe.hub import resolve_serve_specs

    config = ServerConfig(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, workers=workers, **options)
    models = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    # Hub ids become local folders here, before the server starts: the server reads model folders only
    app = create_app(resolve_serve_specs(models, precision=config.precision), config)
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    grace = graceful_timeout_s if graceful_timeout_s is not None else config.request_timeout_s + 5
    server = _GracefulServer(uvicorn.Config(
        OriginGuard(app, config.allowed_origins), host=host, port=port, access_log=access_log, log_level="info",
        timeout_graceful_shutdown=grace, lifespan="on", timeout_keep_alive=config.keep_alive_s,
        http=guarded_protocol(config.max_connections, config.header_timeout_s)))
    server.pool = app.state.onnxpipe
    app.state.onnxpipe.stop_server = lambda: setattr(server, "should_exit", True)
    server.run()
    if app.state.onnxpipe.load_error is not None:
        raise ValueError(app.state.onnxpipe.load_error)


def create_app(models, config: ServerConfig | None = None, *, load_in_startup: bool = False) -> Starlette:
    """The ASGI app for `models` ("DIR", "NAME=DIR" or "NAME=DIR@TASK"). Models load in the background while /ready
    answers 503; with load_in_startup, the app's startup waits for them and fails if one cannot load (a host that
    routes traffic only to started apps, such as a Ray Serve replica)."""
    config = config or ServerConfig()
    metrics = Metrics()
    # How a failed load stops the server; serve() replaces it with uvicorn's own flag.
    stop = (lambda: None) if load_in_startup else (lambda: os.kill(os.getpid(), signal.SIGTERM))
    pool = ModelPool(parse_model_specs(models), config, metrics, stop_server=stop)
    exchange = Exchange(pool, config, metrics)
    native = NativeRoutes(exchange)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        exchange.loop = asyncio.get_running_loop()
        if load_in_startup:
            await asyncio.to_thread(pool.load)
            if pool.load_error is not None:
                raise RuntimeError(pool.load_error)
        else:
            threading.Thread(target=pool.load, name="onnxpipe-load", daemon=True).start()
        yield
        pool.begin_drain()
        await asyncio.to_thread(pool.close)

    routes = [
        Route("/health", lambda request: JSONResponse({"status": "ok"})),
        Route("/ready", native.ready),
        Route("/metrics", lambda request: Response(metrics.render(), media_type=CONTENT_TYPE)),
        Route("/v1/models", functools.partial(list_models, exchange)),
        Route("/v1/models/{name}", native.predict, methods=["POST"]),
        Route("/v1/chat/completions", ChatCompletions(exchange).endpoint, methods=["POST"]),
        Route("/v1/completions", Completions(exchange).endpoint, methods=["POST"]),
        Route("/v1/embeddings", Embeddings(exchange).endpoint, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, RequestError: _request_error})
    # a trailing-slash redirect would build its URL from the client's Host header: a wrong path is a 404
    app.router.redirect_slashes = False
    app.state.onnxpipe = pool
    return app


class _GracefulServer(uvicorn.Server):
    """Marks the app as draining the moment shutdown begins, before uvicorn waits for open connections."""

    async def shutdown(self, sockets=None):
        self.pool.begin_drain()
        await super().shutdown(sockets)


async def _http_error(request, exc: HTTPException):
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _request_error(request, exc: RequestError):
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)
