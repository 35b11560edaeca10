"""`python -m onnxpipe.demo` (what `make demo` runs): the seed's task examples, run through onnxpipe.

It says which built-in defaults are not built yet and about how long they take, then prints each example the way
the seed's transformers code prints it, each section building the one default it needs when it comes (cached in
.cache/models; the first build needs the `export` extra), sentiment first. A section whose pipeline or model is not
available says why and the demo goes on. Where no real model can be had offline (paraphrase classification,
extractive QA, fill-mask) the demo says so, shows what can honestly be shown instead, and its last line counts what
was shown and gives the command that would get each missing model.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

SEQUENCE_0 = "The company HuggingFace is based in New York City"
SEQUENCE_1 = "Apples are especially bad for your health"
SEQUENCE_2 = "HuggingFace's headquarters are situated in Manhattan"
DUMBO = "Hugging Face is based in DUMBO, New York City, and"
NER_SEQUENCE = """Hugging Face Inc. is a company based in New York City. Its headquarters are in DUMBO,
therefore very close to the Manhattan Bridge which is visible from the window."""
QA_CONTEXT = r"""
Extractive Question Answering is the task of extracting an answer from a text given a question. An example of a
question answering dataset is the SQuAD dataset, which is entirely based on that task. If you would like to fine-tune
a model on a SQuAD task, you may leverage the examples/pytorch/question-answering/run_squad.py script.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m onnxpipe.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--precision", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--no-build", action="store_true", help="use only the defaults already built")
    parser.add_argument("--seed", type=int, default=0, help="seed for the sampling examples")
    args = parser.parse_args(argv)

    _print_plan(args)
    outcomes = []
    for title, needs, section in SECTIONS:
        print(f"\n### {title}\n", flush=True)
        started = time.perf_counter()
        try:
            outcome = section(args) or SHOWN  # each section builds the one default it needs, when it needs it
            if outcome is SHOWN:
                print(f"  ({time.perf_counter() - started:.1f} s)")
        except Exception as e:  # one broken section must not hide the others
            outcome = Missing(f"{type(e).__name__}: {e}")
            print(f"  [not shown: {outcome.why}]")
        outcomes.append((title, outcome))
    print("\n" + closing_line(outcomes))
    return 0


class Missing:
    """A section that could not show its task's result: why, and the one command that would get it."""

    def __init__(self, why: str, command: str | None = None):
        self.why, self.command = why, command


SHOWN, STAND_IN = "shown", "stand-in"


def closing_line(outcomes: list) -> str:
    """How many sections showed a real model's result for their task, which showed a stand-in, which could not."""
    shown = [t for t, o in outcomes if o is SHOWN]
    stand_in = [t for t, o in outcomes if o is STAND_IN]
    missing = [(t, o) for t, o in outcomes if isinstance(o, Missing)]
    line = f"{len(shown)} of {len(outcomes)} sections showed a real model's result"
    if stand_in:
        line += f"; {len(stand_in)} showed a stand-in ({', '.join(stand_in)})"
    if missing:
        line += "; not shown: " + "; ".join(f"{t} ({o.command or o.why})" for t, o in missing)
    return line + "."


def _print_plan(args) -> None:
    """Which defaults the sections need, which are built, and how long building the others takes here."""
    from onnxpipe.models import check_built, load_registry, model_path

    registry = load_registry()
    todo = []
    for task in dict.fromkeys(t for _, needs, _ in SECTIONS for t in needs):
        if not registry.has_builtin(task):
            continue
        model = registry.for_task(task)
        if check_built(model, model_path(model)) is not None and model.name not in [m for m, _ in todo]:
            todo.append((model.name, model.build_minutes_seen))
    if not todo:
        print("Every built-in default the demo uses is built: the sections follow.", flush=True)
        return
    verb = "missing (--no-build: those sections say so)" if args.no_build else "built when its section comes"
    total = sum(m or 0 for _, m in todo)
    print(f"Built-in defaults not built yet, each {verb}: " + ", ".join(
        f"{name} (~{m} min)" if m else name for name, m in todo) +
        (f"; about {total} minutes in all on 2 cores (cached in .cache/models, once)." if total and not args.no_build
         else "."), flush=True)


def _pipeline(task, args, **kwargs):
    from onnxpipe import pipeline

    return pipeline(task, model=_model(task, args), precision=args.precision, **kwargs)


def _model(task, args):
    """None (the default, built on first use) or, with --no-build, the already built default folder."""
    from onnxpipe.models import default_model_dir

    return default_model_dir(task, build=False) if args.no_build else default_model_dir(task)


def sentiment(args) -> None:
    classifier = _pipeline("sentiment-analysis", args)
    for text in ("I hate you", "I love you"):
        result = classifier(text)[0]
        print(f"label: {result['label']}, with score: {round(float(result['score']), 4)}")


def paraphrase(args) -> None:
    from onnxpipe.models import load_registry

    print("No paraphrase (MRPC) classifier can be built offline: no paraphrase data ships in any reachable "
          "package.\nShown instead: cosine similarity of the default sentence embeddings "
          f"({load_registry().for_task('sentence-similarity').name}), which is not a paraphrase probability.")
    embed = _pipeline("sentence-similarity", args)
    e0, e1, e2 = embed([SEQUENCE_0, SEQUENCE_1, SEQUENCE_2])
    print(f"sequence_0 vs sequence_2 (a paraphrase):      cosine similarity {float(e0 @ e2):.2f}")
    print(f"sequence_0 vs sequence_1 (not a paraphrase):  cosine similarity {float(e0 @ e1):.2f}")
    return STAND_IN


def _pipeline_or_why_not(task, args):
    """The task's default pipeline, or a Missing saying why it has none and the command that would get one."""
    try:
        return _pipeline(task, args)
    except ValueError as e:
        print(f"No default: {e}")
        return Missing(str(e).splitlines()[0], _command_for(task))


def _command_for(task: str) -> str | None:
    from onnxpipe.models import load_registry

    default = load_registry().transformers_defaults.get(task)
    if default is None:
        return None
    onnx = default.onnx_model or default.model
    return (f"needs {default.model} from the Hugging Face Hub: `HF_HUB_OFFLINE=0 python -m onnxpipe.demo` with "
            f"network access, or `onnxpipe import {onnx} --out models/{task}`")


def question_answering(args) -> None:
    qa = _pipeline_or_why_not("question-answering", args)
    if isinstance(qa, Missing):
        return qa
    for question in ("What is extractive question answering?",
                     "What is a good example of a question answering dataset?"):
        result = qa(question=question, context=QA_CONTEXT)
        print(f"Answer: '{result['answer']}', score: {round(float(result['score']), 4)}, "
              f"start: {result['start']}, end: {result['end']}")


def fill_mask(args) -> None:
    unmasker = _pipeline_or_why_not("fill-mask", args)
    if isinstance(unmasker, Missing):
        return unmasker
    mask = unmasker.tokenizer.mask_token
    sequence = ("Distilled models are smaller than the models they mimic. Using them instead of the large "
                f"versions would help {mask} our carbon footprint.")
    for r in unmasker(sequence):
        print(r["sequence"])


def next_token(args) -> None:
    """The seed's top_k_top_p_filtering example: one sampled next token after the prompt."""
    from onnxpipe import ModelDir
    from onnxpipe.generation import DecoderStepper, softmax, top_k_top_p_filtering

    model = ModelDir(_model("text-generation", args), precision=args.precision)
    inputs = model.tokenizer([DUMBO])
    input_ids = inputs["input_ids"]
    next_token_logits = DecoderStepper(model.session(), model.manifest["kv_cache"]).prefill(
        input_ids, inputs["attention_mask"])
    filtered_next_token_logits = top_k_top_p_filtering(next_token_logits, top_k=50, top_p=1.0)
    probs = softmax(filtered_next_token_logits, axis=-1)
    rng = np.random.default_rng(args.seed)
    p = probs[0].astype(np.float64)  # numpy's sampler wants the sum to be 1 in float64
    next_id = rng.choice(p.shape[-1], p=p / p.sum())
    generated = np.concatenate([input_ids, [[next_id]]], axis=-1)
    print(model.tokenizer.decode(generated[0], skip_special_tokens=True))


def text_generation(args) -> None:
    text_generator = _pipeline("text-generation", args)
    # The seed passes max_length=50; under the pipeline's own max_new_tokens=256 default, transformers 4.57
    # (and so onnxpipe) lets max_new_tokens win, so the seed's intent (about 50 tokens in all) is asked directly.
    print(text_generator("As far as I am concerned, I will", max_new_tokens=40, do_sample=False))
    print(text_generator(DUMBO, max_new_tokens=40, do_sample=True, top_k=50, top_p=0.95, seed=args.seed))


def ner(args) -> None:
    ner_pipe = _pipeline("ner", args)
    for entity in ner_pipe(NER_SEQUENCE):
        print({**entity, "score": round(float(entity["score"]), 4)})


def chat(args) -> None:
    chatbot = _pipeline("text-generation", args)
    messages = [{"role": "user", "content": "What is 2+2?"}]
    reply = chatbot(messages, max_new_tokens=48, do_sample=False)[0]["generated_text"][-1]
    print(f"user: {messages[0]['content']}\n{reply['role']}: {reply['content']}")


# (title, the tasks whose default the section needs, the section); sentiment first: the first default a new
# machine builds is the one the first section shows
SECTIONS = [
    ("Sequence classification: sentiment", ("text-classification",), sentiment),
    ("Sequence classification: paraphrase", ("sentence-similarity",), paraphrase),
    ("Extractive question answering", ("question-answering",), question_answering),
    ("Masked language modeling", ("fill-mask",), fill_mask),
    ("Causal language modeling: next-token sampling with top_k_top_p_filtering", ("text-generation",), next_token),
    ("Text generation", ("text-generation",), text_generation),
    ("Named entity recognition", ("token-classification",), ner),
    ("Chat", ("text-generation",), chat),
]

if __name__ == "__main__":
    sys.exit(main())
