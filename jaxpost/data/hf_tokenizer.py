"""Tokenizers from files: a Hugging Face tokenizer directory (`tokenizer.json` through the
`tokenizers` library) or a SentencePiece `.model` file, with the directory's special tokens,
BOS rule and Jinja chat template (`tokenizer_config.json`, `special_tokens_map.json`,
`chat_template.jinja`).

Both give the interface `jaxpost.data.records` uses (see `jaxpost.data.tokenizer`):
`encode`/`decode` without special tokens, `prefix_ids` (the BOS the tokenizer puts before a text,
if any), `eos_id`, and `chat(messages, first)` -> token ids, assistant-target mask and prompt
length. Chat rendering never adds special tokens beyond what the template writes, so a template
that writes `{{ bos_token }}` gets exactly one BOS.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from jaxpost.data import chat_template as chat_lib
from jaxpost.data.messages import message_role

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return value.get("content")
    return str(value)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def read_tokenizer_config(directory: str) -> dict:
    """tokenizer_config.json merged with special_tokens_map.json and chat_template.jinja."""
    config: dict = {}
    path = os.path.join(directory, "tokenizer_config.json")
    if os.path.exists(path):
        config = _read_json(path)
    path = os.path.join(directory, "special_tokens_map.json")
    if os.path.exists(path):
        for key, value in _read_json(path).items():
            config.setdefault(key, value)
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            config["chat_template"] = f.read()
    template = config.get("chat_template")
    if isinstance(
        template, list
    ):  # [{"name": "default", "template": ...}, {"name": "tool_use"...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        config["chat_template"] = named.get("default")
    return config


class _FileTokenizer:
    """What the Hugging Face and SentencePiece tokenizers share: special tokens and chat."""

    def _setup(self, config: Mapping, where: str) -> None:
        self.where = where
        self.special_tokens = {}
        for key in _SPECIAL_KEYS:
            text = _token_text(config.get(key))
            if text is not None:
                self.special_tokens[key] = text
        ids = {key: self.token_to_id(text) for key, text in self.special_tokens.items()}
        for key, text in self.special_tokens.items():
            if ids[key] is None:
                raise ValueError(f"{where}: {key} {text!r} is not in the vocabulary")
        self.bos_id = ids.get("bos_token")
        self.eos_id = ids.get("eos_token")
        if self.eos_id is None:
            raise ValueError(
                f"{where}: the tokenizer has no eos_token (set it in tokenizer_config.json); "
                "jaxpost ends every completion with it"
            )
        self.pad_id = ids.get("pad_token", self.eos_id)
        template = config.get("chat_template")
        self.chat_template = (
            chat_lib.ChatTemplate(template, self.special_tokens) if template else None
        )
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            self.prefix_ids = self._default_prefix()
        else:
            self.prefix_ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        self.mask_method = "auto"
        self.template_kwargs: dict = {}  # extra variables for the template (e.g. date_string)

    # --- interface used by jaxpost.data.records ---------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.encode_offsets(text)[0]

    def chat(
        self, messages: Sequence[tuple[str, str]], first: int = 0
    ) -> tuple[list[int], list[int], int]:
        """`(ids, mask, prompt_len)` of a conversation rendered by the chat template.

        `mask` marks the tokens of assistant messages with index >= `first`. With `first > 0`,
        `ids[:prompt_len]` are the tokens of `messages[:first]` plus the generation prompt.
        Raises `chat_template.TemplateError`.
        """
        if self.chat_template is None:
            raise chat_lib.TemplateError(
                f"the tokenizer at {self.where} has no chat template (tokenizer_config.json "
                "'chat_template' or chat_template.jinja), so conversations cannot be rendered"
            )
        text, spans = self.chat_template.assistant_spans(
            messages, first=first, method=self.mask_method, extra=self.template_kwargs
        )
        ids, offsets = self.encode_offsets(text)
        if first <= 0:
            return ids, chat_lib.char_mask(offsets, spans), 0
        generation_prompt = first < len(messages) and message_role(messages[first]) == "assistant"
        prompt = self.chat_template.render(
            messages[:first], add_generation_prompt=generation_prompt, extra=self.template_kwargs
        )
        if not text.startswith(prompt):
            raise chat_lib.TemplateError(
                "chat template renders the prompt differently when a completion follows, so the "
                "prompt tokens cannot be shared by completions"
            )
        cut = len(prompt)
        if any(start < cut < end for start, end in offsets):
            # A token crosses from the prompt into the completion (e.g. "\n\n" + a reply that
            # starts with a newline): tokenise the two parts apart, as TRL does, so that every
            # completion of this prompt shares the prompt's tokens.
            p_ids, p_off = self.encode_offsets(prompt)
            c_ids, c_off = self.encode_offsets(text[cut:])
            ids = p_ids + c_ids
            offsets = list(p_off) + [(s + cut, e + cut) for s, e in c_off]
            return ids, chat_lib.char_mask(offsets, spans), len(p_ids)
        # Whole-text tokenisation, as transformers does; the prompt is the tokens ending in it.
        prompt_len = sum(1 for _, end in offsets if end <= cut)
        return ids, chat_lib.char_mask(offsets, spans), prompt_len

    def apply_chat_template(
        self, messages: Sequence, *, add_generation_prompt: bool = False
    ) -> list[int]:
        """Token ids of the rendered conversation (for sampling prompts)."""
        if self.chat_template is None:
            raise chat_lib.TemplateError(f"the tokenizer at {self.where} has no chat template")
        text = self.chat_template.render(
            messages, add_generation_prompt=add_generation_prompt, extra=self.template_kwargs
        )
        return self.encode(text)


class HFTokenizer(_FileTokenizer):
    """A `tokenizer.json` (Hugging Face `tokenizers`) with the directory's configuration."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        directory = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        try:
            self._tok = Tokenizer.from_file(file)
        except Exception as e:  # tokenizers raises a bare Exception for a bad file
            raise ValueError(f"{file}: cannot load as a Hugging Face tokenizer ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._special_ids = {
            i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        }
        self._setup(read_tokenizer_config(directory), directory)

    def token_to_id(self, text: str) -> int | None:
        return self._tok.token_to_id(text)

    def _default_prefix(self) -> list[int]:
        # What the tokenizer's post-processor puts before a text, e.g. Llama's <s>.
        bare = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        for k in range(len(full) - len(bare) + 1):
            if full[k : k + len(bare)] == bare:
                return full[:k]
        return []

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def encode_with_special(self, text: str) -> list[int]:
        """As `transformers`' `tokenizer(text)`: with the post-processor's special tokens."""
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def is_special(self, i: int) -> bool:
        return int(i) in self._special_ids


class SentencePieceTokenizer(_FileTokenizer):
    """A SentencePiece `.model`; special-token strings in text (e.g. from a chat template) are
    split out and mapped to their ids, as `transformers` does."""

    def __init__(self, path: str):
        import sentencepiece as spm

        directory = path if os.path.isdir(path) else os.path.dirname(path)
        file = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(file)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{file}: cannot load as a SentencePiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        # Text after a special token gets no dummy-prefix space ("▁"), as in transformers'
        # (non-legacy) handling; only the start of a text does, if the model adds one.
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self._sp.serialized_model_proto())
        self._sp_inner = self._sp
        if proto.normalizer_spec.add_dummy_prefix:
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp_inner = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        config = read_tokenizer_config(directory)
        # transformers' `legacy` Llama/Mistral tokenizers put the dummy-prefix space after
        # special tokens too.
        self._legacy = bool(config.get("legacy", False))
        for key, sp_id in (
            ("bos_token", self._sp.bos_id()),
            ("eos_token", self._sp.eos_id()),
            ("unk_token", self._sp.unk_id()),
            ("pad_token", self._sp.pad_id()),
        ):
            if key not in config and sp_id >= 0:
                config[key] = self._sp.id_to_piece(sp_id)
        self._setup(config, directory)
        specials = {
            self._sp.id_to_piece(i): i for i in range(self.vocab_size) if self._sp.is_control(i)
        }
        for text in self.special_tokens.values():
            specials[text] = self._sp.piece_to_id(text)
        self._special_ids = dict(specials)
        # Longest first, so that a special token containing another is matched whole.
        alternatives = sorted((t for t in specials if t), key=len, reverse=True)
        self._special_re = (
            re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        )

    def token_to_id(self, text: str) -> int | None:
        i = self._sp.piece_to_id(text)
        return None if i == self._sp.unk_id() and text != self._sp.id_to_piece(i) else i

    def _default_prefix(self) -> list[int]:
        return [self.bos_id] if self.bos_id is not None else []

    def _split(self, text: str) -> list[tuple[int, str, int | None]]:
        """`(char start, piece, special id or None)`: the text cut at special-token strings."""
        out, start = [], 0
        for m in self._special_re.finditer(text) if self._special_re else ():
            if start < m.start():
                out.append((start, text[start : m.start()], None))
            out.append((m.start(), m.group(), self._special_ids[m.group()]))
            start = m.end()
        if start < len(text):
            out.append((start, text[start:], None))
        return out

    def encode_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids, offsets = [], []
        for start, piece, sid in self._split(text):
            if sid is not None:
                ids.append(sid)
                offsets.append((start, start + len(piece)))
                continue
            # SentencePiece reports byte offsets; map them back to characters.
            char_at = []
            for k, ch in enumerate(piece):
                char_at += [k] * len(ch.encode("utf-8"))
            char_at.append(len(piece))
            sp = self._sp if start == 0 or self._legacy else self._sp_inner
            for p in sp.encode(piece, out_type="proto").pieces:
                ids.append(p.id)
                begin, end = char_at[p.begin], char_at[p.end]
                if end <= begin:  # a byte-fallback piece inside a character: that character
                    begin = min(char_at[p.begin], len(piece) - 1)
                    end = begin + 1
                offsets.append((start + begin, start + end))
        return ids, offsets

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if not self.is_special(i)]
        return self._sp.decode(ids)

    def is_special(self, i: int) -> bool:
        return self._sp.is_control(int(i))
