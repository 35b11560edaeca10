"""What the two generating pipelines (text-generation, text2text) share: their call options become one checked
GenerationPlan, so a request's generation options are resolved and validated once, not again in generate()."""
from __future__ import annotations

from dataclasses import replace

from ..base import CallOptions, GenerationWork, Pipeline

# forward options that go to generate() beside the plan rather than into it
_CALL_KEYS = ("seed", "streamer")


class GeneratingPipeline(Pipeline):
    """Subclasses set `self.generator` and `self.generation_config` before calling this __init__."""

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.check_parameters()  # construction options are checked now, not at the first call

    def check_parameters(self, parameters: dict | None = None) -> CallOptions:
        options = super().check_parameters(parameters)
        generate_kwargs = dict(options.forward)
        extra = {k: generate_kwargs.pop(k) for k in _CALL_KEYS if k in generate_kwargs}
        plan = self.generator.prepare(self.generation_config, type(self).__name__, **generate_kwargs)
        return replace(options, forward={"plan": plan, **extra})

    def generation_work(self, options: CallOptions) -> GenerationWork:
        config = options.forward["plan"].config
        new_tokens = config.max_new_tokens if config.max_new_tokens is not None else config.max_length
        return GenerationWork(config.num_beams, config.num_return_sequences, new_tokens)
