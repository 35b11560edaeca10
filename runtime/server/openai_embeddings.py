"""OpenAI-style `POST /v1/embeddings` for sentence-embedding models (a feature-extraction export, pooled as its
manifest says, or one served @sentence-similarity).

`input` is a string or a list of strings; `encoding_format` "float" (lists) or "base64" (little-endian float32, as
OpenAI sends them); `dimensions` only as the model's own size. Requests are batched across clients like the other
encoder routes: the embedding work runs through the model's worker, and the OpenAI body is made in its thread.
"""
from __future__ import annotations

import base64

import numpy as np
from starlette.responses import Response

from .errors import RequestError
from .openai_common import OpenAIRoute, check_fields

SUPPORTED_FIELDS = ("model", "input", "encoding_format", "dimensions", "user")


class Embeddings(OpenAIRoute):
    path = "/v1/embeddings"

    async def answer(self, request, body: dict):
        exchange, pool = self.exchange, self.exchange.pool
        name = body.get("model")
        if not isinstance(name, str):
            raise RequestError(422, f"'model' must name a loaded embedding model: {', '.join(pool.embedding_models())}")
        worker = pool.worker(name)
        pipe = worker.pipe.embedding_pipeline()
        if pipe is None:
            raise RequestError(422, f"model {name!r} ({worker.task}) does not make embeddings; embedding models here: "
                                    f"{', '.join(pool.embedding_models()) or 'none'}")
        check_fields(body, SUPPORTED_FIELDS)
        value = body.get("input")
        if not (isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value))):
            raise RequestError(422, "'input' must be a string or a non-empty list of strings (token-id inputs are not "
                                    "supported)")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise RequestError(422, f"encoding_format must be \"float\" or \"base64\", got {encoding!r}")
        dimensions = body.get("dimensions")
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)):
            raise RequestError(422, f"dimensions must be an integer, got {dimensions!r}")
        options = exchange.check_parameters(worker, {}, pipe=pipe)
        inputs = await exchange.check_inputs(worker, value, options, where="input", pipe=pipe)
        tokens = inputs.tokens or 0

        def render(result) -> dict:  # in the worker thread
            vectors = [np.asarray(v, dtype=np.float32) for v in (result if inputs.is_list else [result])]
            if dimensions is not None and dimensions != vectors[0].shape[-1]:
                raise ValueError(f"dimensions={dimensions} is not supported: model {name!r} makes embeddings of "
                                 f"{vectors[0].shape[-1]} dimensions only")
            data = [{"object": "embedding", "index": i,
                     "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding == "base64"
                     else v.tolist()} for i, v in enumerate(vectors)]
            return {"object": "list", "data": data, "model": name,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

        body_bytes = await exchange.run(request, worker, inputs, options, pipe=pipe, render=render)
        return Response(body_bytes, media_type="application/json")
