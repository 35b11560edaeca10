"""OpenAI-style `POST /v1/completions` (plain prompt completion) for text-generation models.

A prompt string or a list of them; `n` choices per prompt (index = prompt * n + choice, as OpenAI numbers them);
`echo` puts the prompt before each text; usage counts every prompt's tokens and every new token. Streamed with
one prompt and n = 1. max_tokens defaults to 16, as OpenAI's does on this route.
"""
from __future__ import annotations

import uuid

from starlette.responses import JSONResponse

from .errors import RequestError
from .exchange import sse
from .openai_common import (OpenAIRoute, check_fields, choice_count, generate_choices, generation_worker,
                            include_usage, now, pipeline_parameters, usage)

SUPPORTED_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
                    "n", "echo", "user", "logprobs", "best_of", "presence_penalty", "frequency_penalty")
DEFAULT_MAX_TOKENS = 16


class Completions(OpenAIRoute):
    path = "/v1/completions"

    async def answer(self, request, body: dict):
        exchange = self.exchange
        worker = generation_worker(exchange, body, needs_chat=False)
        check_fields(body, SUPPORTED_FIELDS)
        prompts = _prompts(body.get("prompt"))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(422, "'stream' must be true or false")
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise RequestError(422, "'echo' must be true or false")
        if body.get("logprobs") is not None:
            raise RequestError(422, "logprobs is not supported")
        if body.get("best_of") not in (None, 1):
            raise RequestError(422, "best_of is not supported (only 1)")
        n, with_usage = choice_count(body, stream), include_usage(body, stream)
        if stream and len(prompts) > 1:
            raise RequestError(422, "a streamed completion takes one prompt")
        params = {**pipeline_parameters(body, DEFAULT_MAX_TOKENS), "return_full_text": False}
        options = exchange.check_parameters(worker, params)
        checked = [await exchange.check_inputs(worker, p, options, where="prompt") for p in prompts]
        completion_id, created, name = f"cmpl-{uuid.uuid4().hex}", now(), body["model"]

        def chunk(choices: list, **extra) -> dict:
            return {"id": completion_id, "object": "text_completion", "created": created, "model": name,
                    "choices": choices, **extra}

        def choice(index: int, text: str, reason) -> dict:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

        if stream:
            first = [echo]

            def render(piece: str) -> bytes:
                text = prompts[0] + piece if first[0] else piece
                first[0] = False
                return sse(chunk([choice(0, text, None)]))

            def finish(end) -> list[bytes]:
                events = [sse(chunk([choice(0, "", end.finish_reason)]))]
                if with_usage:
                    events.append(sse(chunk([], usage=usage(end.prompt_tokens, end.new_tokens))))
                return events

            return exchange.stream(worker, checked[0], options, render, finish)

        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, inputs in enumerate(checked):
            ends = await generate_choices(exchange, request, worker, inputs, params, n)
            prompt_tokens += ends[0].prompt_tokens
            for j, end in enumerate(ends):
                text = end.result[0]["generated_text"]
                choices.append(choice(i * n + j, prompts[i] + text if echo else text, end.finish_reason))
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
