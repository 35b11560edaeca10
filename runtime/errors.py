"""The runtime's own exception types, for faults that are not the caller's input (those are ValueError/TypeError)."""
from __future__ import annotations


class ModelOutputError(RuntimeError):
    """The model produced values no result can be made from (NaN, infinity): its weights or its export are broken."""


class ModelRunError(RuntimeError):
    """ONNX Runtime failed to run the graph for a reason other than its inputs."""


class InputRejected(ValueError):
    """ONNX Runtime refused the inputs (a shape, an index out of range): a fault of the input, said in one line."""
