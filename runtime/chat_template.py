"""Chat templates rendered as transformers' `apply_chat_template` renders them (jinja2, imported lazily).

    text = render_chat_template(manifest["chat_template"], messages, add_generation_prompt=True,
                                special_tokens={"bos_token": "<s>", ...})

Same sandboxed environment (trim_blocks, lstrip_blocks, loopcontrols), the same `raise_exception`,
`strftime_now` globals and the same `tojson` filter (no HTML escaping, ensure_ascii=False), and the
same `continue_final_message` handling. The rendered text is then tokenized without special tokens.
"""
from __future__ import annotations

import functools
import json

CONTINUE_FINAL_MESSAGE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def check_messages(messages) -> list[dict]:
    """A chat is a non-empty list of {"role": str, "content": ...} dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TypeError("a chat must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"chat message {i} must be a dict with 'role' and 'content' keys, got {message!r}")
    return list(messages)


def render_chat_template(template: str | None, messages, *, add_generation_prompt: bool = False,
                         continue_final_message: bool = False, special_tokens: dict | None = None, **kwargs) -> str:
    if not template:
        raise ValueError("this model has no chat template (the manifest's chat_template is empty): pass plain text "
                         "prompts instead of messages")
    messages = check_messages(messages)
    if add_generation_prompt and continue_final_message:
        raise ValueError("continue_final_message and add_generation_prompt are not compatible: use "
                         "continue_final_message to continue the last message, add_generation_prompt to start a new one")
    compiled = _compile_checked(template)
    final_message = None
    if continue_final_message:
        messages = [dict(m) for m in messages]
        final_message = messages[-1]["content"]
        if not isinstance(final_message, str):
            raise ValueError("continue_final_message needs the final message's content to be a string")
        messages[-1]["content"] = final_message + CONTINUE_FINAL_MESSAGE_TAG
    variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    variables.update(kwargs)
    import jinja2

    try:
        rendered = compiled.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:  # raise_exception (e.g. roles out of order), the sandbox, an undefined name
        raise _template_error_class()(f"the model's chat template refused these messages: {e}") from None
    except (TypeError, ValueError, ArithmeticError, LookupError, RecursionError) as e:  # the template's own code
        raise ValueError(f"the model's chat template failed on these messages: {type(e).__name__}: {e}") from None
    if continue_final_message:
        tag = CONTINUE_FINAL_MESSAGE_TAG.strip()
        if final_message.strip() not in rendered or tag not in rendered:
            raise ValueError("continue_final_message is set but the final message does not appear in the rendered "
                             "chat: the chat template drops part of it")
        loc = rendered.rindex(tag)
        if rendered[loc:loc + len(CONTINUE_FINAL_MESSAGE_TAG)] == CONTINUE_FINAL_MESSAGE_TAG:
            rendered = rendered[:loc]
        else:  # the template trimmed the message's trailing space
            rendered = rendered[:loc].rstrip()
    return rendered


@functools.lru_cache(maxsize=1)
def _template_error_class():
    """A jinja2 TemplateError, as transformers raises it, that is also a ValueError: a front end answers it as a
    fault of the messages (422), not of the server. Made on first use: jinja2 is imported lazily."""
    import jinja2

    class ChatTemplateError(jinja2.exceptions.TemplateError, ValueError):
        pass

    return ChatTemplateError


def _compile_checked(template: str):
    """The compiled template; a template that is not valid Jinja is a ValueError naming its error."""
    try:
        return _compile(template)
    except ImportError:
        raise
    except Exception as e:  # jinja2.TemplateSyntaxError, and what the parser raises on garbage
        raise ValueError(f"the model's chat template cannot be compiled: {type(e).__name__}: {e}") from None


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError("chat templates need jinja2: pip install 'onnxpipe[chat]'") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which transformers deliberately avoids
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    class GenerationBlock(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering keeps the body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)
