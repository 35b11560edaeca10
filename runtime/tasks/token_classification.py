"""token-classification (alias ner): transformers' TokenClassificationPipeline (fast-tokenizer path) on ONNX Runtime.

    ner("text")                                -> [{'entity', 'score', 'index', 'word', 'start', 'end'}, ...]
    ner("text", aggregation_strategy="simple") -> [{'entity_group', 'score', 'word', 'start', 'end'}, ...]
    ner(["a", "b"])                            -> [[...], [...]]
    ner(["Some", "words"], is_split_into_words=True) -> [[...]]   (transformers nests one word list too)

aggregation_strategy: 'none' (one dict per token, labels in ignore_labels dropped), 'simple'
(adjacent tokens with the same tag merged, B- starts a new group), 'first' / 'average' / 'max'
(a word's sub-tokens agree on one label first). `start`/`end` are character offsets into the
text. Texts longer than the model takes are cut, unless `stride` is given: then they are split
into windows overlapping by `stride` tokens and the entities of all windows are merged.
Scores are python floats (transformers returns numpy float32 of the same value).
"""
from __future__ import annotations

import warnings

import numpy as np

from ._common import ChunkPipeline, check_choice, softmax

AGGREGATION_STRATEGIES = ("none", "simple", "first", "average", "max")
_WORD_STRATEGIES = ("first", "average", "max")


class TokenClassificationPipeline(ChunkPipeline):
    """NER / token tagging with a token-classification export.

    aggregation_strategy ('none'), ignore_labels (['O']), stride (None: cut at the model's max
    length), is_split_into_words (False) with delimiter (' '), batch_size (1). The deprecated
    grouped_entities / ignore_subwords map to a strategy, as in transformers.
    """

    task = "token-classification"
    model_tasks = ("token-classification",)

    def __init__(self, model, **kwargs):
        super().__init__(model, **kwargs)
        self.id2label = {int(k): v for k, v in (self.manifest.get("id2label") or {}).items()}
        if not self.id2label:
            raise ValueError(f"model dir '{model.path}' has no id2label in its manifest: export it again")

    def run(self, inputs, options, *, batch_size=None):
        texts, single = _check_inputs(inputs, bool(options.preprocess.get("is_split_into_words", False)))
        results = self.run_examples(texts, options, batch_size)
        return results[0] if single else results

    def texts_to_measure(self, item, options):
        if options.preprocess.get("stride") is not None:  # long texts run as stride windows
            return None
        return super().texts_to_measure(item, options)

    def _sanitize_parameters(self, ignore_labels=None, grouped_entities=None, ignore_subwords=None,
                             aggregation_strategy=None, stride=None, is_split_into_words=None, delimiter=None):
        preprocess_params, postprocess_params = {}, {}
        if is_split_into_words is not None:
            if not isinstance(is_split_into_words, (bool, np.bool_)):
                raise TypeError(f"is_split_into_words must be True or False, got {type(is_split_into_words).__name__}")
            preprocess_params["is_split_into_words"] = bool(is_split_into_words)
        if delimiter is not None:
            if not isinstance(delimiter, str):
                raise TypeError(f"delimiter must be a string, got {type(delimiter).__name__}")
            preprocess_params["delimiter"] = delimiter
        if grouped_entities is not None or ignore_subwords is not None:
            if grouped_entities and ignore_subwords:
                aggregation_strategy = "first"
            elif grouped_entities and not ignore_subwords:
                aggregation_strategy = "simple"
            else:
                aggregation_strategy = "none"
            for name, value in (("grouped_entities", grouped_entities), ("ignore_subwords", ignore_subwords)):
                if value is not None:
                    warnings.warn(f"`{name}` is deprecated and will be removed in version v5.0.0, defaulted to "
                                  f'`aggregation_strategy="{aggregation_strategy}"` instead.', UserWarning,
                                  stacklevel=4)
        if aggregation_strategy is not None:
            postprocess_params["aggregation_strategy"] = check_choice(aggregation_strategy, AGGREGATION_STRATEGIES,
                                                                      "aggregation_strategy")
        if ignore_labels is not None:
            if isinstance(ignore_labels, str) or not all(isinstance(label, str) for label in ignore_labels):
                raise TypeError("ignore_labels must be a list of label strings, e.g. ['O']")
            postprocess_params["ignore_labels"] = list(ignore_labels)
        if stride is not None:
            preprocess_params["stride"] = self._check_stride(stride, postprocess_params.get("aggregation_strategy"))
        return preprocess_params, {}, postprocess_params

    def _check_stride(self, stride, aggregation_strategy) -> int:
        if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 0:
            raise ValueError(f"stride must be a non-negative integer, got {stride!r}")
        limit = self.tokenizer.model_max_length
        if limit is None:
            raise ValueError("stride needs a model max length and this tokenizer has none: export the model with one")
        if stride >= limit:
            raise ValueError(f"`stride` ({stride}) must be less than `tokenizer.model_max_length` ({limit}) "
                             "(or even lower if the tokenizer adds special tokens)")
        # transformers only refuses 'none' when it is passed in the same call as stride.
        if aggregation_strategy == "none":
            raise ValueError('`stride` was provided to process all the text but `aggregation_strategy="none"`, '
                             "please select another one instead.")
        room = limit - self.tokenizer.backend.num_special_tokens_to_add(False)
        if stride >= room:
            # The Rust tokenizer errors, or panics, on such a stride.
            raise ValueError(f"stride ({stride}) must be less than {room}: the model takes {limit} tokens, "
                             f"{limit - room} of them special tokens")
        return int(stride)

    def preprocess(self, sentence, stride=None, is_split_into_words=False, delimiter=" ") -> list[dict]:
        """One text (or word list) -> one item per window: feeds [1, seq], special_tokens_mask, offsets."""
        word_to_chars_map = None
        if is_split_into_words:
            if getattr(self.tokenizer.backend.pre_tokenizer, "add_prefix_space", None) is False:
                # Byte-level BPE marks a word start by the space before it; without one, a word
                # list tokenizes as one run of text. transformers refuses it as well.
                raise ValueError("is_split_into_words=True needs a tokenizer with add_prefix_space=True; this "
                                 "model's tokenizer was saved without it: pass the text as one string")
            words = sentence
            sentence = delimiter.join(words)
            # Offsets come back per word: this maps them onto the joined sentence.
            word_to_chars_map, at = [], 0
            for word in words:
                word_to_chars_map.append((at, at + len(word)))
                at += len(word) + len(delimiter)
        limit = self.tokenizer.model_max_length
        window_kwargs = dict(stride=stride, padding=True) if stride is not None else {}
        encoding = self.tokenizer.encode_batch([words if is_split_into_words else sentence],
                                               truncation=limit is not None and limit > 0, max_length=limit,
                                               is_pretokenized=is_split_into_words, **window_kwargs)[0]
        windows = [encoding] + (list(encoding.overflowing) if stride is not None else [])
        return [{
            "input_ids": np.array([window.ids], dtype=np.int64),
            "attention_mask": np.array([window.attention_mask], dtype=np.int64),
            "token_type_ids": np.array([window.type_ids], dtype=np.int64),
            "special_tokens_mask": np.array([window.special_tokens_mask], dtype=np.int64),
            "offsets": window.offsets,
            "word_ids": window.word_ids if word_to_chars_map is not None else None,
            "word_to_chars_map": word_to_chars_map,
            "sentence": sentence,
        } for window in windows]

    def _forward(self, model_inputs: dict) -> dict:
        return {"logits": self.model.session().run(model_inputs)["logits"]}

    def postprocess(self, chunks: list[dict], aggregation_strategy="none", ignore_labels=None) -> list[dict]:
        if ignore_labels is None:
            ignore_labels = ["O"]
        all_entities = []
        for chunk in chunks:
            scores = softmax(chunk["logits"][0])
            pre_entities = self.gather_pre_entities(
                chunk["sentence"], chunk["input_ids"][0], scores, chunk["offsets"], chunk["special_tokens_mask"][0],
                aggregation_strategy, chunk["word_ids"], chunk["word_to_chars_map"])
            entities = self.aggregate(pre_entities, aggregation_strategy)
            all_entities += [e for e in entities
                             if e.get("entity") not in ignore_labels and e.get("entity_group") not in ignore_labels]
        if len(chunks) > 1:
            all_entities = aggregate_overlapping_entities(all_entities)
        return [{**e, "score": float(e["score"])} for e in all_entities]

    def gather_pre_entities(self, sentence: str, input_ids: np.ndarray, scores: np.ndarray, offsets,
                            special_tokens_mask: np.ndarray, aggregation_strategy: str, word_ids=None,
                            word_to_chars_map=None) -> list[dict]:
        """One dict per real token: its text, label scores, character span and whether it continues a word."""
        # A tokenizer with a continuing-subword prefix (WordPiece's '##') marks word pieces itself;
        # others (byte-level BPE) fall back to "no space before it" in the text.
        word_aware = bool(getattr(self.tokenizer.backend.model, "continuing_subword_prefix", None))
        if not word_aware and aggregation_strategy in _WORD_STRATEGIES:
            warnings.warn("Tokenizer does not support real words, using fallback heuristic", UserWarning, stacklevel=4)
        pre_entities = []
        for idx, token_scores in enumerate(scores):
            if special_tokens_mask[idx]:
                continue
            token_id = int(input_ids[idx])
            word = self.tokenizer.convert_ids_to_tokens(token_id)
            start_ind, end_ind = offsets[idx]
            if word_ids is not None and word_to_chars_map is not None and word_ids[idx] is not None:
                start_char = word_to_chars_map[word_ids[idx]][0]
                start_ind += start_char
                end_ind += start_char
            word_ref = sentence[start_ind:end_ind]
            if word_aware:
                is_subword = len(word) != len(word_ref)
            else:
                is_subword = start_ind > 0 and " " not in sentence[start_ind - 1:start_ind + 1]
            if token_id == self.tokenizer.unk_token_id:
                word = word_ref
                is_subword = False
            pre_entities.append({"word": word, "scores": token_scores, "start": start_ind, "end": end_ind,
                                 "index": idx, "is_subword": is_subword})
        return pre_entities

    def aggregate(self, pre_entities: list[dict], aggregation_strategy: str) -> list[dict]:
        if aggregation_strategy in ("none", "simple"):
            entities = []
            for pre_entity in pre_entities:
                entity_idx = int(pre_entity["scores"].argmax())
                entities.append({
                    "entity": self.id2label[entity_idx],
                    "score": pre_entity["scores"][entity_idx],
                    "index": pre_entity["index"],
                    "word": pre_entity["word"],
                    "start": pre_entity["start"],
                    "end": pre_entity["end"],
                })
        else:
            entities = self.aggregate_words(pre_entities, aggregation_strategy)
        if aggregation_strategy == "none":
            return entities
        return self.group_entities(entities)

    def aggregate_words(self, entities: list[dict], aggregation_strategy: str) -> list[dict]:
        """Tokens of one word (a token and the sub-word tokens after it) -> one entity for the word."""
        word_entities, word_group = [], None
        for entity in entities:
            if word_group is None:
                word_group = [entity]
            elif entity["is_subword"]:
                word_group.append(entity)
            else:
                word_entities.append(self.aggregate_word(word_group, aggregation_strategy))
                word_group = [entity]
        if word_group is not None:
            word_entities.append(self.aggregate_word(word_group, aggregation_strategy))
        return word_entities

    def aggregate_word(self, entities: list[dict], aggregation_strategy: str) -> dict:
        word = self.tokenizer.convert_tokens_to_string([entity["word"] for entity in entities])
        if aggregation_strategy == "first":
            scores = entities[0]["scores"]
        elif aggregation_strategy == "max":
            scores = max(entities, key=lambda entity: entity["scores"].max())["scores"]
        else:  # average
            scores = np.nanmean(np.stack([entity["scores"] for entity in entities]), axis=0)
        idx = int(scores.argmax())
        return {"entity": self.id2label[idx], "score": scores[idx], "word": word,
                "start": entities[0]["start"], "end": entities[-1]["end"]}

    def group_entities(self, entities: list[dict]) -> list[dict]:
        """Adjacent entities with the same tag -> one group; a B- tag always opens a new group."""
        entity_groups, group = [], []
        for entity in entities:
            if not group:
                group.append(entity)
                continue
            bi, tag = get_tag(entity["entity"])
            _, last_tag = get_tag(group[-1]["entity"])
            if tag == last_tag and bi != "B":
                group.append(entity)
            else:
                entity_groups.append(self.group_sub_entities(group))
                group = [entity]
        if group:
            entity_groups.append(self.group_sub_entities(group))
        return entity_groups

    def group_sub_entities(self, entities: list[dict]) -> dict:
        return {
            "entity_group": entities[0]["entity"].split("-", 1)[-1],
            "score": np.mean(np.nanmean([entity["score"] for entity in entities])),
            "word": self.tokenizer.convert_tokens_to_string([entity["word"] for entity in entities]),
            "start": entities[0]["start"],
            "end": entities[-1]["end"],
        }


NerPipeline = TokenClassificationPipeline


def get_tag(entity_name: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); a label without a B-/I- prefix counts as a continuation ('I')."""
    if entity_name.startswith("B-"):
        return "B", entity_name[2:]
    if entity_name.startswith("I-"):
        return "I", entity_name[2:]
    return "I", entity_name


def aggregate_overlapping_entities(entities: list[dict]) -> list[dict]:
    """Entities of overlapping windows -> one per span: the longer one wins, then the higher score."""
    if not entities:
        return entities
    entities = sorted(entities, key=lambda x: x["start"])
    aggregated = []
    previous = entities[0]
    for entity in entities:
        if previous["start"] <= entity["start"] < previous["end"]:
            current_length = entity["end"] - entity["start"]
            previous_length = previous["end"] - previous["start"]
            if current_length > previous_length or (current_length == previous_length
                                                    and entity["score"] > previous["score"]):
                previous = entity
        else:
            aggregated.append(previous)
            previous = entity
    aggregated.append(previous)
    return aggregated


def _check_inputs(inputs, is_split_into_words: bool) -> tuple[list, bool]:
    """-> (texts or word lists, whether one input was given)."""
    if is_split_into_words:
        # transformers takes one word list as a batch of one, and returns it nested.
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(x, str) for x in inputs):
            return [list(inputs)], False
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(x, (list, tuple)) for x in inputs):
            for i, words in enumerate(inputs):
                if not words or not all(isinstance(w, str) for w in words):
                    raise TypeError(f"inputs[{i}] must be a non-empty list of word strings (is_split_into_words=True)")
            return [list(words) for words in inputs], False
        raise TypeError("with is_split_into_words=True, inputs must be a list of word strings or a list of such lists")
    if isinstance(inputs, str):
        return [inputs], True
    if isinstance(inputs, (list, tuple)):
        if not inputs:
            raise ValueError("token-classification got an empty list: at least one input is required")
        for i, text in enumerate(inputs):
            if not isinstance(text, str):
                raise TypeError(f"inputs[{i}] must be a string, got {type(text).__name__} "
                                "(pass is_split_into_words=True for lists of words)")
        return list(inputs), False
    raise TypeError(f"token-classification inputs must be a string or a list of strings, got {type(inputs).__name__}")
