"""OpenAI-style `POST /v1/chat/completions` for text-generation models whose manifest has a chat template.

The request's OpenAI fields become the pipeline's transformers keywords (max_tokens ->
max_new_tokens, temperature 0 -> greedy, stop -> stop_strings) and the messages go to
`pipe(messages, ...)` as a chat; the answer is the assistant message the pipeline appends, with
`usage` (the rendered chat's tokens, the new tokens) and one choice per `n`.
"""
from __future__ import annotations

import uuid

from starlette.responses import JSONResponse

from .errors import RequestError
from .exchange import sse
from .openai_common import OpenAIRoute, generate_choices, now, open_generation, usage

SUPPORTED_FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
                    "stop", "stream", "stream_options", "n", "user", "presence_penalty", "frequency_penalty")


class ChatCompletions(OpenAIRoute):
    path = "/v1/chat/completions"

    async def answer(self, request, body: dict):
        exchange = self.exchange
        call = open_generation(exchange, body, needs_chat=True, fields=SUPPORTED_FIELDS)
        worker, options = call.worker, call.options
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(422, "'messages' must be a non-empty list of {'role': str, 'content': str} objects")
        inputs = await exchange.check_inputs(worker, messages, options, where="messages", copies=call.n)
        if inputs.is_list:
            raise RequestError(422, "'messages' must be one chat: a list of {'role': str, 'content': str} objects")
        completion_id, created, name = f"chatcmpl-{uuid.uuid4().hex}", now(), body["model"]

        def chunk(choices: list, **extra) -> dict:
            return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": choices, **extra}

        if call.stream:
            started = False

            def render(piece: str) -> bytes:
                nonlocal started
                delta = {"content": piece} if started else {"role": "assistant", "content": piece}
                started = True
                return sse(chunk([{"index": 0, "delta": delta, "finish_reason": None}]))

            def finish(end) -> list[bytes]:
                # "length" when cut by max_tokens or the context window, else "stop"
                events = [sse(chunk([{"index": 0, "delta": {}, "finish_reason": end.finish_reason}]))]
                if call.with_usage:  # OpenAI's last chunk: no choices, the usage
                    events.append(sse(chunk([], usage=usage(end.prompt_tokens, end.new_tokens))))
                return events

            return exchange.stream(worker, inputs, options, render, finish)

        ends = await generate_choices(exchange, request, call, inputs)
        choices = [{"index": i, "message": {"role": "assistant", "content": end.result[0]["generated_text"][-1]["content"]},
                    "logprobs": None, "finish_reason": end.finish_reason} for i, end in enumerate(ends)]
        return JSONResponse({"id": completion_id, "object": "chat.completion", "created": created, "model": name,
                             "choices": choices,
                             "usage": usage(ends[0].prompt_tokens, sum(end.new_tokens for end in ends))})
