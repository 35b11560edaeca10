"""onnxpipe: Hugging Face Transformers tasks on ONNX Runtime, with only onnxruntime, tokenizers and numpy at serve time.

    import onnxpipe
    classifier = onnxpipe.pipeline("sentiment-analysis", model="path/to/exported")
    classifier("I love you")  # [{'label': 'POSITIVE', 'score': 0.99...}]
"""
from .direct import AutoModel, load
from .model_dir import ModelDir, read_manifest
from .factory import pipeline
from .session import Session, SessionConfig, share_thread_pool
from .task_table import SUPPORTED_TASKS, TASK_ALIASES
from .tokenizer import Tokenizer
from .generation import TextIteratorStreamer, TextStreamer, top_k_top_p_filtering

__version__ = "0.1.0"
__all__ = ["top_k_top_p_filtering", "TextStreamer", "TextIteratorStreamer", "AutoModel", "load", "ModelDir", "Session", "SessionConfig", "share_thread_pool", "Tokenizer", "pipeline", "read_manifest", "SUPPORTED_TASKS", "TASK_ALIASES"]
