"""Generation in numpy over ONNX Runtime: logits processors, search strategies, a KV-cache stepper, streamers.

    from onnxpipe.generation import Generator, top_k_top_p_filtering
"""
from .config import GenerationConfig, model_generation_config, pipeline_generation_config
from .generate import Generator
from .kv_cache import DecoderStepper, Seq2SeqStepper, position_ids_from_mask
from .logits_process import (build_logits_processor, force_token_at_length, log_softmax, min_p_warp, no_repeat_ngram,
                             repetition_penalty, softmax, suppress_eos_below_min_length,
                             suppress_eos_below_min_new_tokens, suppress_tokens, temperature_warp,
                             top_k_top_p_filtering, top_k_warp, top_p_warp)
from .search import beam_search, sample_search
from .stopping import StopStrings, build_stopping
from .streamer import TextIteratorStreamer, TextStreamer

__all__ = [
    "GenerationConfig", "Generator", "DecoderStepper", "Seq2SeqStepper", "TextStreamer", "TextIteratorStreamer",
    "StopStrings", "beam_search", "sample_search", "build_logits_processor", "build_stopping",
    "model_generation_config", "pipeline_generation_config", "position_ids_from_mask", "top_k_top_p_filtering",
    "temperature_warp", "top_k_warp", "top_p_warp", "min_p_warp", "repetition_penalty", "no_repeat_ngram",
    "suppress_eos_below_min_length", "suppress_eos_below_min_new_tokens", "force_token_at_length",
    "suppress_tokens", "softmax", "log_softmax",
]
