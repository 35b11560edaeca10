"""Generation options: transformers' GenerationConfig semantics on a plain object, read from the manifest.

Priority, as transformers applies it: call kwargs > the model's generation config (the manifest's
`generation`) > a pipeline's own defaults (only where the model keeps the global default) > the
global GenerationConfig() defaults below.
"""
from __future__ import annotations

import copy
import math
import numbers

from ..base import check_bool

# GenerationConfig() defaults in transformers 4.57 for every option this package reads.
GLOBAL_DEFAULTS = {
    "max_length": 20, "max_new_tokens": None, "min_length": 0, "min_new_tokens": None,
    "early_stopping": False, "stop_strings": None, "do_sample": False, "num_beams": 1,
    "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None, "typical_p": 1.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
    "no_repeat_ngram_size": 0, "bad_words_ids": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "num_return_sequences": 1,
    "pad_token_id": None, "bos_token_id": None, "eos_token_id": None, "decoder_start_token_id": None,
    "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0, "sequence_bias": None,
    "exponential_decay_length_penalty": None, "renormalize_logits": False, "remove_invalid_values": False,
    "guidance_scale": None, "num_beam_groups": 1, "diversity_penalty": 0.0, "penalty_alpha": None,
    "constraints": None, "force_words_ids": None, "use_cache": True,
}
# Options transformers knows but this runtime does not implement: a non-default value is refused, not ignored.
UNSUPPORTED = ("typical_p", "epsilon_cutoff", "eta_cutoff", "bad_words_ids", "encoder_repetition_penalty",
               "encoder_no_repeat_ngram_size", "sequence_bias", "exponential_decay_length_penalty",
               "guidance_scale", "num_beam_groups", "diversity_penalty", "penalty_alpha", "constraints",
               "force_words_ids")
# Options that are true or false, and nothing else.
BOOLEAN_OPTIONS = ("do_sample", "renormalize_logits", "remove_invalid_values", "use_cache")
# Call-time keywords that are not GenerationConfig fields but are understood by `generate`.
EXTRA_KWARGS = ("seed", "streamer")


class GenerationConfig:
    """Attribute access to the resolved options; `eos_token_ids` is always a list."""

    def __init__(self, values: dict):
        self.__dict__.update(copy.deepcopy(values))

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        if eos is None:
            return []
        return [int(e) for e in eos] if isinstance(eos, (list, tuple)) else [int(eos)]

    def to_dict(self) -> dict:
        return copy.deepcopy(self.__dict__)

    def update(self, owner: str = "generate()", **kwargs) -> "GenerationConfig":
        """A copy with `kwargs` set; a name GenerationConfig does not have is a TypeError naming `owner`."""
        unknown = [k for k in kwargs if k not in GLOBAL_DEFAULTS]
        if unknown:
            raise TypeError(f"{owner} got unexpected arguments: {', '.join(sorted(unknown))}")
        new = GenerationConfig(self.__dict__)
        new.__dict__.update(kwargs)
        return new

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.__dict__.items() if GLOBAL_DEFAULTS.get(k, object()) != v}
        return f"GenerationConfig({changed})"


def model_generation_config(manifest_generation: dict | None) -> GenerationConfig:
    """The model's own config: the manifest's `generation` over the global defaults."""
    values = dict(GLOBAL_DEFAULTS)
    for key, value in (manifest_generation or {}).items():
        if key in GLOBAL_DEFAULTS:
            values[key] = value
    return GenerationConfig(values)


def pipeline_generation_config(model_config: GenerationConfig, pipeline_defaults: dict) -> GenerationConfig:
    """What a transformers pipeline builds in __init__: its defaults, overridden by non-global model values."""
    values = dict(GLOBAL_DEFAULTS)
    values.update(pipeline_defaults)
    for key, model_value in model_config.__dict__.items():
        if values.get(key) == GLOBAL_DEFAULTS.get(key) and model_value != GLOBAL_DEFAULTS.get(key):
            values[key] = model_value
    if values.get("temperature") == 0.0:
        values["do_sample"] = False
    # a pipeline default max_new_tokens yields to a model that set its own max_length
    if (pipeline_defaults.get("max_new_tokens") is not None
            and values["max_new_tokens"] == pipeline_defaults["max_new_tokens"]
            and values["max_length"] is not None and values["max_length"] != GLOBAL_DEFAULTS["max_length"]):
        values["max_new_tokens"] = None
    return GenerationConfig(values)


def validate(config: GenerationConfig) -> None:
    """The checks transformers' GenerationConfig.validate and the processors make, as ValueError/TypeError."""
    c = config
    for name in BOOLEAN_OPTIONS:
        check_bool(getattr(c, name), name)
    for name in ("bos_token_id", "pad_token_id", "decoder_start_token_id", "forced_bos_token_id"):
        _check_int(name, getattr(c, name), minimum=0, optional=True)
    eos = c.eos_token_id
    for value in (eos if isinstance(eos, (list, tuple)) else [eos]):
        _check_int("eos_token_id", value, minimum=0, optional=True)
    if c.early_stopping not in (True, False, "never") or isinstance(c.early_stopping, (int, float)) and \
            not isinstance(c.early_stopping, bool):
        raise ValueError(f"early_stopping={c.early_stopping!r} must be True, False or 'never'")
    _check_int("max_new_tokens", c.max_new_tokens, minimum=1, optional=True)
    _check_int("max_length", c.max_length, minimum=1, optional=True)
    _check_int("min_new_tokens", c.min_new_tokens, minimum=0, optional=True)
    _check_int("min_length", c.min_length, minimum=0, optional=True)
    _check_int("num_beams", c.num_beams, minimum=1)
    _check_int("num_return_sequences", c.num_return_sequences, minimum=1)
    _check_int("no_repeat_ngram_size", c.no_repeat_ngram_size, minimum=0, optional=True)
    if c.num_return_sequences != 1:
        if c.num_beams == 1 and not c.do_sample:
            raise ValueError(f"num_return_sequences={c.num_return_sequences} needs num_beams >= "
                             f"{c.num_return_sequences} or do_sample=True: greedy search returns one sequence")
        if c.num_beams > 1 and c.num_return_sequences > c.num_beams:
            raise ValueError(f"num_return_sequences={c.num_return_sequences} must be <= num_beams={c.num_beams}")
    if c.repetition_penalty is not None:
        _check_number("repetition_penalty", c.repetition_penalty, strictly_positive=True)
    if c.length_penalty is not None:
        _check_number("length_penalty", c.length_penalty)
    if c.do_sample:
        if c.temperature is not None:
            _check_number("temperature", c.temperature)
            if not c.temperature > 0:
                raise ValueError(f"temperature={c.temperature!r} must be > 0 when sampling; for greedy decoding "
                                 "use do_sample=False")
        if c.top_p is not None:
            _check_number("top_p", c.top_p)
            if not 0 < c.top_p <= 1:
                raise ValueError(f"top_p={c.top_p!r} must be in (0, 1]")
        if c.top_k is not None:
            _check_int("top_k", c.top_k, minimum=0)
    for key in UNSUPPORTED:
        if getattr(c, key) != GLOBAL_DEFAULTS[key]:
            raise ValueError(f"{key}={getattr(c, key)!r} is not supported by onnxpipe's generate(): leave it at "
                             f"{GLOBAL_DEFAULTS[key]!r}")
    if c.stop_strings is not None:
        strings = [c.stop_strings] if isinstance(c.stop_strings, str) else c.stop_strings
        if not isinstance(strings, (list, tuple)) or not strings or not all(isinstance(s, str) and s for s in strings):
            raise TypeError(f"stop_strings={c.stop_strings!r} must be a non-empty string or a list of them")


def _check_int(name, value, minimum, optional=False):
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} must be an integer")
    if value < minimum:
        raise ValueError(f"{name}={value!r} must be >= {minimum}")


def _check_number(name, value, strictly_positive=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} must be a number")
    if not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    if strictly_positive and not value > 0:
        raise ValueError(f"{name}={value!r} must be > 0")
