"""fill-mask: transformers' FillMaskPipeline on ONNX Runtime.

    fill("The capital of France is [MASK].")        -> [{'score', 'token', 'token_str', 'sequence'}] * top_k
    fill("[MASK] is [MASK].")                       -> one such list per mask (scores per mask, not joint)
    fill(["a [MASK]", "b [MASK]"])                  -> one result per text; a one-text list gives that text's result
"""
from __future__ import annotations

import logging

import numpy as np

from ._common import (EncoderPipeline, UnwrapsOneItemList, check_positive_int, check_texts, check_tokenizer_kwargs,
                      encode, softmax)

logger = logging.getLogger(__name__)


class FillMaskPipeline(UnwrapsOneItemList, EncoderPipeline):
    """Predict the model's mask token (`pipe.tokenizer.mask_token`) with a masked-LM export.

    top_k (default 5); targets: a str or list of str to score instead of the whole vocabulary
    (a target missing from the vocabulary is replaced by its first token, with a warning, as
    transformers does); tokenizer_kwargs: dict of truncation, max_length, padding, add_special_tokens.
    """

    task = "fill-mask"
    model_tasks = ("fill-mask",)

    def run(self, inputs, options, *, batch_size=None):
        check_texts(inputs, "inputs")
        outputs = super().run(inputs, options, batch_size=batch_size)
        if isinstance(inputs, list) and len(inputs) == 1:
            return outputs[0]
        return outputs

    def texts_to_measure(self, item, options):
        if (options.preprocess.get("tokenizer_kwargs") or {}).get("truncation"):
            return None
        return super().texts_to_measure(item, options)

    def _sanitize_parameters(self, top_k=None, targets=None, tokenizer_kwargs=None, **kwargs):
        if kwargs:
            super()._sanitize_parameters(**kwargs)
        if self.tokenizer.mask_token_id is None:
            raise ValueError(f"model dir '{self.model.path}': the tokenizer does not define a `mask_token`")
        preprocess_params = {}
        if tokenizer_kwargs is not None:
            if not isinstance(tokenizer_kwargs, dict):
                raise TypeError(f"tokenizer_kwargs must be a dict, got {type(tokenizer_kwargs).__name__}")
            preprocess_params["tokenizer_kwargs"] = check_tokenizer_kwargs(tokenizer_kwargs, "tokenizer_kwargs")
        postprocess_params = {}
        if targets is not None:
            postprocess_params["target_ids"] = self.get_target_ids(targets)
        if top_k is not None:
            postprocess_params["top_k"] = check_positive_int(top_k, "top_k")
        return preprocess_params, {}, postprocess_params

    def get_target_ids(self, targets) -> np.ndarray:
        targets = [targets] if isinstance(targets, str) else targets
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
            raise TypeError("targets must be a string or a list of strings")
        vocab = self.tokenizer.get_vocab()
        target_ids = []
        for target in targets:
            id_ = vocab.get(target)
            if id_ is None:
                ids = self.tokenizer.encode_batch([target], add_special_tokens=False, truncation=True, max_length=1)[0].ids
                if not ids:
                    logger.warning(f"The specified target token `{target}` does not exist in the model vocabulary. "
                                   "We cannot replace it with anything meaningful, ignoring it")
                    continue
                id_ = ids[0]
                logger.warning(f"The specified target token `{target}` does not exist in the model vocabulary. "
                               f"Replacing with `{self.tokenizer.convert_ids_to_tokens(id_)}`.")
            target_ids.append(id_)
        # transformers deduplicates through a set; its order decides ties and is kept the same here.
        target_ids = list(set(target_ids))
        if not target_ids:
            raise ValueError("At least one target must be provided when passed.")
        return np.array(target_ids)

    def preprocess(self, inputs, tokenizer_kwargs=None) -> dict[str, np.ndarray]:
        if not isinstance(inputs, str):
            raise TypeError(f"fill-mask inputs must be a string or a list of strings, got {type(inputs).__name__}")
        model_inputs = encode(self.tokenizer, inputs, **(tokenizer_kwargs or {}))
        if not (model_inputs["input_ids"][0] == self.tokenizer.mask_token_id).any():
            raise ValueError(f"No mask_token ({self.tokenizer.mask_token}) found on the input")
        return model_inputs

    def postprocess(self, model_outputs, top_k=5, target_ids=None):
        if target_ids is not None and target_ids.shape[0] < top_k:
            top_k = target_ids.shape[0]
        input_ids = model_outputs["input_ids"][0]
        masked_index = np.nonzero(input_ids == self.tokenizer.mask_token_id)[0]
        probs = softmax(model_outputs["logits"][0, masked_index, :])
        if target_ids is not None:
            probs = probs[..., target_ids]
        # Ties keep the lower index first; torch.topk leaves their order unspecified.
        predictions = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
        values = np.take_along_axis(probs, predictions, axis=-1)
        single_mask = values.shape[0] == 1
        result = []
        for i, (_values, _predictions) in enumerate(zip(values.tolist(), predictions.tolist())):
            row = []
            for v, p in zip(_values, _predictions):
                tokens = input_ids.copy()
                if target_ids is not None:
                    p = target_ids[p].tolist()
                tokens[masked_index[i]] = p
                tokens = tokens[tokens != self.tokenizer.pad_token_id]
                # Special tokens are skipped for a readable sentence, except with several masks,
                # where the other [MASK]s would otherwise vanish.
                sequence = self.tokenizer.decode(tokens, skip_special_tokens=single_mask)
                row.append({"score": v, "token": p, "token_str": self.tokenizer.decode([p]), "sequence": sequence})
            result.append(row)
        return result[0] if single_mask else result
