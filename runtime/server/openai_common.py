"""What the OpenAI-compatible routes share: their error body, the model list, request fields -> the text-generation
pipeline's keywords, several choices per request, and usage counts.

The official `openai` client reads these shapes (tests/test_openai.py drives a real server with it).
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from starlette.responses import JSONResponse

from onnxpipe.base import CallOptions

from .errors import RequestError
from .exchange import Exchange


class OpenAIRoute:
    """A POST route in OpenAI's shape: subclasses set `path` and write `answer(request, body)`."""

    path = ""

    def __init__(self, exchange: Exchange):
        self.exchange = exchange

    async def endpoint(self, request):
        return await self.exchange.handle(request, self.path, None, self.answer, error_body)

    async def answer(self, request, body: dict):
        raise NotImplementedError


def error_body(e: RequestError) -> dict:
    """OpenAI's error shape; the status codes stay onnxpipe's (the client picks its exception class from them)."""
    kind = "server_error" if e.status >= 500 else "invalid_request_error"
    code = "model_not_found" if e.status == 404 else None
    return {"error": {"message": e.message, "type": kind, "param": None, "code": code}}


async def list_models(exchange: Exchange, request):
    """GET /v1/models: OpenAI's list of models, each with onnxpipe's own details beside OpenAI's four fields."""
    pool = exchange.pool
    data = [{"id": name, "object": "model", "created": pool.loaded_at.get(name, 0), "owned_by": "onnxpipe",
             **pool.describe(name)} for name in pool.workers]
    return JSONResponse({"object": "list", "data": data})


def check_fields(body: dict, supported: tuple[str, ...]) -> None:
    unknown = sorted(set(body) - set(supported))
    if unknown:
        raise RequestError(422, f"unsupported field(s) {', '.join(unknown)}: this route takes {', '.join(supported)}")


def generation_worker(exchange: Exchange, body: dict, needs_chat: bool):
    """The text-generation model the body names (a chat model when `needs_chat`), or the RequestError saying why not."""
    pool = exchange.pool
    name = body.get("model")
    kinds = pool.chat_models() if needs_chat else pool.generation_models()
    what = "chat model (a text-generation model with a chat template)" if needs_chat else "text-generation model"
    if not isinstance(name, str):
        raise RequestError(422, f"'model' must name a loaded {what}: {', '.join(kinds) or 'none here'}")
    worker = pool.worker(name)
    if name not in kinds:
        raise RequestError(422, f"model {name!r} ({worker.task}) is not a {what}; those here: {', '.join(kinds) or 'none'}")
    return worker


def pipeline_parameters(body: dict, default_max_tokens: int | None = None) -> dict:
    """OpenAI request fields -> the text-generation pipeline's keyword arguments."""
    params = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max_tokens))
    if max_tokens is not None:
        params["max_new_tokens"] = max_tokens
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or temperature < 0:
            raise RequestError(422, f"temperature must be a number >= 0, got {temperature!r}")
        # OpenAI's temperature 0 means the most likely token each time: transformers' greedy search.
        params.update({"do_sample": False} if temperature == 0 else {"do_sample": True, "temperature": temperature})
    if body.get("top_p") is not None:
        params["top_p"] = body["top_p"]
    if body.get("seed") is not None:
        params["seed"] = body["seed"]
    stop = body.get("stop")
    if stop is not None:
        params["stop_strings"] = [stop] if isinstance(stop, str) else stop
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise RequestError(422, f"{name} is not supported (only 0); repetition is controlled by the model's "
                                    "own generation settings")
    return params


@dataclass
class GenerationCall:
    """What the chat and completions routes read off a request alike, checked once."""

    worker: object
    stream: bool
    n: int                 # choices asked for
    with_usage: bool       # stream_options.include_usage
    options: CallOptions   # the pipeline's options, checked once


def open_generation(exchange: Exchange, body: dict, *, needs_chat: bool, fields: tuple[str, ...],
                    default_max_tokens: int | None = None, **pipeline_options) -> GenerationCall:
    """The model, the fields, stream / n / stream_options, and the pipeline options (OpenAI's fields translated,
    plus the route's own), each refused with a 422 naming what was wrong."""
    worker = generation_worker(exchange, body, needs_chat)
    check_fields(body, fields)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(422, "'stream' must be true or false")
    n = body.get("n", 1)
    if n is None:
        n = 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RequestError(422, f"n must be a positive integer, got {n!r}")
    if n > 1 and stream:
        raise RequestError(422, "n > 1 is answered whole, not streamed: pass stream=false, or n=1")
    options = exchange.check_parameters(worker, {**pipeline_parameters(body, default_max_tokens), **pipeline_options})
    return GenerationCall(worker, stream, n, _include_usage(body, stream), options)


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise RequestError(422, "stream_options is only allowed with stream=true")
    if not isinstance(options, dict) or set(options) - {"include_usage"} or \
            not isinstance(options.get("include_usage", False), bool):
        raise RequestError(422, "stream_options must be {\"include_usage\": true|false}")
    return bool(options.get("include_usage"))


async def generate_choices(exchange: Exchange, request, call: GenerationCall, inputs):
    """call.n generations of one input, as StreamEnds (result, new tokens, finish reason, prompt tokens). Greedy
    ones are the same every time: generated once. Sampled ones run as n requests with seeds seed, seed+1, ... (or
    none), so that a seed still makes the whole answer reproducible while the choices differ."""
    pipe = call.worker.pipe
    if call.n == 1 or not pipe.generation_work(call.options).sampled:
        return [await exchange.collect(request, call.worker, inputs, call.options)] * call.n
    return await asyncio.gather(*(exchange.collect(request, call.worker, inputs, pipe.reseeded(call.options, j))
                                  for j in range(call.n)))


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())
