"""Fine-tune the MiniLM encoder with a task head (sentence or token classification) on these 2 CPU cores.

Build time only (imports torch and transformers). One plain loop for both heads: AdamW with
linear warm-up and decay, seeded shuffling, sequences cut at `max_length`. Every example is
tokenized once, before training; each batch is padded to its longest row. With
`"batching": "length-buckets"` the seeded shuffle is cut into pools of `bucket_batches` batches,
each pool sorted by length and cut into batches, and the batches of the epoch shuffled (seeded):
rows of similar length train together, so the padding nearly vanishes. With
`"precision": "bf16-if-native"` the forward and backward run under
`torch.autocast("cpu", dtype=torch.bfloat16)` where the CPU has native bf16 (the amx_bf16 or
avx512_bf16 flag in /proc/cpuinfo), in fp32 elsewhere; the weights and the optimizer stay fp32
and the saved checkpoint is fp32 either way. The precision used is returned, and the build
records it. Writes a transformers checkpoint (model + tokenizer) that `export_model` reads.
"""
from __future__ import annotations

import math
import random
import sys
import time
import warnings
from pathlib import Path

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = "/proc/cpuinfo"


def finetune_text_classification(base: Path, examples: list[tuple[str, int]], labels: list[str], out: Path,
                                 train: dict, log=None) -> tuple[Path, dict]:
    """examples: (sentence, label id). Saves a BertForSequenceClassification checkpoint into `out`.

    Returns the checkpoint folder and what the training did (steps, precision, seconds, padding).
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _seed(train["seed"])
    tokenizer = AutoTokenizer.from_pretrained(base, local_files_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "newly initialized: classifier.*" is the point
        model = AutoModelForSequenceClassification.from_pretrained(
            base, local_files_only=True, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={l: i for i, l in enumerate(labels)}, dtype=torch.float32)
    examples = _limit(examples, train)
    enc = tokenizer([t for t, _ in examples], truncation=True, max_length=train["max_length"])
    features = [{**{k: enc[k][i] for k in enc.keys()}, "labels": y} for i, (_, y) in enumerate(examples)]
    info = _train_loop(model, features, tokenizer.pad_token_id, train, log or _log)
    return _save(model, tokenizer, out), info


def finetune_token_classification(base: Path, sentences: list[tuple[list[str], list[str]]], labels: list[str],
                                  out: Path, train: dict, log=None) -> tuple[Path, dict]:
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
    sentences = _limit(sentences, train)
    enc = tokenizer([w for w, _ in sentences], is_split_into_words=True, truncation=True,
                    max_length=train["max_length"])
    features = []
    for b, (_, tags) in enumerate(sentences):
        targets, previous = [], None
        for word in enc.word_ids(b):
            targets.append(label2id[tags[word]] if word is not None and word != previous else -100)
            previous = word
        features.append({**{k: enc[k][b] for k in enc.keys()}, "labels": targets})
    info = _train_loop(model, features, tokenizer.pad_token_id, train, log or _log)
    return _save(model, tokenizer, out), info


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16), read from /proc/cpuinfo's flags."""
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in NATIVE_BF16_FLAGS)
    except OSError:
        pass
    return False


def training_precision(train: dict) -> str:
    """"bf16" or "fp32": what the recipe's `precision` asks for, on this CPU."""
    want = train.get("precision", "fp32")
    if want == "fp32":
        return "fp32"
    if want in ("bf16-if-native", "bf16"):
        return "bf16" if want == "bf16" or native_bf16() else "fp32"
    raise ValueError(f"train.precision must be fp32, bf16-if-native or bf16, not {want!r}")


def _train_loop(model, features: list[dict], pad_id: int, train: dict, log) -> dict:
    import torch

    # export_model switches autograd off process-wide; a build after an export (several defaults
    # built in one process) must switch it back on.
    with torch.enable_grad():
        info = _train_steps(model, features, pad_id, train, log)
    model.eval()
    return info


def _train_steps(model, features: list[dict], pad_id: int, train: dict, log) -> dict:
    import contextlib

    import torch

    frozen = _freeze(model, train.get("freeze_layers"))
    batch_size = train["batch_size"]
    steps_per_epoch = math.ceil(len(features) / batch_size)
    total = steps_per_epoch * train["epochs"]
    if train.get("max_steps"):
        total = min(total, int(train["max_steps"]))
    warmup = int(total * train.get("warmup_ratio", 0.0))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    trained = decay + no_decay
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train.get("weight_decay", 0.0)},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=train["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    precision = training_precision(train)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
    batching = train.get("batching", "shuffled")
    lengths = [len(f["input_ids"]) for f in features]
    rng = random.Random(train["seed"])
    model.train()
    step, started, running, tokens, padded = 0, time.monotonic(), None, 0, 0
    report_every = max(1, total // 20)
    log(f"training {type(model).__name__} on {len(features)} examples: {total} steps of {batch_size} "
        f"({train['epochs']} epoch(s), lr {train['lr']}, max_length {train['max_length']}{frozen}, "
        f"{batching} batches, {precision})")
    while step < total:
        for rows in _epoch_batches(lengths, batch_size, rng, batching, train.get("bucket_batches", 50)):
            if step >= total:
                break
            batch = _pad([features[i] for i in rows], pad_id)
            tokens += sum(lengths[i] for i in rows)
            padded += batch["input_ids"].numel()
            with autocast():
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            value = loss.item()
            running = value if running is None else 0.9 * running + 0.1 * value
            if step % report_every == 0 or step == total:
                elapsed = time.monotonic() - started
                log(f"  step {step}/{total}  loss {running:.3f}  {_mmss(elapsed)} elapsed, "
                    f"~{_mmss(elapsed / step * (total - step))} left")
    seconds = time.monotonic() - started
    return {"steps": step, "examples": len(features), "batching": batching, "precision": precision,
            "native_bf16": native_bf16(), "seconds": round(seconds, 1),
            "padding": round(1 - tokens / max(1, padded), 3), "final_loss": round(running or 0.0, 4)}


def _epoch_batches(lengths: list[int], batch_size: int, rng: random.Random, batching: str, pool_batches: int):
    """One epoch's batches (lists of example indices), in training order; seeded through `rng`."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if batching == "shuffled":
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if batching != "length-buckets":
        raise ValueError(f"train.batching must be shuffled or length-buckets, not {batching!r}")
    pool = batch_size * pool_batches
    batches = []
    for p in range(0, len(order), pool):
        chunk = sorted(order[p:p + pool], key=lengths.__getitem__)  # stable: equal lengths keep the shuffle
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _pad(rows: list[dict], pad_id: int) -> dict:
    """Right-pad every row to the longest (input ids with the pad id, token labels with -100, the rest 0)."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    batch = {}
    for key, first in rows[0].items():
        if not isinstance(first, list):
            batch[key] = torch.tensor([r[key] for r in rows])
            continue
        fill = pad_id if key == "input_ids" else -100 if key == "labels" else 0
        batch[key] = torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows])
    return batch


def _limit(items: list, train: dict) -> list:
    return list(items)[: train.get("train_limit") or None]


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
