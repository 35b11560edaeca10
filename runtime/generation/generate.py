"""`Generator`: transformers' `model.generate()` for an exported model folder, in numpy.

    gen = Generator(ModelDir("exports/gpt2"))
    ids = gen.generate(input_ids, attention_mask, max_new_tokens=20, num_beams=4)   # np.ndarray

Decoder-only exports return prompt + new tokens (as transformers does); encoder-decoder exports
return the decoder sequence starting with decoder_start_token_id.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .. import cancel
from ..errors import ModelOutputError
from .config import GenerationConfig, model_generation_config, pipeline_generation_config, validate
from .kv_cache import DecoderStepper, Seq2SeqStepper
from .logits_process import build_logits_processor
from .search import beam_search, sample_search
from .stopping import build_stopping


@dataclass(frozen=True)
class GenerationPlan:
    """One call's generation options, resolved and checked once (Generator.prepare)."""

    config: GenerationConfig
    user_max_length: int | None = None   # max_length as the caller gave it (transformers treats a default apart)


class Generator:
    def __init__(self, model, generation_config: GenerationConfig | None = None):
        self.model = model
        self.manifest = model.manifest
        self.is_encoder_decoder = bool(self.manifest.get("is_encoder_decoder"))
        if self.manifest.get("generation") is None or not self.manifest.get("kv_cache"):
            raise ValueError(f"model dir '{model.path}' was not exported for generation (no generation config or KV "
                             "cache in its manifest): export a text-generation or text2text-generation model")
        self.generation_config = generation_config or model_generation_config(self.manifest["generation"])
        self.max_positions = self.manifest.get("max_positions")
        #: per-run input_ids lengths of the last generate() call: [prompt_len, 1, 1, ...] with the KV cache
        self.step_input_lengths: list[int] = []

    @classmethod
    def for_pipeline(cls, model, pipeline_defaults: dict) -> tuple["Generator", GenerationConfig]:
        """The generator and the config a transformers pipeline builds in __init__ (its defaults under the model's,
        and the tokenizer's pad id when the model has none)."""
        generator = cls(model)
        config = pipeline_generation_config(generator.generation_config, pipeline_defaults)
        pad = model.tokenizer.pad_token_id
        if config.pad_token_id is None and pad is not None:
            config = config.update(pad_token_id=pad)
        return generator, config

    def prepare(self, generation_config: GenerationConfig | None = None, owner: str = "generate()",
                **kwargs) -> "GenerationPlan":
        """The options of one generate() call resolved over `generation_config` (else the model's) and checked,
        once: unknown names are a TypeError naming `owner`, bad values a ValueError, raised before any work."""
        config = (generation_config or self.generation_config).update(owner, **kwargs)
        validate(config)
        return GenerationPlan(config, kwargs.get("max_length"))

    def generate(self, input_ids=None, attention_mask=None, *, plan: "GenerationPlan | None" = None,
                 generation_config: GenerationConfig | None = None, seed: int | None = None, streamer=None,
                 on_tokens=None, **kwargs) -> np.ndarray:
        """Token ids as `model.generate(input_ids, attention_mask=..., **kwargs)` returns them.

        kwargs: transformers' generation options (max_new_tokens, do_sample, num_beams, ...), resolved over
        `generation_config`; or `plan`, options already resolved and checked by prepare() (a pipeline's call).
        seed: seeds the numpy Generator used for sampling (same seed, same tokens).
        streamer: an object with put(ids)/end() (TextStreamer); it gets the new tokens of row 0.
        """
        if plan is None:
            plan = self.prepare(generation_config, **kwargs)
        elif kwargs or generation_config is not None:
            raise TypeError("generate() takes a plan or generation options, not both")
        config = plan.config
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, config)
        eos = config.eos_token_ids
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
        if attention_mask is None:
            attention_mask = _infer_attention_mask(input_ids, pad, eos)
        if streamer is not None and hasattr(streamer, "on_prompt"):  # usage counts: the prompt's real tokens
            streamer.on_prompt(int(attention_mask[0].sum()))
        expand = max(config.num_beams, config.num_return_sequences)
        if streamer is not None and (input_ids.shape[0] > 1 or expand > 1):
            raise ValueError("streaming needs a single prompt and a single sequence (num_beams=1, num_return_sequences=1)")
        rng = np.random.default_rng(seed) if config.do_sample else None

        if self.is_encoder_decoder:
            start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.bos_token_id
            if start is None:
                raise ValueError("decoder_start_token_id (or bos_token_id) must be set for encoder-decoder generation")
            stepper = Seq2SeqStepper(self.model, self.manifest["kv_cache"])
            stepper.encode(input_ids, attention_mask)
            decoder_ids = np.full((input_ids.shape[0], 1), int(start), dtype=np.int64)
            if expand > 1:
                stepper.expand(expand)
                decoder_ids = np.repeat(decoder_ids, expand, axis=0)
            prompt = decoder_ids
        else:
            stepper = DecoderStepper(self.model.session("model"), self.manifest["kv_cache"])
            prompt = np.repeat(input_ids, expand, axis=0) if expand > 1 else input_ids
            attention_mask = np.repeat(attention_mask, expand, axis=0) if expand > 1 else attention_mask
        config = self._prepare_lengths(config, prompt.shape[1], plan.user_max_length)
        process = build_logits_processor(config, prompt.shape[1])
        stopping = build_stopping(config, self.model.tokenizer)
        self.step_input_lengths = stepper.step_input_lengths

        first = stepper.prefill(prompt) if self.is_encoder_decoder else stepper.prefill(prompt, attention_mask)
        _check_logits(first, 0)
        steps = iter(range(1, 1 << 62))

        def step(tokens):
            cancel.check()  # a caller that has gone stops generation here, within one token
            logits = stepper.step(tokens)
            _check_logits(logits, next(steps))
            return logits

        if config.num_beams > 1:
            return beam_search(first, step, stepper.reorder, prompt, config=config, process=process,
                               stopping=stopping, pad_token_id=pad, rng=rng)
        def emit(tokens):
            if streamer is not None:
                streamer.put(tokens)
            if on_tokens is not None:
                on_tokens(tokens)

        try:
            sequences = sample_search(first, step, prompt, config=config, process=process, stopping=stopping,
                                      pad_token_id=pad, rng=rng, on_tokens=emit)
        finally:
            if streamer is not None:
                streamer.end()
        if streamer is not None and hasattr(streamer, "on_finish"):
            # "length": cut by max_length / max_new_tokens or the context window; "stop": EOS or a stop string
            streamer.on_finish("length" if sequences.shape[1] >= config.max_length else "stop")
        return sequences

    def _check_inputs(self, input_ids, attention_mask, config):
        """input_ids/attention_mask as [batch, length] int64 arrays, and the config's token ids, checked."""
        for name in ("bos_token_id", "pad_token_id", "decoder_start_token_id"):
            if getattr(config, name) is not None:
                self._check_token_ids(np.array([getattr(config, name)]), name)
        if config.eos_token_ids:
            self._check_token_ids(np.array(config.eos_token_ids), "eos_token_id")
        if input_ids is not None and np.ndim(input_ids) == 2 and np.shape(input_ids)[0] == 0:
            raise ValueError(f"input_ids has no rows (shape {np.shape(input_ids)}): pass at least one prompt")
        if input_ids is None or np.asarray(input_ids).size == 0:
            if self.is_encoder_decoder:
                raise ValueError("input_ids is empty: an encoder-decoder model needs a non-empty input")
            if config.bos_token_id is None:
                raise ValueError("the prompt is empty and this model has no bos_token_id to start from: pass a "
                                 "non-empty prompt")
            return np.array([[int(config.bos_token_id)]], dtype=np.int64), None
        input_ids = np.asarray(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None, :]
        if input_ids.ndim != 2 or not np.issubdtype(input_ids.dtype, np.integer):
            raise TypeError(f"input_ids must be a [batch, length] integer array, got shape {input_ids.shape} "
                            f"dtype {input_ids.dtype}")
        input_ids = input_ids.astype(np.int64)
        self._check_token_ids(input_ids, "input_ids")
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
            if attention_mask.ndim == 1:
                attention_mask = attention_mask[None, :]
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {attention_mask.shape} must equal input_ids shape "
                                 f"{input_ids.shape}")
            attention_mask = attention_mask.astype(np.int64)
        if not self.is_encoder_decoder and self.max_positions and input_ids.shape[1] > self.max_positions:
            raise ValueError(f"the prompt is {input_ids.shape[1]} tokens, longer than this model's context window "
                             f"of {self.max_positions} positions: shorten it")
        if self.is_encoder_decoder and self.max_positions and input_ids.shape[1] > self.max_positions:
            raise ValueError(f"the input is {input_ids.shape[1]} tokens, longer than this model's limit of "
                             f"{self.max_positions} positions: shorten it or pass truncation=True")
        return input_ids, attention_mask

    def _check_token_ids(self, ids: np.ndarray, name: str) -> None:
        """Token ids outside the vocabulary would reach ONNX Runtime's Gather as an out-of-bounds index."""
        vocab = self.vocab_size
        if vocab is not None and ids.size and (ids.min() < 0 or ids.max() >= vocab):
            bad = int(ids.max()) if ids.max() >= vocab else int(ids.min())
            raise ValueError(f"{name} holds token id {bad}, outside this model's vocabulary of {vocab} ids")

    @property
    def vocab_size(self) -> int | None:
        """The model's vocabulary size: the last, static dimension of its logits output (None if dynamic)."""
        if not hasattr(self, "_vocab_size"):
            role = "decoder" if self.is_encoder_decoder else "model"
            outputs = {o.name: o for o in self.model.session(role).ort_session.get_outputs()}
            dims = getattr(outputs.get("logits"), "shape", None) or [None]
            self._vocab_size = dims[-1] if isinstance(dims[-1], int) else None
        return self._vocab_size

    def _prepare_lengths(self, config, input_len, user_max_length) -> GenerationConfig:
        """transformers' _prepare_generated_length and _validate_generated_length, plus the context window."""
        values = {}
        has_default_max_length = user_max_length is None and config.max_length is not None
        if config.max_new_tokens is not None:
            values["max_length"] = config.max_new_tokens + input_len
        elif has_default_max_length and config.max_length == 20:
            values["max_length"] = 20 + input_len
            if self.max_positions:
                values["max_length"] = min(values["max_length"], self.max_positions)
        if config.min_new_tokens is not None:
            values["min_length"] = config.min_new_tokens + input_len
        config = GenerationConfig({**config.to_dict(), **values})
        if input_len >= config.max_length:
            raise ValueError(f"the input is {input_len} tokens but max_length is {config.max_length}: raise max_length "
                             "or, better, set max_new_tokens")
        if self.max_positions and config.max_length > self.max_positions:
            # past the learned positions the graph fails (GPT-2) or degrades: stop at the window instead
            warnings.warn(f"max_length {config.max_length} exceeds the model's {self.max_positions} positions; "
                          f"generation stops at {self.max_positions} tokens", UserWarning, stacklevel=3)
            config = GenerationConfig({**config.to_dict(), "max_length": self.max_positions})
        return config


def _check_logits(logits: np.ndarray, step: int) -> None:
    """NaN logits mean broken weights or a broken export: every token would be a guess (argmax picks id 0)."""
    if np.isnan(logits).any():
        where = "after the prompt" if step == 0 else f"at decode step {step}"
        raise ModelOutputError(f"the model's logits are NaN {where}: its weights or export are broken (export it "
                               "again, and check the checkpoint)")


def _infer_attention_mask(input_ids: np.ndarray, pad, eos: list[int]) -> np.ndarray:
    """transformers' _prepare_attention_mask_for_generation: mask pad ids only when pad is not also EOS."""
    if pad is not None and (input_ids == pad).any() and pad not in eos:
        return (input_ids != pad).astype(np.int64)
    return np.ones_like(input_ids, dtype=np.int64)
