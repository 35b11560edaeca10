"""`text-generation`: transformers' TextGenerationPipeline over a decoder-only export with a KV cache.

    gen = pipeline("text-generation", model="exports/smollm2")
    gen("The capital of France is", max_new_tokens=20, do_sample=False)
    # [{'generated_text': 'The capital of France is Paris...'}]
    gen([{"role": "user", "content": "What is 2+2?"}], max_new_tokens=20)
    # [{'generated_text': [{'role': 'user', ...}, {'role': 'assistant', 'content': '...'}]}]
    for piece in gen.stream("Once upon a time", max_new_tokens=50): print(piece, end="")
    gen.generate(input_ids, attention_mask, max_new_tokens=20)   # np.ndarray, as model.generate

Defaults as transformers: the pipeline's own (max_new_tokens=256, do_sample=True, temperature=0.7)
yield to whatever the model's generation config sets to a non-default value.
"""
from __future__ import annotations

import enum
import threading
from dataclasses import replace

import numpy as np

from ..chat_template import check_messages, render_chat_template
from ..generation import Generator, TextIteratorStreamer, TextStreamer
from ..generation.streamer import StreamCancelled
from ..base import check_bool
from ._generating import GeneratingPipeline


class ReturnType(enum.Enum):
    TENSORS = 0
    NEW_TEXT = 1
    FULL_TEXT = 2


class Chat:
    """One conversation, so that a list of messages is not mistaken for a batch of prompts."""

    def __init__(self, messages):
        self.messages = check_messages(messages)


class TextGenerationPipeline(GeneratingPipeline):
    task = "text-generation"
    model_tasks = ("text-generation",)
    streams = True
    input_description = "a prompt string, a chat (a list of {'role', 'content'} objects), or a list of those"
    default_generation = {"max_new_tokens": 256, "do_sample": True, "temperature": 0.7}

    def __init__(self, model, **kwargs):
        self.generator, self.generation_config = Generator.for_pipeline(model, self.default_generation)
        super().__init__(model, **kwargs)

    # --- public entry points ------------------------------------------------------------------------------------

    def run(self, text_inputs, options, *, batch_size=None, streamer=None):
        """Continue a prompt (str), several prompts (list of str), a chat (list of message dicts) or several chats.
        streamer: as the streamer option, for options checked without one."""
        if streamer is not None:
            options = replace(options, forward={**options.forward, "streamer": _as_streamer(streamer, self.tokenizer)})
        pre, fwd, post = options.preprocess, options.forward, options.postprocess
        if isinstance(text_inputs, (list, tuple)):
            if not text_inputs:
                raise ValueError("text_inputs is an empty list: pass a prompt, a list of prompts or a chat")
            if isinstance(text_inputs[0], dict):
                return self.run_single(Chat(text_inputs), pre, fwd, post)
            if isinstance(text_inputs[0], (list, tuple)):
                return self.run_items([Chat(chat) for chat in text_inputs], options, batch_size)
            return self.run_items([_check_prompt(x, f"text_inputs[{i}]") for i, x in enumerate(text_inputs)],
                                  options, batch_size)
        return self.run_single(_check_prompt(text_inputs, "text_inputs"), pre, fwd, post)

    def generate(self, input_ids, attention_mask=None, **kwargs) -> np.ndarray:
        """`model.generate(input_ids, attention_mask=..., **kwargs)`: prompt + new ids, model defaults only."""
        return self.generator.generate(input_ids, attention_mask, **kwargs)

    def stream(self, text_inputs, **kwargs):
        """Yield the new text in pieces as it is generated (one prompt or one chat, one sequence)."""
        if isinstance(text_inputs, (list, tuple)) and text_inputs and not isinstance(text_inputs[0], dict):
            raise TypeError("stream() takes one prompt or one chat, not a batch")
        kwargs.pop("streamer", None)
        streamer = TextIteratorStreamer(self.tokenizer, skip_special_tokens=kwargs.get("skip_special_tokens", True))

        def work():
            try:
                self(text_inputs, streamer=streamer, **kwargs)
            except StreamCancelled:
                pass
            except BaseException as e:  # surfaced in the consumer's thread
                streamer.put_error(e)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            streamer.cancel()  # a consumer that stops early also stops the generation
            thread.join()

    # --- the request contract -----------------------------------------------------------------------------------

    @property
    def chats(self) -> bool:
        return bool(self.manifest.get("chat_template"))

    @property
    def continuous_batching(self) -> bool:
        return self.device == "cpu"  # the engine moves cache rows as numpy arrays

    def is_one_input(self, value: list) -> bool:
        return bool(value) and isinstance(value[0], dict)  # a list of messages is one chat, not a batch

    def accepts_item(self, item) -> bool:
        return isinstance(item, str) or (isinstance(item, list) and bool(item) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in item))

    def reserved_positions(self, options) -> int:
        new_tokens = options.given.get("max_new_tokens")
        return new_tokens if isinstance(new_tokens, int) and not isinstance(new_tokens, bool) else 0

    def _too_long(self, where, n, reserved, limit):
        extra = f" plus max_new_tokens={reserved}" if reserved else ""
        return (f"{where} is {n} tokens long{extra}; this model takes at most {limit} positions (manifest max "
                "length): shorten the prompt or max_new_tokens")

    # --- the four steps -------------------------------------------------------------------------------------------

    def _sanitize_parameters(self, return_full_text=None, return_tensors=None, return_text=None, return_type=None,
                             clean_up_tokenization_spaces=None, prefix=None, handle_long_generation=None,
                             stop_sequence=None, truncation=None, max_length=None, continue_final_message=None,
                             skip_special_tokens=None, add_special_tokens=None, seed=None, streamer=None,
                             **generate_kwargs):
        pre, fwd, post = {}, dict(generate_kwargs), {}
        for name, value in (("return_full_text", return_full_text), ("return_tensors", return_tensors),
                            ("return_text", return_text), ("clean_up_tokenization_spaces", clean_up_tokenization_spaces),
                            ("continue_final_message", continue_final_message),
                            ("skip_special_tokens", skip_special_tokens), ("add_special_tokens", add_special_tokens)):
            if value is not None:
                check_bool(value, name)
        if add_special_tokens is not None:
            pre["add_special_tokens"] = add_special_tokens
        if truncation is not None:
            pre["truncation"] = truncation
        if max_length is not None:
            pre["max_length"] = max_length
            fwd["max_length"] = max_length
        if prefix is not None:
            if not isinstance(prefix, str):
                raise TypeError(f"prefix must be a string, got {type(prefix).__name__}")
            pre["prefix"] = prefix
        if handle_long_generation is not None:
            if handle_long_generation != "hole":
                raise ValueError(f"handle_long_generation={handle_long_generation!r} is not valid: use None or 'hole'")
            pre["handle_long_generation"] = handle_long_generation
        if continue_final_message is not None:
            pre["continue_final_message"] = continue_final_message
            post["continue_final_message"] = continue_final_message
        if stop_sequence is not None:
            fwd["eos_token_id"] = self.tokenizer.encode_batch([stop_sequence], add_special_tokens=False)[0].ids
        if seed is not None:
            fwd["seed"] = seed
        if streamer is not None:
            fwd["streamer"] = _as_streamer(streamer, self.tokenizer)
        if fwd.get("max_new_tokens") is not None:
            pre["max_new_tokens"] = fwd["max_new_tokens"]  # for handle_long_generation='hole'
        if return_full_text is not None and return_type is None:
            if return_text is not None:
                raise ValueError("return_text is mutually exclusive with return_full_text")
            if return_tensors is not None:
                raise ValueError("return_full_text is mutually exclusive with return_tensors")
            return_type = ReturnType.FULL_TEXT if return_full_text else ReturnType.NEW_TEXT
        if return_tensors is not None and return_type is None:
            if return_text is not None:
                raise ValueError("return_text is mutually exclusive with return_tensors")
            return_type = ReturnType.TENSORS
        if return_type is not None:
            post["return_type"] = return_type
        if clean_up_tokenization_spaces is not None:
            post["clean_up_tokenization_spaces"] = clean_up_tokenization_spaces
        if skip_special_tokens is not None:
            post["skip_special_tokens"] = skip_special_tokens
        return pre, fwd, post

    def preprocess(self, prompt_text, prefix="", handle_long_generation=None, add_special_tokens=None, truncation=None,
                   max_length=None, continue_final_message=None, max_new_tokens=None):
        if isinstance(prompt_text, Chat):
            if continue_final_message is None:
                continue_final_message = prompt_text.messages[-1]["role"] == "assistant"
            text = render_chat_template(self.manifest.get("chat_template"), prompt_text.messages,
                                        add_generation_prompt=not continue_final_message,
                                        continue_final_message=continue_final_message,
                                        special_tokens=self.manifest["tokenizer"].get("special_tokens"))
            add_special_tokens = False  # apply_chat_template tokenizes the rendered text without special tokens
        else:
            text = prefix + prompt_text
        if max_length is not None and truncation is None:
            truncation = True  # transformers' tokenizer truncates whenever max_length is given
        enc = self.tokenizer.encode_batch([text], add_special_tokens=True if add_special_tokens is None else add_special_tokens,
                                          truncation=truncation or False, max_length=max_length)[0]
        input_ids = np.array([enc.ids], dtype=np.int64)
        attention_mask = np.array([enc.attention_mask], dtype=np.int64)
        if handle_long_generation == "hole":
            input_ids, attention_mask = self._hole(input_ids, attention_mask, max_new_tokens, max_length)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_text": prompt_text}

    def _forward(self, model_inputs, plan, seed=None, streamer=None):
        input_ids, attention_mask = model_inputs["input_ids"], model_inputs["attention_mask"]
        if input_ids.shape[1] == 0:  # an empty prompt starts from BOS, as transformers does
            input_ids = attention_mask = None
        sequences = self.generator.generate(input_ids, attention_mask, plan=plan, seed=seed, streamer=streamer)
        return {"generated_sequence": sequences, "input_ids": input_ids, "prompt_text": model_inputs["prompt_text"]}

    def postprocess(self, model_outputs, return_type=ReturnType.FULL_TEXT, clean_up_tokenization_spaces=True,
                    continue_final_message=None, skip_special_tokens=None):
        input_ids = model_outputs["input_ids"]
        prompt_text = model_outputs["prompt_text"]
        skip = True if skip_special_tokens is None else skip_special_tokens
        records = []
        for sequence in model_outputs["generated_sequence"].tolist():
            if return_type == ReturnType.TENSORS:
                records.append({"generated_token_ids": sequence})
                continue
            text = self.tokenizer.decode(sequence, skip_special_tokens=skip,
                                         clean_up_tokenization_spaces=clean_up_tokenization_spaces)
            prompt_length = 0 if input_ids is None else len(self.tokenizer.decode(
                input_ids[0], skip_special_tokens=skip, clean_up_tokenization_spaces=clean_up_tokenization_spaces))
            all_text = text[prompt_length:]
            if return_type == ReturnType.FULL_TEXT:
                if isinstance(prompt_text, str):
                    all_text = prompt_text + all_text
                else:
                    all_text = _chat_output(prompt_text, all_text, continue_final_message)
            records.append({"generated_text": all_text})
        return records

    def _row(self, outputs, batch, chunk, i):
        """Row i of a batched generation: its sequences (num_return_sequences each), its padded prompt."""
        n = outputs["generated_sequence"].shape[0] // len(chunk)
        return {"generated_sequence": outputs["generated_sequence"][i * n:(i + 1) * n],
                "input_ids": batch["input_ids"][i:i + 1], "prompt_text": chunk[i]["prompt_text"]}

    def _hole(self, input_ids, attention_mask, max_new_tokens, max_length):
        """handle_long_generation='hole': drop the prompt's left part so the new tokens fit the window."""
        cur_len = input_ids.shape[-1]
        if max_new_tokens is not None:
            new_tokens = max_new_tokens
        else:
            new_tokens = (max_length or self.generation_config.max_length) - cur_len
            if new_tokens < 0:
                raise ValueError("handle_long_generation='hole' cannot infer how many new tokens are expected")
        limit = self.tokenizer.model_max_length or self.manifest.get("max_positions")
        if limit and cur_len + new_tokens > limit:
            keep = limit - new_tokens
            if keep <= 0:
                raise ValueError(f"handle_long_generation='hole': {new_tokens} new tokens exceed the model's "
                                 f"{limit} positions")
            return input_ids[:, -keep:], attention_mask[:, -keep:]
        return input_ids, attention_mask


def _chat_output(chat: Chat, new_text: str, continue_final_message):
    if continue_final_message is None:
        continue_final_message = chat.messages[-1]["role"] == "assistant"
    if continue_final_message:
        last = chat.messages[-1]
        return list(chat.messages)[:-1] + [{"role": last["role"], "content": last["content"] + new_text}]
    return list(chat.messages) + [{"role": "assistant", "content": new_text}]


def _check_prompt(prompt, name):
    if not isinstance(prompt, str):
        raise TypeError(f"{name} must be a string, a list of strings or a chat (list of role/content dicts), "
                        f"got {type(prompt).__name__}")
    return prompt


def _as_streamer(streamer, tokenizer):
    """A streamer object (put/end) as it is; a callable gets each text piece."""
    if hasattr(streamer, "put"):
        return streamer
    if not callable(streamer):
        raise TypeError("streamer must be a callable taking each text piece, or an object with put()/end()")
    return TextStreamer(tokenizer, callback=streamer)
