"""The built-in byte-level tokenizer and its chat format, so demos and tests need no files.

Ids 0-7 are special tokens; byte `b` is id `b + 8`. A conversation renders as

    <bos> (<|role|> content <|end|>)* <eos>

and `add_generation_prompt` appends `<|assistant|>` instead of `<eos>`.
"""

from __future__ import annotations

from collections.abc import Sequence

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

    def encode(self, text: str) -> list[int]:
        return [b + _BYTE_OFFSET for b in text.encode("utf-8")]

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
