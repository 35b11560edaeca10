"""Tiny random transformers checkpoints with real tokenizer files, built offline.

The Hugging Face Hub is unreachable here, so tests and benchmarks build their
checkpoints from configs: random weights (seeded) and tokenizers trained on a
small bundled corpus (WordPiece for BERT-likes, byte-level BPE for RoBERTa,
GPT-2, Llama and BART, SentencePiece Unigram for T5). `size="base"` gives
BERT-base / DistilBERT-base / GPT-2-small shapes for benchmarks, where speed
does not depend on the weights' values.

    build_checkpoint("bert", "text-classification", "/tmp/ckpt")
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from onnxpipe.task_table import ENCODER_EXPORT_TASKS

ARCHITECTURES = ("bert", "distilbert", "roberta", "gpt2", "llama", "t5", "bart")
TASKS_BY_ARCH = {
    "bert": ENCODER_EXPORT_TASKS,
    "distilbert": ENCODER_EXPORT_TASKS,
    "roberta": ENCODER_EXPORT_TASKS,
    "gpt2": ("text-generation",),
    "llama": ("text-generation",),
    "t5": ("text2text-generation",),
    "bart": ("text2text-generation",),
}
NER_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
SENTIMENT_LABELS = ["NEGATIVE", "POSITIVE"]
# ChatML, as SmolLM2-Instruct uses, so the chat path is tested on a tiny model too.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_RECIPE_VERSION = 3  # bump when the builder changes what it writes
_DATA = Path(__file__).parent / "data"


def corpus_lines() -> list[str]:
    lines = []
    for name in sorted(os.listdir(_DATA)):
        if name.startswith("corpus"):
            lines += [ln.strip() for ln in (_DATA / name).read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines


def cached_checkpoint(arch: str, task: str, cache_dir: str | os.PathLike, size: str = "tiny", **overrides) -> Path:
    """Build (once) and return a cached checkpoint folder keyed by its recipe."""
    key = json.dumps([_RECIPE_VERSION, arch, task, size, sorted(overrides.items())], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    dest = Path(cache_dir) / f"{arch}-{task}-{size}-{digest}"
    if (dest / ".complete").exists():
        return dest
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=cache_dir))
    try:
        build_checkpoint(arch, task, tmp, size=size, **overrides)
        (tmp / ".complete").write_text(key)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def build_checkpoint(arch: str, task: str, dest: str | os.PathLike, size: str = "tiny", seed: int = 0, **overrides) -> Path:
    """Write a random `arch` model for `task` with a trained tokenizer into `dest`."""
    import torch
    import transformers

    if arch not in TASKS_BY_ARCH:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    if task not in TASKS_BY_ARCH[arch]:
        raise ValueError(f"{arch} tiny checkpoints are built for {TASKS_BY_ARCH[arch]}, not {task!r}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(arch, dest)
    config = _build_config(arch, task, tokenizer, size)
    for k, v in overrides.items():
        setattr(config, k, v)
    from .checkpoint import model_class

    model_cls = model_class(task)
    torch.manual_seed(seed)
    model = model_cls.from_config(config)
    model.eval()
    if model.can_generate():
        model.generation_config = transformers.GenerationConfig.from_model_config(config)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _build_config(arch, task, tokenizer, size):
    import transformers

    vocab = len(tokenizer)
    base = size == "base"
    labels = {}
    if task == "text-classification":
        labels = dict(id2label=dict(enumerate(SENTIMENT_LABELS)), label2id={l: i for i, l in enumerate(SENTIMENT_LABELS)})
    elif task == "token-classification":
        labels = dict(id2label=dict(enumerate(NER_LABELS)), label2id={l: i for i, l in enumerate(NER_LABELS)})
    special = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    if arch == "bert":
        dims = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072) if base else \
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
        return transformers.BertConfig(vocab_size=vocab, max_position_embeddings=512, type_vocab_size=2,
                                       pad_token_id=tokenizer.pad_token_id, **dims, **labels)
    if arch == "distilbert":
        dims = dict(dim=768, n_layers=6, n_heads=12, hidden_dim=3072) if base else dict(dim=32, n_layers=2, n_heads=4, hidden_dim=37)
        return transformers.DistilBertConfig(vocab_size=vocab, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                                             **dims, **labels)
    if arch == "roberta":
        dims = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072) if base else \
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
        # RoBERTa's positions start after padding_idx, so 512 tokens need 514 positions.
        return transformers.RobertaConfig(vocab_size=vocab, max_position_embeddings=514, type_vocab_size=1, **special, **dims, **labels)
    if arch == "gpt2":
        dims = dict(n_embd=768, n_layer=12, n_head=12) if base else dict(n_embd=32, n_layer=2, n_head=4)
        return transformers.GPT2Config(vocab_size=vocab, n_positions=1024 if base else 256, initializer_range=0.2,
                                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **dims)
    if arch == "llama":
        dims = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536) if base else \
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=37)
        return transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=2048 if base else 256, initializer_range=0.2,
                                         tie_word_embeddings=True, rope_theta=10000.0, **special, **dims)
    if arch == "t5":
        dims = dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8) if base else dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
        return transformers.T5Config(vocab_size=vocab, decoder_start_token_id=tokenizer.pad_token_id, initializer_factor=1.0,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **dims)
    if arch == "bart":
        dims = dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12, decoder_attention_heads=12,
                    encoder_ffn_dim=3072, decoder_ffn_dim=3072) if base else \
            dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                 encoder_ffn_dim=37, decoder_ffn_dim=37)
        return transformers.BartConfig(vocab_size=vocab, max_position_embeddings=256, init_std=0.2,
                                       decoder_start_token_id=tokenizer.eos_token_id, forced_eos_token_id=tokenizer.eos_token_id,
                                       **special, **dims)
    raise AssertionError(arch)


def _build_tokenizer(arch, dest: Path):
    """Train a small tokenizer of the architecture's own kind and wrap it in its transformers class."""
    import transformers
    from tokenizers import ByteLevelBPETokenizer, BertWordPieceTokenizer

    lines = corpus_lines()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if arch in ("bert", "distilbert"):
            wp = BertWordPieceTokenizer(lowercase=True, strip_accents=None)
            wp.train_from_iterator(lines, vocab_size=1500, min_frequency=1)
            wp.save_model(str(work))
            cls = transformers.BertTokenizerFast if arch == "bert" else transformers.DistilBertTokenizerFast
            return cls(vocab_file=str(work / "vocab.txt"), do_lower_case=True, model_max_length=512)
        if arch == "t5":
            import sentencepiece as spm

            (work / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
            spm.SentencePieceTrainer.train(
                input=str(work / "corpus.txt"), model_prefix=str(work / "spm"), vocab_size=800, model_type="unigram",
                pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
            )
            return transformers.T5TokenizerFast(vocab_file=str(work / "spm.model"), extra_ids=8, model_max_length=512,
                                                legacy=False)
        specials = {
            "roberta": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
            "bart": ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
            "gpt2": ["<|endoftext|>"],
            "llama": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        }[arch]
        bpe = ByteLevelBPETokenizer(add_prefix_space=False)
        bpe.train_from_iterator(lines, vocab_size=1200, min_frequency=1, special_tokens=specials)
        bpe.save_model(str(work))
        vocab, merges = str(work / "vocab.json"), str(work / "merges.txt")
        if arch == "roberta":
            return transformers.RobertaTokenizerFast(vocab_file=vocab, merges_file=merges, model_max_length=512)
        if arch == "bart":
            return transformers.BartTokenizerFast(vocab_file=vocab, merges_file=merges, model_max_length=256)
        if arch == "gpt2":
            tok = transformers.GPT2TokenizerFast(vocab_file=vocab, merges_file=merges, model_max_length=256)
            return tok
        # llama: SmolLM2-style byte-level BPE, ChatML special tokens, no BOS added.
        tok = transformers.GPT2TokenizerFast(
            vocab_file=vocab, merges_file=merges, model_max_length=256,
            bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|im_end|>",
        )
        tok.chat_template = CHAT_TEMPLATE
        return tok
