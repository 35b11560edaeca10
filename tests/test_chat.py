"""Chat templates render as transformers' apply_chat_template renders them, and chat input through the
text-generation pipeline returns transformers' chat format."""
from __future__ import annotations

import functools
import warnings

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")

import onnxpipe  # noqa: E402
from onnxpipe.chat_template import render_chat_template  # noqa: E402

CHATS = {
    "user-only": [{"role": "user", "content": "What is 2+2?"}],
    "with-system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "multi-turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Tell me a joke about \"quotes\" & <tags> — ünïcode"}],
    "assistant-prefill": [{"role": "user", "content": "Count to 3"}, {"role": "assistant", "content": "1, 2,"}],
}
TEMPLATES = {
    "tiny-llama-chatml": None,  # the checkpoint's own template
    "tojson-and-loop-controls": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
        "{{ m | tojson }}\n{% endfor %}{% if add_generation_prompt %}{{ bos_token }}assistant:{% endif %}"),
    "tojson-options": "{{ messages | tojson(indent=2, sort_keys=True) }}{{ eos_token }}",
    "generation-block": ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
                         "{% endgeneration %}{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"),
}


@functools.lru_cache(maxsize=None)
def _tokenizer():
    from conftest import tiny_checkpoint

    return transformers.AutoTokenizer.from_pretrained(tiny_checkpoint("llama", "text-generation"))


@functools.lru_cache(maxsize=None)
def _pipes():
    from conftest import tiny_checkpoint, tiny_export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = transformers.pipeline("text-generation", model=str(tiny_checkpoint("llama", "text-generation")))
    return ref, onnxpipe.pipeline("text-generation", model=tiny_export("llama", "text-generation"))


def _special_tokens():
    return _pipes()[1].manifest["tokenizer"]["special_tokens"]


@pytest.mark.parametrize("mode", ["generation-prompt", "no-generation-prompt", "continue-final-message"])
@pytest.mark.parametrize("chat", list(CHATS))
@pytest.mark.parametrize("template", list(TEMPLATES))
def test_render_equals_apply_chat_template(template, chat, mode):
    tok = _tokenizer()
    source = TEMPLATES[template] or tok.chat_template
    kwargs = dict(add_generation_prompt=mode == "generation-prompt", continue_final_message=mode == "continue-final-message")
    try:
        ref = tok.apply_chat_template(CHATS[chat], chat_template=source, tokenize=False, **kwargs)
    except ValueError as e:  # e.g. a template that drops the final message cannot be continued
        with pytest.raises(ValueError):
            render_chat_template(source, CHATS[chat], special_tokens=_special_tokens(), **kwargs)
        assert "final message" in str(e)
        return
    assert render_chat_template(source, CHATS[chat], special_tokens=_special_tokens(), **kwargs) == ref


def test_raise_exception_in_template_is_a_template_error():
    import jinja2

    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok"
    with pytest.raises(jinja2.exceptions.TemplateError, match="first message must be from the user"):
        render_chat_template(template, CHATS["with-system"])
    assert render_chat_template(template, CHATS["user-only"]) == "ok"


def test_bad_chats_raise_clear_errors():
    with pytest.raises(ValueError, match="no chat template"):
        render_chat_template(None, CHATS["user-only"])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        render_chat_template("x", [{"role": "user"}])
    with pytest.raises(TypeError, match="non-empty list"):
        render_chat_template("x", [])
    with pytest.raises(ValueError, match="not compatible"):
        render_chat_template("x", CHATS["user-only"], add_generation_prompt=True, continue_final_message=True)


@pytest.mark.parametrize("options", [dict(max_new_tokens=8), dict(max_new_tokens=6, num_beams=2, num_return_sequences=2),
                                     dict(max_new_tokens=6, return_full_text=False),
                                     dict(max_new_tokens=6, continue_final_message=False)],
                         ids=["greedy", "beams-return2", "new-text-only", "no-continue"])
@pytest.mark.parametrize("chat", list(CHATS))
def test_chat_pipeline_matches_transformers(chat, options):
    ref, ours = _pipes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(CHATS[chat], do_sample=False, **options)
    assert ours(CHATS[chat], do_sample=False, **options) == expected


def test_several_chats_return_one_result_list_each():
    ref, ours = _pipes()
    chats = [CHATS["user-only"], CHATS["multi-turn"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(chats, do_sample=False, max_new_tokens=5)
    assert ours(chats, do_sample=False, max_new_tokens=5) == expected


def test_chat_on_a_model_without_template_is_a_clear_error():
    from conftest import tiny_export

    gpt2 = onnxpipe.pipeline("text-generation", model=tiny_export("gpt2", "text-generation"))
    with pytest.raises(ValueError, match="no chat template"):
        gpt2(CHATS["user-only"], max_new_tokens=3)
