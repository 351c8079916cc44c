"""Turn records in Hugging Face TRL's dataset formats into token ids and loss masks.

SFT formats (TRL's names):
  * conversational: `{"messages": [{"role": "user" | "assistant" | "system", "content": str}]}`;
  * prompt-completion: `{"prompt": str, "completion": str}`, or both as message lists;
  * language modeling: `{"text": str}`.

`mask[i] = 1` marks token `i` as a training target: assistant turns (with their end-of-turn token)
for conversations, the completion (and `<eos>`) for prompt-completion, everything after `<bos>` for
plain text. Extra fields in a record are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from jaxpost.data.tokenizer import ByteTokenizer


class DataError(ValueError):
    """A record that cannot be used; the message starts with its location (file:line)."""


def _fail(where: str, problem: str) -> DataError:
    return DataError(f"{where}: {problem}")


def _messages(value: Any, field: str, where: str) -> list[tuple[str, str]]:
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
        if not isinstance(content, str):
            raise _fail(
                where, f"{field}[{i}].content must be a string, got {type(content).__name__}"
            )
        out.append((role, content))
    return out


def _check_assistant_content(messages: Sequence[tuple[str, str]], field: str, where: str) -> None:
    for i, (role, content) in enumerate(messages):
        if role == "assistant" and not content:
            raise _fail(where, f"{field}[{i}] is an assistant turn with empty content")


def _render_chat(
    tok: ByteTokenizer, messages: Sequence[tuple[str, str]], n_prompt: int = 0
) -> tuple[list[int], list[int]]:
    """Render messages; assistant turns at index >= n_prompt are targets."""
    ids, mask = [tok.bos_id], [0]
    for i, (role, content) in enumerate(messages):
        target = int(role == "assistant" and i >= n_prompt)
        ids.append(tok.role_id(role))
        mask.append(0)
        body = tok.encode(content) + [tok.end_of_turn_id]
        ids += body
        mask += [target] * len(body)
    last_is_target = mask[-1]
    ids.append(tok.eos_id)
    mask.append(last_is_target)
    return ids, mask


def _text(record: Mapping, field: str, where: str) -> str:
    value = record[field]
    if not isinstance(value, str):
        raise _fail(where, f"field {field!r} must be a string, got {type(value).__name__}")
    return value


def tokenize_sft(record: Any, tok: ByteTokenizer, where: str) -> tuple[list[int], list[int]]:
    """Token ids and target mask of one SFT record; raises DataError naming `where`."""
    if not isinstance(record, Mapping):
        raise _fail(where, f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = _messages(record["messages"], "messages", where)
        _check_assistant_content(messages, "messages", where)
        ids, mask = _render_chat(tok, messages)
    elif "prompt" in record or "completion" in record:
        for field in ("prompt", "completion"):
            if field not in record:
                raise _fail(where, f"prompt-completion record is missing field {field!r}")
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list) or isinstance(completion, list):
            p = _messages(prompt, "prompt", where)
            c = _messages(completion, "completion", where)
            _check_assistant_content(c, "completion", where)
            ids, mask = _render_chat(tok, p + c, n_prompt=len(p))
        else:
            prompt, completion = _text(record, "prompt", where), _text(record, "completion", where)
            if not completion:
                raise _fail(where, "empty completion: nothing to train on")
            p_ids, c_ids = tok.encode(prompt), tok.encode(completion)
            ids = [tok.bos_id] + p_ids + c_ids + [tok.eos_id]
            mask = [0] * (1 + len(p_ids)) + [1] * (len(c_ids) + 1)
    elif "text" in record:
        text = _text(record, "text", where)
        if not text:
            raise _fail(where, "empty 'text'")
        ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
        mask = [0] + [1] * (len(ids) - 1)
    else:
        raise _fail(
            where,
            "record matches no SFT format: expected 'messages', 'prompt'+'completion' or 'text'; "
            f"found keys {sorted(record)}",
        )
    if not any(mask):
        raise _fail(where, "no tokens to train on (no assistant turn with content)")
    return ids, mask


# --- preference records --------------------------------------------------------------------------
#
# TRL's preference formats: {"prompt", "chosen", "rejected"} with strings or message lists
# (explicit prompt), or {"chosen": [...], "rejected": [...]} conversations whose shared leading
# messages are the prompt (implicit prompt). The prompt is tokenised once and both completions
# continue it, so the two sequences agree token for token up to where they differ.


def _chat_body(tok: ByteTokenizer, messages: Sequence[tuple[str, str]], target: bool):
    ids, mask = [], []
    for role, content in messages:
        body = tok.encode(content) + [tok.end_of_turn_id]
        ids += [tok.role_id(role)] + body
        mask += [0] + [int(target and role == "assistant")] * len(body)
    return ids, mask


def _split_implicit_prompt(chosen, rejected, where):
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) or n == len(rejected):
        raise _fail(where, "chosen and rejected are identical (or one continues the other)")
    return chosen[:n], chosen[n:], rejected[n:]


def tokenize_preference(
    record: Any, tok: ByteTokenizer, where: str
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
        prompt_ids = [tok.bos_id] + tok.encode(prompt)
        c_ids, r_ids = (tok.encode(c) + [tok.eos_id] for c in (chosen, rejected))
        return prompt_ids, (c_ids, [1] * len(c_ids)), (r_ids, [1] * len(r_ids))
    if "prompt" in record:
        prompt = _messages(prompt, "prompt", where)
        chosen = _messages(chosen, "chosen", where)
        rejected = _messages(rejected, "rejected", where)
        if chosen == rejected:
            raise _fail(where, "chosen and rejected are identical")
    result = []
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        _check_assistant_content(msgs, field, where)
        ids, mask = _chat_body(tok, msgs, target=True)
        if not any(mask):
            raise _fail(where, f"{field!r} has no assistant turn to train on")
        result.append((ids + [tok.eos_id], mask + [mask[-1]]))
    prompt_ids, _ = _chat_body(tok, prompt, target=False)
    return [tok.bos_id] + prompt_ids, result[0], result[1]
