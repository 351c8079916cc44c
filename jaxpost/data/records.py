"""Turn records in Hugging Face TRL's dataset formats into token ids and loss masks.

SFT formats (TRL's names):
  * conversational: `{"messages": [{"role": "user" | "assistant" | "system", "content": str}]}`;
  * prompt-completion: `{"prompt": str, "completion": str}`, or both as message lists;
  * language modeling: `{"text": str}`.

`mask[i] = 1` marks token `i` as a training target: assistant turns (with their end-of-turn token)
for conversations, the completion (and EOS) for prompt-completion, everything after the first
token for plain text. Extra fields in a record are ignored.

Conversations go through the tokenizer's chat format (the byte tokenizer's own, or a Hugging Face
Jinja template; see `jaxpost.data.chat_template` for how assistant tokens are found). Plain
prompts and texts get the tokenizer's BOS rule (`prefix_ids`) and end with EOS.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jaxpost.data.chat_template import TemplateError
from jaxpost.data.messages import message_text


class DataError(ValueError):
    """A record that cannot be used; the message starts with its location (file:line)."""


def _fail(where: str, problem: str) -> DataError:
    return DataError(f"{where}: {problem}")


def _messages(value: Any, field: str, where: str) -> list[dict]:
    """Validated messages as dicts: role, content (a string, or a list of `{"type": "text",
    "text": ...}` parts), and any other keys (e.g. `reasoning_content`, `tool_calls`), which
    Hugging Face chat templates may render."""
    if not isinstance(value, list) or not value:
        raise _fail(where, f"field {field!r} must be a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise _fail(where, f"{field}[{i}] must be an object with 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role not in ("system", "user", "assistant"):
            raise _fail(
                where, f"{field}[{i}] has unknown role {role!r} (expected system, user, assistant)"
            )
        if isinstance(content, list):
            for k, part in enumerate(content):
                if not (
                    isinstance(part, Mapping)
                    and part.get("type") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    raise _fail(
                        where,
                        f"{field}[{i}].content[{k}] must be a text part "
                        '({"type": "text", "text": ...}); other content types are not supported',
                    )
        elif not isinstance(content, str):
            raise _fail(
                where, f"{field}[{i}].content must be a string, got {type(content).__name__}"
            )
        out.append(dict(msg))
    return out


def _check_assistant_content(messages: Sequence[dict], field: str, where: str) -> None:
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant" and not message_text(msg):
            raise _fail(where, f"{field}[{i}] is an assistant turn with empty content")


def _render_chat(tok, messages, where: str, first: int = 0) -> tuple[list[int], list[int], int]:
    """The tokenizer's chat rendering; assistant turns at index >= `first` are targets."""
    try:
        return tok.chat(messages, first)
    except TemplateError as e:
        raise _fail(where, str(e)) from None


def _text(record: Mapping, field: str, where: str) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise _fail(where, f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def tokenize_sft(record: Any, tok, where: str) -> tuple[list[int], list[int]]:
    """Token ids and target mask of one SFT record; raises DataError naming `where`."""
    if not isinstance(record, Mapping):
        raise _fail(where, f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = _messages(record["messages"], "messages", where)
        _check_assistant_content(messages, "messages", where)
        ids, mask, _ = _render_chat(tok, messages, where)
    elif "prompt" in record or "completion" in record:
        for field in ("prompt", "completion"):
            if field not in record:
                raise _fail(where, f"prompt-completion record is missing field {field!r}")
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):
            p = _messages(prompt, "prompt", where)
            c = _messages(completion, "completion", where)
            _check_assistant_content(c, "completion", where)
            ids, mask, _ = _render_chat(tok, p + c, where, first=len(p))
        else:
            prompt, completion = _text(record, "prompt", where), _text(record, "completion", where)
            if not completion:
                raise _fail(where, "empty completion: nothing to train on")
            p_ids = list(tok.prefix_ids) + tok.encode(prompt)
            c_ids = tok.encode(completion) + [tok.eos_id]
            ids, mask = p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids)
    elif "text" in record:
        text = _text(record, "text", where)
        if not text:
            raise _fail(where, "empty 'text'")
        ids = list(tok.prefix_ids) + tok.encode(text) + [tok.eos_id]
        mask = [0] * max(1, len(tok.prefix_ids)) + [1] * (len(ids) - max(1, len(tok.prefix_ids)))
    else:
        raise _fail(
            where,
            "record matches no SFT format: expected 'messages', 'prompt'+'completion' or 'text'; "
            f"found keys {sorted(record)}",
        )
    if not any(mask[1:]):
        raise _fail(
            where,
            "no tokens to train on: the loss mask is all zero (no assistant turn after the "
            "first token, or the chat template rendered none)",
        )
    return ids, mask


# --- preference records --------------------------------------------------------------------------
#
# TRL's preference formats: {"prompt", "chosen", "rejected"} with strings or message lists
# (explicit prompt), or {"chosen": [...], "rejected": [...]} conversations whose shared leading
# messages are the prompt (implicit prompt). The prompt is tokenised once and both completions
# continue it, so the two sequences agree token for token up to where they differ.


def _split_implicit_prompt(chosen, rejected, where):
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) or n == len(rejected):
        raise _fail(where, "chosen and rejected are identical (or one continues the other)")
    return chosen[:n], chosen[n:], rejected[n:]


def tokenize_preference(
    record: Any, tok, where: str
) -> tuple[list[int], tuple[list[int], list[int]], tuple[list[int], list[int]]]:
    """`(prompt_ids, (chosen_ids, chosen_mask), (rejected_ids, rejected_mask))` of one record.

    The completions exclude the prompt; masks mark target tokens (the assistant turns and the
    final `<eos>`). Raises DataError naming `where`.
    """
    if not isinstance(record, Mapping):
        raise _fail(where, f"expected a JSON object, got {type(record).__name__}")
    for field in ("chosen", "rejected"):
        if field not in record:
            raise _fail(where, f"preference record is missing field {field!r}")
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" not in record:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise _fail(
                where,
                "preference record without 'prompt' needs conversations (lists of "
                "messages) in 'chosen' and 'rejected', sharing their prompt turns",
            )
        prompt, chosen, rejected = _split_implicit_prompt(
            _messages(chosen, "chosen", where), _messages(rejected, "rejected", where), where
        )
    else:
        prompt = record["prompt"]
    if isinstance(prompt, str):
        for field, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise _fail(where, f"with a string prompt, {field!r} must be a string")
            if not value:
                raise _fail(where, f"empty {field} completion")
        if chosen == rejected:
            raise _fail(where, "chosen and rejected are identical")
        prompt_ids = list(tok.prefix_ids) + tok.encode(prompt)
        c_ids, r_ids = (tok.encode(c) + [tok.eos_id] for c in (chosen, rejected))
        return prompt_ids, (c_ids, [1] * len(c_ids)), (r_ids, [1] * len(r_ids))
    if "prompt" in record:
        prompt = _messages(prompt, "prompt", where)
        chosen = _messages(chosen, "chosen", where)
        rejected = _messages(rejected, "rejected", where)
        if chosen == rejected:
            raise _fail(where, "chosen and rejected are identical")
    result, prompts = [], []
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        _check_assistant_content(msgs, field, where)
        ids, mask, prompt_len = _render_chat(tok, list(prompt) + list(msgs), where, len(prompt))
        if not any(mask[prompt_len:]):
            raise _fail(where, f"{field!r} has no assistant turn to train on (all-zero mask)")
        prompts.append(ids[:prompt_len])
        result.append((ids[prompt_len:], mask[prompt_len:]))
    if prompts[0] != prompts[1]:
        raise _fail(
            where, "the chat template tokenises the prompt differently for chosen and rejected"
        )
    return prompts[0], result[0], result[1]
