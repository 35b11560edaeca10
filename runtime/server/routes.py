"""onnxpipe's own routes: readiness, and `POST /v1/models/{name}` (any task, through the pipeline's
request contract: this file names no task)."""
from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .errors import RequestError
from .exchange import Exchange, sse

PREDICT_FIELDS = ("inputs", "parameters", "stream")


class NativeRoutes:
    def __init__(self, exchange: Exchange):
        self.exchange = exchange
        self.pool = exchange.pool

    async def ready(self, request: Request):
        pool = self.pool
        if pool.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        if not pool.ready:
            status = "failed: " + pool.load_error if pool.load_error else "loading"
            return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})
        return JSONResponse({"status": "ready", "models": {n: w.task for n, w in pool.workers.items()}})

    async def predict(self, request: Request):
        return await self.exchange.handle(request, "/v1/models/{name}", request.path_params["name"], self._predict)

    async def _predict(self, request: Request, body: dict):
        exchange = self.exchange
        worker = self.pool.worker(request.path_params["name"])
        unknown = sorted(set(body) - set(PREDICT_FIELDS))
        if unknown:
            raise RequestError(422, f"unknown field(s) {', '.join(unknown)}: the body takes 'inputs', "
                                    "'parameters' and 'stream'")
        options = exchange.check_parameters(worker, body.get("parameters"))
        inputs = await exchange.check_inputs(worker, body.get("inputs"), options)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(422, f"'stream' must be true or false, got {json.dumps(stream)}")
        if stream:
            if not worker.pipe.streams:
                raise RequestError(422, f"model {worker.name!r} ({worker.task}) cannot stream: streaming is for "
                                        "text-generation models")
            if inputs.is_list:
                raise RequestError(422, "a streamed request takes one prompt or chat, not a list")
            return exchange.stream(worker, inputs, options, lambda piece: sse({"token": piece}),
                                   lambda end: [sse({"result": end.result})])
        return Response(await exchange.run(request, worker, inputs, options), media_type="application/json")
