"""What the two generating pipelines (text-generation, text2text) share: their call options become one checked
GenerationPlan, so a request's generation options are resolved and validated once, not again in generate();
and batch_size, as transformers' pipelines take it: a list of inputs preprocessed one by one, padded together on
the tokenizer's padding side with its pad id (transformers' pad_collate_fn), generated as one batch, and
postprocessed row by row, each row with its padded prompt, so the texts are transformers' for the same batch_size."""
from __future__ import annotations

from dataclasses import replace

from .. import cancel
from ..base import CallOptions, GenerationWork, Pipeline, check_batch_size
from ._common import _pad

# forward options that go to generate() beside the plan rather than into it
_CALL_KEYS = ("seed", "streamer")


class GeneratingPipeline(Pipeline):
    """Subclasses set `self.generator` and `self.generation_config` before calling this __init__, and say how a
    batched _forward output splits into one item's (`_row`)."""

    takes_batch_size = True

    def __init__(self, model, *, batch_size=None, **kwargs):
        self._batch_size = check_batch_size(batch_size)
        super().__init__(model, **kwargs)
        self.check_parameters()  # construction options are checked now, not at the first call

    def run_items(self, items: list, options: CallOptions, batch_size: int | None = None) -> list:
        """One result per item (a prompt, a chat, a text), in batches of the call's batch_size."""
        pre, fwd, post = options.preprocess, options.forward, options.postprocess
        if batch_size is None:
            batch_size = options.batch_size if options.batch_size is not None else self._batch_size
        if batch_size <= 1 or len(items) == 1:
            return [self.run_single(item, pre, fwd, post) for item in items]
        pad = self.tokenizer.pad_token_id
        if pad is None:  # transformers' own refusal
            raise ValueError("Pipeline with tokenizer without pad_token cannot do batching. You can try to set it "
                             "with `pipe.tokenizer.pad_token_id = model.config.eos_token_id`.")
        side = self.tokenizer.padding_side
        fused = ((self.manifest.get("optimization") or {}).get("fused_ops") or {}).get("GroupQueryAttention")
        if side == "right" and fused and not self.manifest.get("is_encoder_decoder"):
            # its attention reads each row's tokens as one run from the left: right padding would break it
            raise ValueError("this export's GroupQueryAttention batches left-padded prompts only: set "
                             "pipe.tokenizer.padding_side = 'left' (as batched generation wants anyway), or batch_size=1")
        results = []
        for start in range(0, len(items), batch_size):
            cancel.check()
            chunk = [self.preprocess(item, **pre) for item in items[start:start + batch_size]]
            batch = {"input_ids": _pad([c["input_ids"] for c in chunk], pad, side),
                     "attention_mask": _pad([c["attention_mask"] for c in chunk], 0, side)}
            out = self._forward({**chunk[0], **batch}, **fwd)
            results += [self.postprocess(self._row(out, batch, chunk, i), **post) for i in range(len(chunk))]
        return results

    def _row(self, outputs: dict, batch: dict, chunk: list, i: int) -> dict:
        raise NotImplementedError

    def check_parameters(self, parameters: dict | None = None) -> CallOptions:
        options = super().check_parameters(parameters)
        generate_kwargs = dict(options.forward)
        extra = {k: generate_kwargs.pop(k) for k in _CALL_KEYS if k in generate_kwargs}
        plan = self.generator.prepare(self.generation_config, type(self).__name__, **generate_kwargs)
        return replace(options, forward={"plan": plan, **extra})

    def generation_work(self, options: CallOptions) -> GenerationWork:
        config = options.forward["plan"].config
        new_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length
        return GenerationWork(config.num_beams, config.num_return_sequences, new_tokens, bool(config.do_sample))

    def reseeded(self, options: CallOptions, offset: int) -> CallOptions:
        """The same call with its seed moved by `offset` (several sampled choices of one request that a seed still
        reproduces); without an integer seed, unchanged: each run draws its own."""
        seed = options.forward.get("seed")
        if offset == 0 or isinstance(seed, bool) or not isinstance(seed, int):
            return options
        return replace(options, forward={**options.forward, "seed": seed + offset})
