"""Fine-tune the MiniLM encoder with a task head (sentence or token classification) on these 2 CPU cores.

Build time only (imports torch and transformers). One plain loop for both heads: AdamW with
linear warm-up and decay, seeded shuffling, batches padded to their longest row, sequences cut
at `max_length`. Writes a transformers checkpoint (model + tokenizer) that `export_model` reads.
"""
from __future__ import annotations

import math
import random
import sys
import time
import warnings
from pathlib import Path


def finetune_text_classification(base: Path, examples: list[tuple[str, int]], labels: list[str], out: Path,
                                 train: dict, log=None) -> Path:
    """examples: (sentence, label id). Saves a BertForSequenceClassification checkpoint into `out`."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _seed(train["seed"])
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "newly initialized: classifier.*" is the point
        model = AutoModelForSequenceClassification.from_pretrained(
            base, local_files_only=True, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={l: i for i, l in enumerate(labels)}, dtype=torch.float32)

    def collate(rows):
        enc = tokenizer([t for t, _ in rows], truncation=True, max_length=train["max_length"], padding=True,
                        return_tensors="pt")
        enc["labels"] = torch.tensor([y for _, y in rows])
        return enc

    _train_loop(model, examples, collate, train, log or _log)
    return _save(model, tokenizer, out)


def finetune_token_classification(base: Path, sentences: list[tuple[list[str], list[str]]], labels: list[str],
                                  out: Path, train: dict, log=None) -> Path:
    """sentences: (words, BIO tags). The first sub-token of each word carries its tag; the rest are ignored."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    _seed(train["seed"])
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    label2id = {l: i for i, l in enumerate(labels)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForTokenClassification.from_pretrained(
            base, local_files_only=True, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id=label2id, dtype=torch.float32)

    def collate(rows):
        enc = tokenizer([w for w, _ in rows], is_split_into_words=True, truncation=True,
                        max_length=train["max_length"], padding=True, return_tensors="pt")
        targets = torch.full(enc["input_ids"].shape, -100, dtype=torch.long)
        for b, (_, tags) in enumerate(rows):
            previous = None
            for pos, word in enumerate(enc.word_ids(b)):
                if word is not None and word != previous:
                    targets[b, pos] = label2id[tags[word]]
                previous = word
        enc["labels"] = targets
        return enc

    _train_loop(model, sentences, collate, train, log or _log)
    return _save(model, tokenizer, out)


def _train_loop(model, examples: list, collate, train: dict, log) -> None:
    import torch

    # export_model switches autograd off process-wide; a build after an export (several defaults
    # built in one process) must switch it back on.
    with torch.enable_grad():
        _train_steps(model, examples, collate, train, log)
    model.eval()


def _train_steps(model, examples: list, collate, train: dict, log) -> None:
    import torch

    examples = list(examples)[: train.get("train_limit") or None]
    frozen = _freeze(model, train.get("freeze_layers"))
    batch_size = train["batch_size"]
    steps_per_epoch = math.ceil(len(examples) / batch_size)
    total = steps_per_epoch * train["epochs"]
    if train.get("max_steps"):
        total = min(total, int(train["max_steps"]))
    warmup = int(total * train.get("warmup_ratio", 0.0))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train.get("weight_decay", 0.0)},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=train["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    rng = random.Random(train["seed"])
    model.train()
    step, started, running = 0, time.monotonic(), None
    report_every = max(1, total // 20)
    log(f"training {type(model).__name__} on {len(examples)} examples: {total} steps of {batch_size} "
        f"({train['epochs']} epoch(s), lr {train['lr']}, max_length {train['max_length']}{frozen})")
    while step < total:
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            if step >= total:
                break
            batch = collate([examples[i] for i in order[start:start + batch_size]])
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            if step % report_every == 0 or step == total:
                elapsed = time.monotonic() - started
                log(f"  step {step}/{total}  loss {running:.3f}  {_mmss(elapsed)} elapsed, "
                    f"~{_mmss(elapsed / step * (total - step))} left")


def _freeze(model, layers) -> str:
    """Keep the embeddings and the first `layers` encoder layers as released (None: train everything).

    On 2 shared cores this is what makes a build take minutes: no gradient flows below the
    first trained layer, and the 30k x 384 word-embedding matrix gets no dense gradient or
    AdamW update.
    """
    if layers is None:
        return ""
    encoder = model.base_model
    frozen = [encoder.embeddings, *encoder.encoder.layer[:layers]]
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return f", embeddings and layers 0-{layers - 1} frozen" if layers else ", embeddings frozen"


def _save(model, tokenizer, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _seed(seed: int) -> None:
    import torch

    random.seed(seed)
    torch.manual_seed(seed)


def _mmss(seconds: float) -> str:
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def _log(msg: str) -> None:
    print(f"onnxpipe: {msg}", file=sys.stderr, flush=True)
