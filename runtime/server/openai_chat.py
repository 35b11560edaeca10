"""OpenAI-style `POST /v1/chat/completions` for text-generation models whose manifest has a chat template.

The request's OpenAI fields become the pipeline's transformers keywords (max_tokens ->
max_new_tokens, temperature 0 -> greedy, stop -> stop_strings) and the messages go to
`pipe(messages, ...)` as a chat; the answer is the assistant message the pipeline appends.
"""
from __future__ import annotations

import time
import uuid

from starlette.responses import JSONResponse

from .errors import RequestError
from .exchange import Exchange, sse

SUPPORTED_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
                    "stop", "stream", "n", "user")


class ChatCompletions:
    def __init__(self, exchange: Exchange):
        self.exchange = exchange
        self.pool = exchange.pool

    async def endpoint(self, request):
        return await self.exchange.handle(request, "/v1/chat/completions", None, self._complete)

    async def _complete(self, request, body: dict):
        return await chat_completion(self.exchange, request, body)


async def chat_completion(exchange: Exchange, request, body: dict):
    pool = exchange.pool
    name = body.get("model")
    if not isinstance(name, str):
        raise RequestError(422, f"'model' must name a loaded chat model: {', '.join(pool.chat_models())}")
    worker = pool.worker(name)
    if not worker.pipe.chats:
        raise RequestError(422, f"model {name!r} ({worker.task}) is not a chat model (a text-generation model with a "
                                f"chat template); chat models here: {', '.join(pool.chat_models()) or 'none'}")
    unknown = sorted(set(body) - set(SUPPORTED_FIELDS))
    if unknown:
        raise RequestError(422, f"unsupported field(s) {', '.join(unknown)}: this server takes {', '.join(SUPPORTED_FIELDS)}")
    if body.get("n", 1) != 1:
        raise RequestError(422, "n must be 1: one choice per request")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(422, "'messages' must be a non-empty list of {'role': str, 'content': str} objects")
    options = exchange.check_parameters(worker, pipeline_parameters(body))
    inputs = await exchange.check_inputs(worker, messages, options, where="messages")
    if inputs.is_list:
        raise RequestError(422, "'messages' must be one chat: a list of {'role': str, 'content': str} objects")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(422, "'stream' must be true or false")
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def finish_reason(end) -> str:  # "length" when cut by max_tokens or the context window, else "stop"
        return end.finish_reason

    def chunk(delta: dict, reason=None) -> dict:
        return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}

    if stream:
        started = False

        def render(piece: str) -> bytes:
            nonlocal started
            delta = {"content": piece} if started else {"role": "assistant", "content": piece}
            started = True
            return sse(chunk(delta))

        return exchange.stream(worker, inputs, options, render, lambda end: [sse(chunk({}, finish_reason(end)))])

    end = await exchange.collect(request, worker, inputs, options)
    message = end.result[0]["generated_text"][-1]
    return JSONResponse({"id": completion_id, "object": "chat.completion", "created": created, "model": name,
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": message["content"]},
                                      "finish_reason": finish_reason(end)}]})


def pipeline_parameters(body: dict) -> dict:
    """OpenAI request fields -> the text-generation pipeline's keyword arguments."""
    params = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
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
    return params
