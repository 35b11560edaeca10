"""The direct API (`onnxpipe.load`, `onnxpipe.AutoModel.from_dir`): the same feeds and outputs as
transformers' tokenizer + model on the same weights."""
from __future__ import annotations

import numpy as np
import pytest

import onnxpipe
from conftest import ENCODER_ARCHS, assert_results_close

WEIGHTS = {"initializer_range": 0.2}
TEXTS = ["I love this movie!", "Café déjà vu à Zürich", "東京 한국어 🙂", "", "   spaced   out   "]
PAIRS = ["and the pair", "", "🙂", "x", "y z"]
# export task -> (transformers Auto class, the output compared)
HEADS = {
    "text-classification": ("AutoModelForSequenceClassification", "logits"),
    "fill-mask": ("AutoModelForMaskedLM", "logits"),
    "feature-extraction": ("AutoModel", "last_hidden_state"),
}


def _torch(ckpt, task):
    import transformers

    model = getattr(transformers, HEADS[task][0]).from_pretrained(ckpt).eval()
    return model, transformers.AutoTokenizer.from_pretrained(ckpt)


@pytest.mark.parametrize("pairs", [None, PAIRS], ids=["texts", "text-pairs"])
@pytest.mark.parametrize("task", HEADS)
@pytest.mark.parametrize("arch", ENCODER_ARCHS)
def test_feeds_and_outputs_match_transformers(tiny, arch, task, pairs):
    import torch

    model = onnxpipe.load(tiny.export(arch, task, **WEIGHTS))
    ref_model, ref_tokenizer = _torch(tiny.checkpoint(arch, task, **WEIGHTS), task)
    feeds = model.tokenizer(TEXTS, pairs)
    expected = ref_tokenizer(TEXTS, pairs, padding=True, truncation=True, return_tensors="pt")
    expected = {k: v for k, v in expected.items() if k in model.input_names}
    assert set(feeds) == set(expected)
    for name in feeds:
        assert feeds[name].dtype == np.int64
        np.testing.assert_array_equal(feeds[name], expected[name].numpy(), err_msg=name)
    name = HEADS[task][1]
    with torch.no_grad():
        want = getattr(ref_model(**expected), name).numpy()
    assert_results_close(getattr(model(**feeds), name), want)


def test_auto_model_from_dir_is_load(tiny):
    path = tiny.export("distilbert", "text-classification", **WEIGHTS)
    a, b = onnxpipe.AutoModel.from_dir(path), onnxpipe.load(path)
    feeds = a.tokenizer("a single text")
    assert feeds["input_ids"].shape[0] == 1 and "token_type_ids" not in feeds  # DistilBERT takes none
    np.testing.assert_array_equal(a(**feeds)["logits"], b(**feeds).logits)
    assert a.id2label == {0: "NEGATIVE", 1: "POSITIVE"}


def test_long_text_is_cut_at_the_model_length(tiny):
    model = onnxpipe.load(tiny.export("roberta", "feature-extraction"))
    feeds = model.tokenizer(["word " * 800, "short"])
    assert feeds["input_ids"].shape == (2, 512)
    assert model(**feeds).last_hidden_state.shape[:2] == (2, 512)
    assert model.tokenizer("word " * 800, max_length=16)["input_ids"].shape == (1, 16)


def test_tokenizer_passes_decoding_through(tiny):
    model = onnxpipe.load(tiny.export("bert", "fill-mask"))
    ids = model.tokenizer(f"hello {model.tokenizer.mask_token}")["input_ids"][0]
    assert model.tokenizer.decode(ids, skip_special_tokens=True) == "hello"


# --- bad input ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny):
    return onnxpipe.load(tiny.export("bert", "text-classification"))


@pytest.mark.parametrize("feeds, error, match", [
    ({"input_ids": np.ones((1, 3), np.int64), "attention_mask": np.ones((1, 3), np.int64),
      "token_type_ids": np.zeros((1, 3), np.int64), "input_id": np.ones((1, 3), np.int64)}, TypeError, "input_id"),
    ({"input_ids": np.ones((1, 3), np.float32)}, ValueError, "input_ids must be integer ids"),
    ({"input_ids": np.ones(3, np.int64)}, ValueError, r"input_ids must be integer ids shaped \[batch, sequence\]"),
    ({"input_ids": np.ones((1, 3), np.int64)}, ValueError, "attention_mask"),
], ids=["unknown-feed", "float-ids", "1-d-ids", "missing-feed"])
def test_bad_feeds_raise_clear_errors(model, feeds, error, match):
    with pytest.raises(error, match=match):
        model(**feeds)


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((3,), {}, TypeError, "text must be"),
    ((None,), {}, TypeError, "text must be"),
    ((["ok", 1],), {}, TypeError, r"text\[1\]"),
    (([],), {}, ValueError, "empty list"),
    ((["a", "b"], ["only one"]), {}, ValueError, "text_pair"),
    ((["a", "b c d"],), {"padding": False}, ValueError, "padding=True"),
    (("a",), {"return_tensors": "pt"}, ValueError, "numpy"),
], ids=["int", "None", "list-with-int", "empty-list", "pair-count", "ragged-without-padding", "torch-tensors"])
def test_bad_tokenizer_inputs_raise_clear_errors(model, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.tokenizer(*args, **kwargs)


def test_missing_dir_and_generation_dirs_are_clear_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        onnxpipe.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="use onnxpipe.pipeline"):
        onnxpipe.load(tiny.export("t5", "text2text-generation"))


def test_unknown_output_attribute_names_the_outputs(model):
    with pytest.raises(AttributeError, match="no output 'logit' .*logits"):
        model(**model.tokenizer("x")).logit
