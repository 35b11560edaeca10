"""The one table of tasks: each pipeline task, the class that runs it, and the export task of the model folders it
runs on; and the aliases users type.

`pipeline()`, `onnxpipe export --task`, the CLI help, the tiny test-model builder and the tests all read it.
Plain data on purpose: importing it loads no pipeline and nothing heavy, so the export side (torch) and the
serve side (onnxruntime) can both read it. Adding a task is one file under runtime/tasks/ plus one row here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Task:
    name: str
    module: str           # the file under onnxpipe.tasks
    class_name: str       # the pipeline class in it
    export_task: str      # the manifest task of the model folders it runs on (what `onnxpipe export --task` writes)
    summary: str

    @property
    def generates(self) -> bool:
        """Runs a generation loop (decoder or encoder-decoder) rather than one forward pass per input."""
        return self.export_task in GENERATION_EXPORT_TASKS


GENERATION_EXPORT_TASKS = ("text-generation", "text2text-generation")

SUPPORTED_TASKS: dict[str, Task] = {t.name: t for t in (
    Task("text-classification", "text_classification", "TextClassificationPipeline", "text-classification",
         "labels for a text or a text pair (sentiment, NLI)"),
    Task("token-classification", "token_classification", "TokenClassificationPipeline", "token-classification",
         "a label per token, grouped into entities (NER)"),
    Task("question-answering", "question_answering", "QuestionAnsweringPipeline", "question-answering",
         "the answer span of a question in a context"),
    Task("fill-mask", "fill_mask", "FillMaskPipeline", "fill-mask", "the likeliest tokens for a mask"),
    Task("feature-extraction", "feature_extraction", "FeatureExtractionPipeline", "feature-extraction",
         "the hidden states of each token"),
    Task("sentence-similarity", "feature_extraction", "SentenceEmbeddingPipeline", "feature-extraction",
         "pooled sentence embeddings, as sentence-transformers"),
    Task("text-generation", "text_generation", "TextGenerationPipeline", "text-generation",
         "continue a prompt or a chat (decoder with KV cache)"),
    Task("text2text-generation", "text2text_generation", "Text2TextGenerationPipeline", "text2text-generation",
         "text to text with an encoder-decoder"),
    Task("summarization", "text2text_generation", "SummarizationPipeline", "text2text-generation",
         "summaries with an encoder-decoder"),
    Task("translation", "text2text_generation", "TranslationPipeline", "text2text-generation",
         "translations with an encoder-decoder (translation_xx_to_yy too)"),
)}

TASK_ALIASES = {
    "sentiment-analysis": "text-classification",
    "ner": "token-classification",
    "embeddings": "sentence-similarity",
    "chat": "text-generation",
}
# Names only `onnxpipe export --task` takes: optimum's and the model heads' words for the same exports.
EXPORT_ALIASES = {"causal-lm": "text-generation", "masked-lm": "fill-mask", "seq2seq-lm": "text2text-generation"}

#: what `onnxpipe export` writes, in table order
EXPORT_TASKS: tuple[str, ...] = tuple(dict.fromkeys(t.export_task for t in SUPPORTED_TASKS.values()))
ENCODER_EXPORT_TASKS: tuple[str, ...] = tuple(t for t in EXPORT_TASKS if t not in GENERATION_EXPORT_TASKS)


def normalize_task(task: str) -> str:
    """A pipeline task or alias -> its row's name; an unknown one is a ValueError listing the known ones."""
    if not isinstance(task, str):
        raise TypeError(f"task must be a string such as 'sentiment-analysis', got {type(task).__name__}")
    if task.startswith("translation_"):  # transformers' translation_en_to_de
        return "translation"
    task = TASK_ALIASES.get(task, task)
    if task not in SUPPORTED_TASKS:
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(task_names())}")
    return task


def export_task(task: str) -> str:
    """Any pipeline task, alias or export alias -> the export task that serves it (ValueError when unknown)."""
    if task in EXPORT_ALIASES:
        return EXPORT_ALIASES[task]
    try:
        return SUPPORTED_TASKS[normalize_task(task)].export_task
    except (ValueError, TypeError):
        raise ValueError(f"unknown task {task!r}: use one of {', '.join(EXPORT_TASKS)}, or a pipeline task "
                         f"({', '.join(task_names())})") from None


# transformers' head class name endings -> the export task a checkpoint of that class is for (first match wins)
ARCHITECTURE_SUFFIXES = (
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "fill-mask"),
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
)


def task_for_architectures(architectures, is_encoder_decoder: bool) -> str | None:
    """config.json's `architectures` -> the export task its head is for, or None when no name says.

    The exporter (a transformers config) and the importer of ready-made ONNX repos (config.json read as JSON)
    both read it, so a checkpoint and its ONNX export get the same task."""
    for arch in architectures or ():
        for suffix, task in ARCHITECTURE_SUFFIXES:
            if arch.endswith(suffix):
                return task
        if arch.endswith("ForConditionalGeneration") and is_encoder_decoder:
            return "text2text-generation"
        if arch.endswith("Model"):
            return "feature-extraction"
    return None


def task_names() -> list[str]:
    """Every name `pipeline()` takes, sorted."""
    return sorted(set(SUPPORTED_TASKS) | set(TASK_ALIASES))
