"""`text2text-generation`, `summarization`, `translation`: transformers' Text2TextGenerationPipeline family
over an encoder-decoder export (encoder once, then the decoder with its KV cache).

    summarizer = pipeline("summarization", model="exports/bart")
    summarizer("A long article ...", max_new_tokens=40)   # [{'summary_text': '...'}]

Defaults as transformers: max_new_tokens=256 and num_beams=4 unless the model's generation config
sets its own values.
"""
from __future__ import annotations

import enum

import numpy as np

from ..base import check_bool
from ._generating import GeneratingPipeline
from ..generation import Generator


class ReturnType(enum.Enum):
    TENSORS = 0
    TEXT = 1


class Text2TextGenerationPipeline(GeneratingPipeline):
    task = "text2text-generation"
    model_tasks = ("text2text-generation",)
    default_generation = {"max_new_tokens": 256, "num_beams": 4}
    return_name = "generated"

    def __init__(self, model, task_name: str | None = None, **kwargs):
        """task_name: the task string the pipeline was asked for (e.g. "translation_en_to_de"), which picks the
        model's `task_specific_params` entry, as transformers does."""
        self.generator, self.generation_config = Generator.for_pipeline(model, self.default_generation)
        self.prefix, params = _task_params(model.manifest, task_name or self.task)
        if params:
            self.generation_config = self.generation_config.update(**params)
        super().__init__(model, **kwargs)

    def run(self, inputs, options, *, batch_size=None):
        """One text -> a list of records; a list of texts -> one record per text (a list each with several sequences)."""
        pre, fwd, post = options.preprocess, options.forward, options.postprocess
        if isinstance(inputs, (list, tuple)):
            if not inputs:
                raise ValueError(f"{self.task}: inputs is an empty list: pass a string or a non-empty list of strings")
            texts = [_check_text(x, f"inputs[{i}]") for i, x in enumerate(inputs)]
            results = self.run_items(texts, options, batch_size)
            return [r[0] for r in results] if all(len(r) == 1 for r in results) else results
        return self.run_single(_check_text(inputs, "inputs"), pre, fwd, post)

    def generate(self, input_ids, attention_mask=None, **kwargs) -> np.ndarray:
        """`model.generate(input_ids, attention_mask=..., **kwargs)`: decoder ids, model defaults only."""
        return self.generator.generate(input_ids, attention_mask, **kwargs)

    def answer(self, inputs, options, results):
        # pipe(["a", "b"]) flattens each one-sequence [r] to r; pipe("a") keeps [r]
        if not inputs.is_list and isinstance(results[0], dict):
            return [results[0]]
        return super().answer(inputs, options, results)

    def _sanitize_parameters(self, return_tensors=None, return_text=None, return_type=None,
                             clean_up_tokenization_spaces=None, truncation=None, stop_sequence=None, seed=None,
                             src_lang=None, tgt_lang=None, **generate_kwargs):
        pre, fwd, post = {}, dict(generate_kwargs), {}
        for name, value in (("return_tensors", return_tensors), ("return_text", return_text),
                            ("clean_up_tokenization_spaces", clean_up_tokenization_spaces)):
            if value is not None:
                check_bool(value, name)
        if truncation is not None:
            pre["truncation"] = truncation
        if stop_sequence is not None:
            ids = self.tokenizer.encode_batch([stop_sequence], add_special_tokens=False)[0].ids
            if not ids:
                raise ValueError(f"stop_sequence={stop_sequence!r} encodes to no tokens")
            fwd["eos_token_id"] = ids[0]  # transformers stops on the first token of the sequence only
        if seed is not None:
            fwd["seed"] = seed
        if return_tensors is not None and return_type is None:
            return_type = ReturnType.TENSORS if return_tensors else ReturnType.TEXT
        if return_type is not None:
            post["return_type"] = return_type
        if clean_up_tokenization_spaces is not None:
            post["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
        return pre, fwd, post

    def preprocess(self, text, truncation=False):
        enc = self.tokenizer.encode_batch([(self.prefix or "") + text], truncation=truncation or False)[0]
        return {"input_ids": np.array([enc.ids], dtype=np.int64),
                "attention_mask": np.array([enc.attention_mask], dtype=np.int64)}

    def _forward(self, model_inputs, plan, seed=None):
        output_ids = self.generator.generate(model_inputs["input_ids"], model_inputs["attention_mask"], plan=plan,
                                             seed=seed)
        return {"output_ids": output_ids}

    def _row(self, outputs, batch, chunk, i):
        n = outputs["output_ids"].shape[0] // len(chunk)
        return {"output_ids": outputs["output_ids"][i * n:(i + 1) * n]}

    def postprocess(self, model_outputs, return_type=ReturnType.TEXT, clean_up_tokenization_spaces=False):
        records = []
        for output_ids in model_outputs["output_ids"]:
            if return_type == ReturnType.TENSORS:
                records.append({f"{self.return_name}_token_ids": output_ids})
            else:
                text = self.tokenizer.decode(output_ids, skip_special_tokens=True,
                                             clean_up_tokenization_spaces=clean_up_tokenization_spaces)
                records.append({f"{self.return_name}_text": text})
        return records


class SummarizationPipeline(Text2TextGenerationPipeline):
    task = "summarization"
    return_name = "summary"


class TranslationPipeline(Text2TextGenerationPipeline):
    """src_lang / tgt_lang are accepted for transformers compatibility; single-pair models ignore them."""

    task = "translation"
    return_name = "translation"


def _task_params(manifest: dict, task: str) -> tuple[str | None, dict]:
    """(prefix, generation options) as transformers' pipeline __init__ derives them: `config.prefix`, overridden
    by the task's `task_specific_params` entry (T5: "summarize: ", "translate English to German: ", beams,
    lengths); a bare "translation" takes the model's first translation_* entry, as `transformers.pipeline()` does."""
    from ..generation.config import GLOBAL_DEFAULTS

    prefix = manifest.get("prefix")
    tsp = manifest.get("task_specific_params") or {}
    if task == "translation":
        task = next((k for k in tsp if k.startswith("translation")), task)
    params = dict(tsp.get(task) or {})
    if "prefix" in params:
        prefix = params.pop("prefix")
    # GenerationConfig.update in transformers keeps the keys it knows and ignores the rest
    return prefix, {k: v for k, v in params.items() if k in GLOBAL_DEFAULTS}


def _check_text(text, name):
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a string, got {type(text).__name__}")
    return text
