"""feature-extraction (hidden states, as transformers gives them) and sentence-similarity (pooled sentence embeddings).

    extract("a text")                      -> nested lists [1][seq][hidden], as transformers returns them
    extract("a text", return_tensors=True) -> numpy array [1, seq, hidden]
    embed("a text")                        -> numpy array [hidden]     (sentence-transformers' encode)
    embed(["a", "b"])                      -> numpy array [2, hidden]
"""
from __future__ import annotations

import numpy as np

from ..base import check_bool
from ._common import EncoderPipeline, check_choice, check_positive_int, check_texts, check_tokenizer_kwargs, encode

POOLING = ("mean", "cls", "max", "mean_sqrt_len", "last")


class FeatureExtractionPipeline(EncoderPipeline):
    """The base model's first output (last_hidden_state) per text.

    truncation, tokenize_kwargs (dict of truncation, max_length, padding, add_special_tokens) and
    return_tensors as in transformers. With batch_size > 1 each result keeps its batch's padded
    length, as transformers' does.
    """

    task = "feature-extraction"
    model_tasks = ("feature-extraction",)

    # With batch_size > 1 each result keeps its batch's padded length (as transformers' does): joining requests
    # would change what each one gets back.
    joins_requests = False

    def run(self, inputs, options, *, batch_size=None):
        check_texts(inputs, "inputs")
        return super().run(inputs, options, batch_size=batch_size)

    def embedding_pipeline(self) -> "SentenceEmbeddingPipeline":
        """Sentence embeddings of the same model (its sessions shared), pooled as its manifest says."""
        if getattr(self, "_embedder", None) is None:
            self._embedder = SentenceEmbeddingPipeline(self.model)
        return self._embedder

    def _sanitize_parameters(self, truncation=None, tokenize_kwargs=None, return_tensors=None, **kwargs):
        if kwargs:
            super()._sanitize_parameters(**kwargs)
        if tokenize_kwargs is None:
            tokenize_kwargs = {}
        elif not isinstance(tokenize_kwargs, dict):
            raise TypeError(f"tokenize_kwargs must be a dict, got {type(tokenize_kwargs).__name__}")
        if truncation is not None:
            if "truncation" in tokenize_kwargs:
                raise ValueError("truncation parameter defined twice (given as keyword argument as well as in "
                                 "tokenize_kwargs)")
            tokenize_kwargs = {**tokenize_kwargs, "truncation": truncation}
        postprocess_params = {}
        if return_tensors is not None:
            postprocess_params["return_tensors"] = check_bool(return_tensors, "return_tensors")
        return check_tokenizer_kwargs(tokenize_kwargs, "tokenize_kwargs"), {}, postprocess_params

    def preprocess(self, inputs, **tokenize_kwargs) -> dict[str, np.ndarray]:
        return encode(self.tokenizer, inputs, **tokenize_kwargs)

    def postprocess(self, model_outputs, return_tensors=False):
        hidden = model_outputs[self.model.session().output_names[0]]
        return hidden if return_tensors else hidden.tolist()


class SentenceEmbeddingPipeline(EncoderPipeline):
    """Sentence embeddings from a feature-extraction export, pooled as sentence-transformers pools them.

    pooling ('mean' | 'cls' | 'max' | 'mean_sqrt_len' | 'last') and normalize default to the
    manifest's `sentence_embedding` (read from the checkpoint's modules.json at export).
    max_length defaults to the manifest's max_seq_length when it has one, else the model's max length.
    """

    task = "sentence-similarity"
    model_tasks = ("feature-extraction",)

    def run(self, inputs, options, *, batch_size=None):
        _, single = check_texts(inputs, "inputs")
        result = super().run(inputs, options, batch_size=batch_size)
        return result if single else np.stack(result)

    def texts_to_measure(self, item, options):
        return None  # cut at max_seq_length, as sentence-transformers does

    def embedding_pipeline(self) -> "SentenceEmbeddingPipeline":
        return self

    def _sanitize_parameters(self, pooling=None, normalize=None, max_length=None, **kwargs):
        if kwargs:
            super()._sanitize_parameters(**kwargs)
        pre, post = {}, {}
        if max_length is not None:
            pre["max_length"] = check_positive_int(max_length, "max_length")
        if pooling is not None:
            post["pooling"] = check_choice(pooling, POOLING, "pooling")
        if normalize is not None:
            post["normalize"] = check_bool(normalize, "normalize")
        return pre, {}, post

    @property
    def _config(self) -> dict:
        return self.manifest.get("sentence_embedding") or {}

    def preprocess(self, inputs, max_length=None) -> dict[str, np.ndarray]:
        return encode(self.tokenizer, inputs, max_length=max_length or self._config.get("max_seq_length"))

    def postprocess(self, model_outputs, pooling=None, normalize=None) -> np.ndarray:
        hidden = model_outputs[self.model.session().output_names[0]][0]
        mask = model_outputs["attention_mask"][0]
        embedding = pool(hidden, mask, pooling or self._config.get("pooling", "mean"))
        if self._config.get("normalize", False) if normalize is None else normalize:
            # torch.nn.functional.normalize, as sentence-transformers' Normalize module applies it.
            embedding = embedding / max(float(np.linalg.norm(embedding)), 1e-12)
        return embedding.astype(np.float32)

    def similarity(self, a, b) -> np.ndarray:
        """Cosine similarity matrix [len(a), len(b)] between texts (or embeddings already computed)."""
        ea, eb = (np.atleast_2d(x if isinstance(x, np.ndarray) else self(x)) for x in (a, b))
        ea = ea / np.maximum(np.linalg.norm(ea, axis=-1, keepdims=True), 1e-12)
        eb = eb / np.maximum(np.linalg.norm(eb, axis=-1, keepdims=True), 1e-12)
        return ea @ eb.T


def pool(hidden: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    """One text's token vectors [seq, hidden] -> [hidden], as sentence-transformers' Pooling module."""
    weights = mask.astype(hidden.dtype)[:, None]
    if pooling == "cls":
        return hidden[0]
    if pooling == "max":
        return np.where(weights > 0, hidden, -1e9).max(axis=0)
    if pooling == "last":
        # The last real token, wherever the padding is.
        return hidden[np.nonzero(mask)[0][-1]]
    summed = (hidden * weights).sum(axis=0)
    count = max(float(weights.sum()), 1e-9)
    return summed / (np.sqrt(count) if pooling == "mean_sqrt_len" else count)
