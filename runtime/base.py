"""The pipeline skeleton shared by every task, after transformers' four-step split.

    _sanitize_parameters(**kwargs) -> preprocess_kw, forward_kw, postprocess_kw
    preprocess(input, **preprocess_kw)   -> model inputs (numpy feeds + what postprocess needs)
    _forward(model_inputs, **forward_kw) -> model outputs (the ONNX session only)
    postprocess(model_outputs, **postprocess_kw) -> python results (numpy only, pure)
"""
from __future__ import annotations

from .model_dir import ModelDir


class Pipeline:
    task: str = ""
    #: tasks whose model dirs this pipeline accepts (the manifest's `task`)
    model_tasks: tuple[str, ...] = ()

    def __init__(self, model: ModelDir, **kwargs):
        if self.model_tasks and model.task not in self.model_tasks:
            raise ValueError(f"model dir '{model.path}' was exported for {model.task!r}, not for {self.task!r}: "
                             f"export a {' or '.join(self.model_tasks)} model for this pipeline")
        self.model = model
        self.manifest = model.manifest
        self.tokenizer = model.tokenizer
        self._preprocess_params, self._forward_params, self._postprocess_params = self._sanitize_parameters(**kwargs)

    @property
    def device(self) -> str:
        return self.model.device

    def _sanitize_parameters(self, **kwargs):
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected arguments: {', '.join(sorted(kwargs))}")
        return {}, {}, {}

    def preprocess(self, inputs, **kwargs):
        raise NotImplementedError

    def _forward(self, model_inputs, **kwargs):
        raise NotImplementedError

    def postprocess(self, model_outputs, **kwargs):
        raise NotImplementedError

    def _merged_params(self, kwargs):
        pre, fwd, post = self._sanitize_parameters(**kwargs)
        return ({**self._preprocess_params, **pre}, {**self._forward_params, **fwd}, {**self._postprocess_params, **post})

    def run_single(self, inputs, pre, fwd, post):
        return self.postprocess(self._forward(self.preprocess(inputs, **pre), **fwd), **post)

    def __call__(self, inputs, **kwargs):
        pre, fwd, post = self._merged_params(kwargs)
        if isinstance(inputs, list):
            if not inputs:
                raise ValueError(f"{self.task}: inputs is an empty list: pass at least one input")
            return [self.run_single(x, pre, fwd, post) for x in inputs]
        return self.run_single(inputs, pre, fwd, post)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={str(self.model.path)!r}, device={self.device!r})"
