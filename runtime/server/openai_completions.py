"""OpenAI-style `POST /v1/completions` (plain prompt completion) for text-generation models.

A prompt string or a list of them; `n` choices per prompt (index = prompt * n + choice, as OpenAI numbers them);
`echo` puts the prompt before each text; usage counts every prompt's tokens and every new token. Streamed with
one prompt and n = 1. max_tokens defaults to 16, as OpenAI's does on this route.
"""
from __future__ import annotations

import uuid

from starlette.responses import JSONResponse

from onnxpipe.base import RequestInputs

from .errors import RequestError
from .exchange import sse
from .openai_common import OpenAIRoute, generate_choices, now, open_generation, usage

SUPPORTED_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
                    "n", "echo", "user", "logprobs", "best_of", "presence_penalty", "frequency_penalty")
DEFAULT_MAX_TOKENS = 16


class Completions(OpenAIRoute):
    path = "/v1/completions"

    async def answer(self, request, body: dict):
        exchange = self.exchange
        call = open_generation(exchange, body, needs_chat=False, fields=SUPPORTED_FIELDS,
                               default_max_tokens=DEFAULT_MAX_TOKENS, return_full_text=False)
        worker, options = call.worker, call.options
        prompts = _prompts(body.get("prompt"))
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise RequestError(422, "'echo' must be true or false")
        if body.get("logprobs") is not None:
            raise RequestError(422, "logprobs is not supported")
        if body.get("best_of") not in (None, 1):
            raise RequestError(422, "best_of is not supported (only 1)")
        if call.stream and len(prompts) > 1:
            raise RequestError(422, "a streamed completion takes one prompt")
        # the prompts as one request: the server's budgets count all of them, times n
        checked = await exchange.check_inputs(worker, body["prompt"], options, where="prompt", copies=call.n)
        singles = [RequestInputs([item], False, None if checked.lengths is None else [checked.lengths[i]])
                   for i, item in enumerate(checked.items)]
        completion_id, created, name = f"cmpl-{uuid.uuid4().hex}", now(), body["model"]

        def chunk(choices: list, **extra) -> dict:
            return {"id": completion_id, "object": "text_completion", "created": created, "model": name,
                    "choices": choices, **extra}

        def choice(index: int, text: str, reason) -> dict:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

        if call.stream:
            first = [echo]

            def render(piece: str) -> bytes:
                text = prompts[0] + piece if first[0] else piece
                first[0] = False
                return sse(chunk([choice(0, text, None)]))

            def finish(end) -> list[bytes]:
                events = [sse(chunk([choice(0, "", end.finish_reason)]))]
                if call.with_usage:
                    events.append(sse(chunk([], usage=usage(end.prompt_tokens, end.new_tokens))))
                return events

            return exchange.stream(worker, singles[0], options, render, finish)

        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, inputs in enumerate(singles):
            ends = await generate_choices(exchange, request, call, inputs)
            prompt_tokens += ends[0].prompt_tokens
            for j, end in enumerate(ends):
                text = end.result[0]["generated_text"]
                choices.append(choice(i * call.n + j, prompts[i] + text if echo else text, end.finish_reason))
                completion_tokens += end.new_tokens
        return JSONResponse({"id": completion_id, "object": "text_completion", "created": created, "model": name,
                             "choices": choices, "usage": usage(prompt_tokens, completion_tokens)})


def _prompts(prompt) -> list[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    raise RequestError(422, "'prompt' must be a string or a non-empty list of strings (token-id prompts are not "
                            "supported)")
