"""The OpenAI-compatible routes, driven by the official `openai` client against a real `onnxpipe serve` on loopback:
what the client returns equals what the pipelines return in process, usage included."""
from __future__ import annotations

import base64

import numpy as np
import pytest

import onnxpipe
from test_server import GRACEFUL_EXIT, ServerProcess

openai = pytest.importorskip("openai")

CHAT = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Say hello to the world."}]
MODELS = {"chat": ("llama", "text-generation"), "gen": ("gpt2", "text-generation"),
          "emb": ("bert", "feature-extraction"), "sst": ("bert", "text-classification")}


@pytest.fixture(scope="module")
def dirs(tiny):
    return {name: tiny.export(*src) for name, src in MODELS.items()}


@pytest.fixture(scope="module")
def server(dirs, tmp_path_factory):
    srv = ServerProcess([f"{name}={d}" for name, d in dirs.items()], tmp_path_factory.mktemp("openai"))
    yield srv
    assert srv.stop() in GRACEFUL_EXIT, srv.log()
    assert "Traceback" not in srv.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-checked", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def pipes(dirs):
    return {"chat": onnxpipe.pipeline("text-generation", model=dirs["chat"]),
            "gen": onnxpipe.pipeline("text-generation", model=dirs["gen"]),
            "emb": onnxpipe.pipeline("sentence-similarity", model=dirs["emb"])}


def _prompt_tokens(pipe, value) -> int:
    from onnxpipe.tasks.text_generation import Chat

    item = Chat(value) if isinstance(value, list) else value
    return int(pipe.preprocess(item)["attention_mask"].sum())


def test_models_list(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == set(MODELS)
    assert all(m.object == "model" and m.owned_by == "onnxpipe" and m.created > 0 for m in models.values())
    assert models["chat"].model_extra["task"] == "text-generation"  # onnxpipe's details stay as extra fields


def test_chat_sync_streamed_and_usage(client, pipes):
    kw = dict(model="chat", messages=CHAT, max_tokens=12, temperature=0)
    expected = pipes["chat"](CHAT, max_new_tokens=12, do_sample=False)[0]["generated_text"][-1]["content"]
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.content == expected and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    ids = pipes["chat"](CHAT, max_new_tokens=12, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert r.usage.prompt_tokens == _prompt_tokens(pipes["chat"], CHAT)
    assert r.usage.completion_tokens == len(ids) - r.usage.prompt_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage == r.usage
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason


def test_chat_n_choices(client):
    r = client.chat.completions.create(model="chat", messages=CHAT, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].message.content == r.choices[1].message.content


def test_completions_sync_streamed_echo_and_usage(client, pipes):
    prompt = "Once upon a time"
    expected = pipes["gen"](prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    r = client.completions.create(model="gen", prompt=prompt, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == _prompt_tokens(pipes["gen"], prompt) and r.usage.completion_tokens == 8
    streamed = list(client.completions.create(model="gen", prompt=prompt, max_tokens=8, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected
    assert streamed[-1].usage == r.usage
    echoed = client.completions.create(model="gen", prompt=prompt, max_tokens=8, temperature=0, echo=True)
    assert echoed.choices[0].text == prompt + expected


def test_completions_n_and_prompt_lists(client):
    r = client.completions.create(model="gen", prompt=["a", "b"], max_tokens=4, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    sampled = [client.completions.create(model="gen", prompt="a", max_tokens=6, temperature=1.0, n=2, seed=7)
               for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]  # a seed reproduces all
    assert r.usage.completion_tokens == 16


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings_equal_the_pipeline(client, pipes, encoding):
    texts = ["a first sentence", "and a second, longer one"]
    expected = pipes["emb"](texts)
    for value in (texts[0], texts):
        r = client.embeddings.create(model="emb", input=value, encoding_format=encoding)
        got = [np.frombuffer(base64.b64decode(d.embedding), "<f4") if encoding == "base64" else np.array(d.embedding)
               for d in r.data] if encoding == "base64" else [np.array(d.embedding) for d in r.data]
        want = expected[:1] if isinstance(value, str) else expected
        assert [d.index for d in r.data] == list(range(len(want)))
        np.testing.assert_allclose(np.stack(got), want, rtol=0, atol=1e-6)
        assert r.usage.prompt_tokens > 0


def test_errors_are_the_clients_exception_classes(client):
    with pytest.raises(openai.NotFoundError, match="no model named 'nope'"):
        client.chat.completions.create(model="nope", messages=CHAT)
    with pytest.raises(openai.UnprocessableEntityError, match="tokens"):
        client.completions.create(model="gen", prompt="word " * 5000, max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.chat.completions.create(model="chat", messages=CHAT, temperature=-1)
    with pytest.raises(openai.UnprocessableEntityError, match="dimensions"):
        client.embeddings.create(model="emb", input="x", dimensions=3)
    with pytest.raises(openai.UnprocessableEntityError, match="does not make embeddings"):
        client.embeddings.create(model="sst", input="x")
    with pytest.raises(openai.UnprocessableEntityError, match="not a chat model"):
        client.chat.completions.create(model="gen", messages=CHAT)


def test_completions_budgets_count_every_prompt_and_choice(client):
    """A prompt list and n are one request to the server's budgets, not one request per prompt."""
    with pytest.raises(openai.UnprocessableEntityError, match="--max-inputs"):
        client.completions.create(model="gen", prompt=["a"] * 100, max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match="--max-return-sequences"):
        client.completions.create(model="gen", prompt="a", max_tokens=2, n=20, temperature=1.0)
    with pytest.raises(openai.UnprocessableEntityError, match="--max-generated-tokens"):
        client.completions.create(model="gen", prompt=["a"] * 60, max_tokens=100, n=8, temperature=1.0)

