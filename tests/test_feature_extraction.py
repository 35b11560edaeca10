"""feature-extraction and sentence embeddings: onnxpipe against transformers on the same weights."""
from __future__ import annotations

import copy

import numpy as np
import pytest

import onnxpipe
from conftest import ENCODER_ARCHS, assert_results_close

WEIGHTS = {"initializer_range": 0.2}
TEXTS = {
    "ascii": "A man is eating food.",
    "accents": "Café déjà vu: a naïve résumé from Zürich.",
    "cjk": "東京は日本の首都です。",
    "korean": "한국어 문장입니다",
    "emoji": "so good 🙂🎉👍",
    "whitespace": "   lots \t of   white\n\nspace   ",
    "empty": "",
}
LONG = "the story went on and on, and then it went on some more " * 60  # > 512 tokens
OPTIONS = {
    "default": {},
    "return_tensors": {"return_tensors": True},
    "truncation=True": {"truncation": True},
    "tokenize_kwargs-max_length": {"tokenize_kwargs": {"truncation": True, "max_length": 5}},
    "truncation-and-max_length": {"truncation": True, "tokenize_kwargs": {"max_length": 4}},
    "batch_size=3": {"batch_size": 3},  # each result keeps its batch's padded length, as in transformers
    "batch_size=2,return_tensors": {"batch_size": 2, "return_tensors": True},
}


def _torch_model(ckpt):
    import transformers

    return transformers.AutoModel.from_pretrained(ckpt).eval(), transformers.AutoTokenizer.from_pretrained(ckpt)


@pytest.fixture(scope="module", params=ENCODER_ARCHS)
def pipes(request, tiny):
    import transformers

    arch = request.param
    ours = onnxpipe.pipeline("feature-extraction", model=tiny.export(arch, "feature-extraction", **WEIGHTS))
    model, tokenizer = _torch_model(tiny.checkpoint(arch, "feature-extraction", **WEIGHTS))
    return ours, transformers.pipeline("feature-extraction", model=model, tokenizer=tokenizer)


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_single_text_matches_transformers(pipes, text):
    ours, ref = pipes
    assert_results_close(ours(text), ref(text))


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("kind", ["str", "list"])
def test_options_match_transformers(pipes, options, kind):
    ours, ref = pipes
    inputs = TEXTS["ascii"] if kind == "str" else list(TEXTS.values())
    # transformers writes `truncation` into the tokenize_kwargs dict it is given: each call gets its own
    assert_results_close(ours(inputs, **copy.deepcopy(options)), ref(inputs, **copy.deepcopy(options)))


def test_long_text_is_truncated_like_transformers_with_truncation(pipes):
    ours, ref = pipes
    assert_results_close(ours([LONG, "short"], return_tensors=True), ref([LONG, "short"], return_tensors=True, truncation=True))


def test_truncation_given_twice_fails_like_transformers(pipes):
    for pipe in pipes:
        with pytest.raises(ValueError, match="truncation parameter defined twice"):
            pipe("x", truncation=True, tokenize_kwargs={"truncation": True})


@pytest.mark.parametrize("arch", ENCODER_ARCHS)
def test_int8_gives_well_formed_results(tiny, arch):
    path = tiny.export(arch, "feature-extraction", **WEIGHTS)
    fp32 = onnxpipe.pipeline("feature-extraction", model=path)(TEXTS["ascii"], return_tensors=True)
    int8 = onnxpipe.pipeline("feature-extraction", model=path, precision="int8")(TEXTS["ascii"], return_tensors=True)
    assert int8.shape == fp32.shape and int8.dtype == np.float32 and np.isfinite(int8).all()


# --- sentence embeddings -----------------------------------------------------------------------

def _pool_with_torch(model, tokenizer, texts, pooling, normalize, max_length=512):
    """sentence-transformers' Pooling (+ Normalize) written out on the torch model's hidden states."""
    import torch

    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    if pooling == "cls":
        out = hidden[:, 0]
    elif pooling == "max":
        out = torch.where(mask > 0, hidden, torch.full_like(hidden, -1e9)).max(dim=1).values
    elif pooling == "last":
        out = hidden[torch.arange(hidden.shape[0]), batch["attention_mask"].sum(dim=1) - 1]
    else:
        out = (hidden * mask).sum(dim=1) / torch.clamp(mask.sum(dim=1), min=1e-9)
        if pooling == "mean_sqrt_len":
            out = out * torch.clamp(mask.sum(dim=1), min=1e-9) / torch.sqrt(mask.sum(dim=1))
    if normalize:
        out = torch.nn.functional.normalize(out, p=2, dim=1)
    return out.numpy()


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@pytest.mark.parametrize("pooling", ["mean", "cls", "max", "mean_sqrt_len", "last"])
@pytest.mark.parametrize("arch", ENCODER_ARCHS)
def test_sentence_embeddings_match_torch_pooling(tiny, arch, pooling, normalize):
    embed = onnxpipe.pipeline("embeddings", model=tiny.export(arch, "feature-extraction", **WEIGHTS),
                              pooling=pooling, normalize=normalize, batch_size=3)
    model, tokenizer = _torch_model(tiny.checkpoint(arch, "feature-extraction", **WEIGHTS))
    texts = list(TEXTS.values())
    expected = _pool_with_torch(model, tokenizer, texts, pooling, normalize)
    assert_results_close(embed(texts), expected)
    assert_results_close(embed(texts[1]), expected[1])


def test_sentence_embeddings_default_to_the_manifest(tiny):
    path = tiny.export("bert", "feature-extraction", **WEIGHTS)
    embed = onnxpipe.pipeline("sentence-similarity", model=path)
    config = onnxpipe.read_manifest(path)["sentence_embedding"]
    model, tokenizer = _torch_model(tiny.checkpoint("bert", "feature-extraction", **WEIGHTS))
    expected = _pool_with_torch(model, tokenizer, [TEXTS["ascii"], LONG], config["pooling"], config["normalize"])
    assert_results_close(embed([TEXTS["ascii"], LONG]), expected)


def test_similarity_is_cosine_between_embeddings(tiny):
    embed = onnxpipe.pipeline("embeddings", model=tiny.export("roberta", "feature-extraction", **WEIGHTS))
    a, b = list(TEXTS.values())[:3], list(TEXTS.values())[3:]
    ea, eb = embed(a), embed(b)
    expected = np.array([[x @ y / np.linalg.norm(x) / np.linalg.norm(y) for y in eb] for x in ea])
    assert_results_close(embed.similarity(a, b), expected, atol=1e-5)
    assert_results_close(embed.similarity(ea, b), expected, atol=1e-5)
    assert embed.similarity(TEXTS["ascii"], TEXTS["ascii"]) == pytest.approx(np.ones((1, 1)), abs=1e-5)


@pytest.mark.slow
def test_minilm_sentence_embeddings_match_torch_mean_pooling():
    from conftest import real_checkpoint, real_export

    ckpt = real_checkpoint("minilm")
    out = real_export("minilm")  # shared with test_export's MiniLM test
    sentences = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
                 "Café crème à Zürich 🙂", "東京は日本の首都です。", "한국어 문장입니다", ""]
    model, tokenizer = _torch_model(ckpt)
    expected = _pool_with_torch(model, tokenizer, sentences, "mean", True, max_length=256)
    embed = onnxpipe.pipeline("embeddings", model=out, batch_size=4)
    got = embed(sentences)
    assert got.shape == (len(sentences), 384)
    cosine = (got * expected).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() > 0.9999, cosine
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # semantics survive: the two food sentences are closer to each other than to the baby one
    sim = embed.similarity(sentences[:3], sentences[:3])
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[1, 2]


# --- bad input ---------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["feature-extraction", "embeddings"])
def extractor(request, tiny):
    return onnxpipe.pipeline(request.param, model=tiny.export("bert", "feature-extraction"))


@pytest.mark.parametrize("inputs, error, match", [
    (3, TypeError, "got int"),
    (None, TypeError, "got NoneType"),
    (["ok", b"bytes"], TypeError, r"inputs\[1\]"),
    ([], ValueError, "empty list"),
], ids=["int", "None", "list-with-bytes", "empty-list"])
def test_bad_inputs_raise_clear_errors(extractor, inputs, error, match):
    with pytest.raises(error, match=match):
        extractor(inputs)


def test_unknown_kwargs_are_named(extractor):
    with pytest.raises(TypeError, match="return_tensor"):
        extractor("x", return_tensor=True)


@pytest.mark.parametrize("options, error, match", [
    ({"pooling": "median"}, ValueError, "pooling"),
    ({"max_length": 0}, ValueError, "max_length"),
], ids=["unknown-pooling", "max_length-zero"])
def test_bad_embedding_options_raise_clear_errors(tiny, options, error, match):
    embed = onnxpipe.pipeline("embeddings", model=tiny.export("bert", "feature-extraction"))
    with pytest.raises(error, match=match):
        embed("x", **options)


@pytest.mark.parametrize("options, error, match", [
    ({"tokenize_kwargs": {"max_len": 3}}, TypeError, "max_len"),
    ({"tokenize_kwargs": ["truncation"]}, TypeError, "tokenize_kwargs"),
    ({"tokenize_kwargs": {"padding": "sometimes"}}, ValueError, "padding"),
], ids=["unknown-tokenize-kwarg", "tokenize_kwargs-list", "bad-padding"])
def test_bad_tokenize_kwargs_raise_clear_errors(tiny, options, error, match):
    extract = onnxpipe.pipeline("feature-extraction", model=tiny.export("bert", "feature-extraction"))
    with pytest.raises(error, match=match):
        extract("x", **options)


@pytest.mark.parametrize("task", ["feature-extraction", "sentence-similarity"])
def test_model_exported_for_another_task_is_refused(tiny, task):
    with pytest.raises(ValueError, match="exported for 'text-classification'"):
        onnxpipe.pipeline(task, model=tiny.export("bert", "text-classification"))
