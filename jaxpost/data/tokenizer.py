"""Tokenizers: the built-in byte-level one (demos and tests need no files) and `load_tokenizer`,
which also opens Hugging Face tokenizer directories and SentencePiece models
(`jaxpost.data.hf_tokenizer`).

Every tokenizer gives what `jaxpost.data.records` needs:

  * `vocab_size`, `eos_id`, `pad_id`, `bos_id` (None when there is none);
  * `prefix_ids`: what goes before a plain text (its BOS, if the tokenizer uses one);
  * `encode(text)` / `decode(ids)`, without special tokens;
  * `chat(messages, first)` -> `(ids, mask, prompt_len)`: a conversation in the tokenizer's chat
    format, `mask` marking the assistant messages from index `first` on, and `ids[:prompt_len]`
    the tokens of `messages[:first]` plus the generation prompt;
  * `apply_chat_template(messages, add_generation_prompt=...)` -> ids, for sampling.

The byte tokenizer:

Ids 0-7 are special tokens; byte `b` is id `b + 8`. A conversation renders as

    <bos> (<|role|> content <|end|>)* <eos>

and `add_generation_prompt` appends `<|assistant|>` instead of `<eos>`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from jaxpost.data import hf_tokenizer
from jaxpost.data.messages import message_role, message_text

PAD, BOS, EOS, SYSTEM, USER, ASSISTANT, END = range(7)
_BYTE_OFFSET = 8
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
_SPECIAL_NAMES = {
    PAD: "<pad>",
    BOS: "<bos>",
    EOS: "<eos>",
    SYSTEM: "<|system|>",
    USER: "<|user|>",
    ASSISTANT: "<|assistant|>",
    END: "<|end|>",
}


class ByteTokenizer:
    """UTF-8 bytes as tokens; vocabulary of 264 ids."""

    vocab_size = 256 + _BYTE_OFFSET
    pad_id, bos_id, eos_id, end_of_turn_id = PAD, BOS, EOS, END

    prefix_ids = (BOS,)

    def encode(self, text: str) -> list[int]:
        raw = np.frombuffer(text.encode("utf-8"), np.uint8)
        return (raw.astype(np.int32) + _BYTE_OFFSET).tolist()

    def chat(
        self, messages: Sequence[tuple[str, str]], first: int = 0
    ) -> tuple[list[int], list[int], int]:
        ids, mask, prompt_len = [BOS], [0], 1
        for i, message in enumerate(messages):
            role = message_role(message)
            target = int(role == "assistant" and i >= first)
            body = self.encode(message_text(message)) + [END]
            ids += [self.role_id(role)] + body
            mask += [0] + [target] * len(body)
            if i < first:
                prompt_len = len(ids)
        ids.append(EOS)
        mask.append(mask[-1])
        return ids, mask, prompt_len

    def apply_chat_template(
        self, messages: Sequence, *, add_generation_prompt: bool = False
    ) -> list[int]:
        ids = [BOS]
        for m in messages:
            ids += [self.role_id(message_role(m))] + self.encode(message_text(m)) + [END]
        return ids + ([ASSISTANT] if add_generation_prompt else [EOS])

    def is_special(self, i: int) -> bool:
        return int(i) < _BYTE_OFFSET

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        out, pending = [], bytearray()
        for i in ids:
            i = int(i)
            if i >= _BYTE_OFFSET:
                pending.append(i - _BYTE_OFFSET)
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if not skip_special:
                out.append(_SPECIAL_NAMES.get(i, f"<{i}>"))
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def role_id(self, role: str) -> int:
        if role not in ROLES:
            raise KeyError(role)
        return ROLES[role]


def load_tokenizer(spec: str):
    """`"byte"` -> ByteTokenizer; a Hugging Face tokenizer directory (or its tokenizer.json) ->
    HFTokenizer; a SentencePiece `.model` (or a directory with only tokenizer.model) ->
    SentencePieceTokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "tokenizer.json")):
            return hf_tokenizer.HFTokenizer(path)
        if os.path.exists(os.path.join(path, "tokenizer.model")):
            return hf_tokenizer.SentencePieceTokenizer(path)
        raise FileNotFoundError(
            f"config.data.tokenizer={spec!r}: the directory has neither tokenizer.json "
            "(Hugging Face) nor tokenizer.model (SentencePiece)"
        )
    if os.path.isfile(path):
        if path.endswith(".json"):
            return hf_tokenizer.HFTokenizer(path)
        if path.endswith(".model"):
            return hf_tokenizer.SentencePieceTokenizer(path)
        raise ValueError(
            f"config.data.tokenizer={spec!r}: expected a tokenizer.json, a SentencePiece .model "
            "or a directory holding one"
        )
    raise FileNotFoundError(
        f"config.data.tokenizer={spec!r}: no such file or directory (use 'byte' for the "
        "built-in tokenizer, or a Hugging Face tokenizer directory)"
    )
