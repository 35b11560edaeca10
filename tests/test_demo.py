"""`make demo`'s own behaviour (the sections themselves need the built defaults and are run by `make demo`): its
closing line counts honestly what was shown, and each section builds only the default it needs, when it comes."""
from __future__ import annotations

import pytest

from onnxpipe import demo


def test_closing_line_counts_shown_stand_ins_and_missing_models(monkeypatch, capsys):
    calls = []

    def shown(args):
        calls.append("shown")
        print("label: POSITIVE")

    def stand_in(args):
        calls.append("stand-in")
        return demo.STAND_IN

    def missing(args):
        calls.append("missing")
        return demo.Missing("no default for question-answering offline", "onnxpipe import ORG/QA --out models/qa")

    def broken(args):
        calls.append("broken")
        raise ValueError("the default model 'x' is not usable (not built): build it with `onnxpipe build`")

    monkeypatch.setattr(demo, "SECTIONS", [("Sentiment", ("text-classification",), shown),
                                           ("Paraphrase", ("sentence-similarity",), stand_in),
                                           ("QA", ("question-answering",), missing),
                                           ("NER", ("token-classification",), broken)])
    monkeypatch.setattr(demo, "_print_plan", lambda args: None)
    assert demo.main(["--no-build"]) == 0
    assert calls == ["shown", "stand-in", "missing", "broken"]  # one broken section does not hide the others
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("1 of 4 sections showed a real model's result; 1 showed a stand-in (Paraphrase)")
    assert "QA (onnxpipe import ORG/QA --out models/qa)" in last
    assert "NER (ValueError: the default model 'x' is not usable (not built): build it with `onnxpipe build`)" in last


def test_missing_offline_tasks_name_the_command_that_gets_them():
    command = demo._command_for("question-answering")
    assert "onnxpipe import" in command and "HF_HUB_OFFLINE=0" in command
    assert demo._command_for("no-such-task") is None


@pytest.mark.parametrize("title, needs, section", demo.SECTIONS, ids=[t for t, _, _ in demo.SECTIONS])
def test_every_section_names_the_defaults_it_needs(title, needs, section):
    from onnxpipe.task_table import normalize_task

    assert needs and all(normalize_task(t) == t for t in needs)
