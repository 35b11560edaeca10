"""The "tokenizer + model" style of transformers, without torch: numpy feeds in, numpy outputs out.

    model = onnxpipe.load("exported/sst2")            # or onnxpipe.AutoModel.from_dir(...)
    feeds = model.tokenizer(["I love it", "meh"])     # {'input_ids': int64 [2, seq], ...}
    logits = model(**feeds).logits                    # numpy [2, num_labels]
    model.id2label[int(logits[0].argmax())]
"""
from __future__ import annotations

import os

import numpy as np

from .model_dir import ModelDir
from .tasks._common import check_texts
from .tokenizer import to_numpy


def load(path: str | os.PathLike, *, precision: str = "fp32", device="cpu", **session_kwargs) -> "DirectModel":
    """Load an exported encoder model folder for direct calls (see the module docstring)."""
    return DirectModel(ModelDir(path, precision=precision, device=device, **session_kwargs))


class AutoModel:
    """`AutoModel.from_dir(path)`, spelled the way transformers users reach for a model."""

    from_dir = staticmethod(load)


class Outputs(dict):
    """The graph's outputs by name; `out.logits` works as well as `out['logits']`."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the model has no output {name!r} (it has: {', '.join(self)})") from None


class DirectModel:
    def __init__(self, model_dir: ModelDir):
        if "model" not in model_dir.roles:
            raise ValueError(f"model dir '{model_dir.path}' has graphs {', '.join(model_dir.roles)}, not one 'model' "
                             f"graph: use onnxpipe.pipeline({model_dir.task!r}, ...) for it")
        self.model_dir = model_dir
        self.manifest = model_dir.manifest
        self.session = model_dir.session("model")
        self.tokenizer = DirectTokenizer(model_dir.tokenizer, self.session.input_names)

    @property
    def id2label(self) -> dict[int, str] | None:
        labels = self.manifest.get("id2label")
        return None if labels is None else {int(k): v for k, v in labels.items()}

    @property
    def input_names(self) -> list[str]:
        return list(self.session.input_names)

    def __call__(self, **feeds) -> Outputs:
        unknown = sorted(set(feeds) - set(self.session.input_names))
        if unknown:
            raise TypeError(f"the model takes {', '.join(self.session.input_names)}; got unexpected "
                            f"{', '.join(unknown)}")
        arrays = {}
        for name, value in feeds.items():
            array = np.asarray(value)
            if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
                raise ValueError(f"{name} must be integer ids shaped [batch, sequence], got {array.dtype} "
                                 f"{list(array.shape)}")
            arrays[name] = array.astype(np.int64, copy=False)
        return Outputs(self.session.run(arrays))

    def __repr__(self) -> str:
        return f"DirectModel({str(self.model_dir.path)!r}, task={self.model_dir.task!r})"


class DirectTokenizer:
    """The model's tokenizer, returning numpy feeds that only name inputs the graph takes."""

    def __init__(self, tokenizer, input_names):
        self._tok = tokenizer
        self._input_names = list(input_names)

    def __call__(self, text, text_pair=None, *, padding=True, truncation=None, max_length: int | None = None,
                 add_special_tokens: bool = True, return_tensors: str = "np") -> dict[str, np.ndarray]:
        if return_tensors != "np":
            raise ValueError(f"return_tensors={return_tensors!r}: onnxpipe returns numpy arrays only ('np')")
        if truncation is None:  # cut at the model's limit when it has one, so no input overruns its positions
            truncation = (max_length or self._tok.model_max_length) is not None
        texts, _ = check_texts(text, "text")
        pairs = None if text_pair is None else check_texts(text_pair, "text_pair")[0]
        if pairs is not None and len(pairs) != len(texts):
            raise ValueError(f"text has {len(texts)} items but text_pair has {len(pairs)}")
        encodings = self._tok.encode_batch(texts, pairs, padding=padding, truncation=truncation, max_length=max_length,
                                           add_special_tokens=add_special_tokens)
        if len({len(e.ids) for e in encodings}) > 1:
            raise ValueError("the texts have different lengths: pass padding=True to batch them")
        return {k: v for k, v in to_numpy(encodings).items() if k in self._input_names}

    def __getattr__(self, name):
        # decode, batch_decode, convert_ids_to_tokens, mask_token, ... come from the runtime tokenizer.
        return getattr(self._tok, name)

