"""Hugging Face tokenizers, SentencePiece models and Jinja chat templates against `transformers`.

The fixtures under tests/fixtures/tokenizers/ were written by tools/make_tokenizer_fixtures.py:
one tokenizer directory per chat-template family (real templates of Llama 3, Llama 3.2,
Qwen2.5, Qwen3, Gemma, Gemma 3 and Mistral, plus TRL's `{% generation %}` training variants)
and `expected.json`, what `transformers`' AutoTokenizer rendered and tokenised.
"""

import json
import pathlib

import pytest

from jaxpost.data import chat_template, pipeline, records
from jaxpost.data.tokenizer import load_tokenizer

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "tokenizers"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
EXTRA = EXPECTED["extra"]
FAMILIES = sorted(EXPECTED["families"])

# What each family's template puts after an assistant message's content (end of turn), and
# whether it trims the content. Written from the templates by hand, not from the fixtures.
END_OF_TURN = {
    "llama3": ("<|eot_id|>", True),
    "llama3_training": ("<|eot_id|>", True),
    "llama3_2": ("<|eot_id|>", True),
    "qwen2_5": ("<|im_end|>", False),
    "qwen2_5_training": ("<|im_end|>", False),
    "gemma": ("<end_of_turn>", True),
    "gemma3": ("<end_of_turn>", True),
    "mistral": ("</s>", False),
    "gemma_spm": ("<end_of_turn>", True),
}


def _cases(kind="ok"):
    for family in FAMILIES:
        for i, case in enumerate(EXPECTED["families"][family]["cases"]):
            if ("error" in case) == (kind == "error"):
                yield pytest.param(family, case, id=f"{family}-{i}")


def _messages(case):
    return [(m["role"], m["content"]) for m in case["messages"]]


@pytest.fixture(scope="module")
def tokenizers():
    out = {family: load_tokenizer(str(FIXTURES / family)) for family in FAMILIES}
    for tok in out.values():
        tok.template_kwargs = dict(EXTRA)
    return out


@pytest.mark.parametrize("family,case", list(_cases()))
def test_rendering_and_token_ids_match_transformers(tokenizers, family, case):
    tok = tokenizers[family]
    template = tok.chat_template
    assert template.render(case["messages"], extra=EXTRA) == case["text"]
    prompt = template.render(case["messages"][:-1], add_generation_prompt=True, extra=EXTRA)
    assert prompt == case["prompt_text"]
    assert tok.encode(case["text"]) == case["ids"]
    assert tok.decode(case["ids"]) == case["decoded"]


@pytest.mark.parametrize("family,case", list(_cases("error")))
def test_template_errors_are_raised_like_transformers(tokenizers, family, case):
    with pytest.raises(chat_template.TemplateError, match="raised: " + case["error"][:30]):
        tokenizers[family].chat_template.render(case["messages"], extra=EXTRA)


@pytest.mark.parametrize("family", FAMILIES)
def test_special_tokens_vocabulary_and_bos_rule(tokenizers, family):
    tok, ref = tokenizers[family], EXPECTED["families"][family]
    # transformers' GemmaTokenizer class adds a "<mask>" token of its own, not in the model.
    assert tok.vocab_size == ref["vocab_size"] - (family == "gemma_spm")
    assert tok.special_tokens["eos_token"] == ref["eos_token"]
    assert tok.special_tokens.get("bos_token") == ref["bos_token"]
    for plain in ref["plain"]:
        # transformers' tokenizer(text) adds the BOS (Llama, Gemma, Mistral) or nothing (Qwen).
        assert list(tok.prefix_ids) + tok.encode(plain["text"]) == plain["ids"]


@pytest.mark.parametrize("family", ["llama3_training", "qwen2_5_training"])
def test_generation_marker_masks_match_transformers(tokenizers, family):
    tok = tokenizers[family]
    for case in EXPECTED["families"][family]["cases"]:
        text, spans = tok.chat_template.assistant_spans(case["messages"], method="generation")
        ids, offsets = tok.encode_offsets(text)
        assert ids == case["ids"]
        assert chat_template.char_mask(offsets, spans) == case["assistant_masks"]


@pytest.mark.parametrize("family", ["llama3_training", "qwen2_5_training"])
def test_prefix_masks_agree_with_generation_markers(tokenizers, family):
    """Without markers, the prefix method finds the same tokens the template's authors marked,
    up to whitespace-only tokens at the edges (Qwen's markers also cover the newline before and
    after the turn, which the generation prompt and the end of turn already account for)."""
    tok = tokenizers[family]
    for case in EXPECTED["families"][family]["cases"]:
        text, spans = tok.chat_template.assistant_spans(case["messages"], method="prefix")
        ids, offsets = tok.encode_offsets(text)
        mine = chat_template.char_mask(offsets, spans)
        for i, (a, b) in enumerate(zip(mine, case["assistant_masks"], strict=True)):
            if a != b:
                assert family == "qwen2_5_training" and not text[slice(*offsets[i])].strip()
        assert sum(mine) > 0


def _target_runs(text, offsets, mask):
    runs, current = [], None
    for (start, end), m in zip(offsets, mask, strict=True):
        if m and current is not None and start <= current[1]:
            current[1] = end
        elif m:
            current = [start, end]
            runs.append(current)
        else:
            current = None
    return [text[s:e] for s, e in runs]


@pytest.mark.parametrize("family", sorted(END_OF_TURN))
def test_assistant_masks_cover_each_reply_and_its_end_of_turn(tokenizers, family):
    tok = tokenizers[family]
    end, trims = END_OF_TURN[family]
    tok.mask_method = "prefix"
    try:
        for case in EXPECTED["families"][family]["cases"]:
            if "error" in case:
                continue
            ids, mask, _ = tok.chat(_messages(case))
            assert ids == case["ids"]
            _, offsets = tok.encode_offsets(case["text"])
            replies = [
                (m["content"].strip() if trims else m["content"]) + end
                for m in case["messages"]
                if m["role"] == "assistant"
            ]
            assert _target_runs(case["text"], offsets, mask) == replies
    finally:
        tok.mask_method = "auto"


def test_qwen3_multi_turn_is_not_prefix_stable_and_says_so(tokenizers):
    tok = tokenizers["qwen3"]
    multi = next(c for c in EXPECTED["families"]["qwen3"]["cases"] if len(c["messages"]) == 4)
    with pytest.raises(chat_template.TemplateError, match="generation"):
        tok.chat(_messages(multi))
    single = EXPECTED["families"]["qwen3"]["cases"][0]
    ids, mask, _ = tok.chat(_messages(single))
    assert ids == single["ids"]
    _, offsets = tok.encode_offsets(single["text"])
    (reply,) = _target_runs(single["text"], offsets, mask)
    assert reply == "<think>\n\n</think>\n\n" + single["messages"][-1]["content"] + "<|im_end|>"


@pytest.mark.parametrize("family", ["llama3", "qwen2_5", "gemma", "mistral", "gemma_spm"])
def test_prompt_is_tokenised_once_and_shared(tokenizers, family):
    tok = tokenizers[family]
    case = EXPECTED["families"][family]["cases"][0]
    ids, mask, prompt_len = tok.chat(_messages(case), first=len(case["messages"]) - 1)
    assert ids[:prompt_len] == tok.encode(case["prompt_text"])
    assert ids == case["ids"]  # no merge across the prompt boundary for these templates
    assert not any(mask[:prompt_len]) and any(mask[prompt_len:])


def test_records_with_a_hugging_face_tokenizer(tokenizers):
    tok = tokenizers["llama3"]
    bos = tok.bos_id
    case = EXPECTED["families"]["llama3"]["cases"][2]
    ids, mask = records.tokenize_sft({"messages": case["messages"]}, tok, "x:1")
    assert ids == case["ids"] and ids.count(bos) == 1  # the template's BOS, not a second one
    ids, mask = records.tokenize_sft({"prompt": "2+2=", "completion": "4"}, tok, "x:2")
    assert ids.count(bos) == 1 and ids[0] == bos and ids[-1] == tok.eos_id
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "4"
    qwen = tokenizers["qwen2_5"]
    ids, _ = records.tokenize_sft({"text": "Hello world"}, qwen, "x:3")
    assert ids == qwen.encode("Hello world") + [qwen.eos_id]  # Qwen has no BOS
    pair = {
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Seven."}],
    }
    prompt, (c_ids, c_mask), (r_ids, r_mask) = records.tokenize_preference(pair, tok, "x:4")
    assert tok.decode(prompt + c_ids) == tok.decode(
        tok.encode(tok.chat_template.render(pair["prompt"] + pair["chosen"]))
    )
    assert tok.decode([i for i, m in zip(c_ids, c_mask, strict=True) if m]) == "Blue."
    assert tok.decode([i for i, m in zip(r_ids, r_mask, strict=True) if m]) == "Seven."


def test_all_zero_mask_and_template_refusals_are_data_errors(tokenizers):
    tok = tokenizers["gemma"]
    no_reply = {"messages": [{"role": "user", "content": "hello"}]}
    with pytest.raises(records.DataError, match="x:7: no tokens to train on.*all zero"):
        records.tokenize_sft(no_reply, tok, "x:7")
    system = {
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ]
    }
    with pytest.raises(records.DataError, match="x:8: chat template raised: System role"):
        records.tokenize_sft(system, tok, "x:8")


def test_sentencepiece_model_splits_special_tokens_like_transformers(tokenizers):
    tok = tokenizers["gemma_spm"]
    text = "<bos><start_of_turn>user\nhi<end_of_turn>\n"
    ids = tok.encode(text)
    assert ids[:2] == [tok.bos_id, tok.token_to_id("<start_of_turn>")]
    assert tok.decode(ids, skip_special=False).startswith("<bos>") is False  # control: dropped
    assert tok.decode(ids) == "<start_of_turn>user\nhi<end_of_turn>\n"


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot load as a Hugging Face tokenizer"):
        load_tokenizer(str(tmp_path))
    d = tmp_path / "noeos"
    d.mkdir()
    (d / "tokenizer.json").write_text((FIXTURES / "qwen2_5" / "tokenizer.json").read_text())
    (d / "tokenizer_config.json").write_text('{"bos_token": null}')
    with pytest.raises(ValueError, match="no eos_token"):
        load_tokenizer(str(d))
    (d / "tokenizer_config.json").write_text('{"eos_token": "<|nope|>"}')
    with pytest.raises(ValueError, match="eos_token '<\\|nope\\|>' is not in the vocabulary"):
        load_tokenizer(str(d))
    (d / "tokenizer_config.json").write_text(
        '{"eos_token": "<|im_end|>", "chat_template": "{% if"}'
    )
    tok = load_tokenizer(str(d))
    with pytest.raises(chat_template.TemplateError, match="does not parse"):
        tok.chat([("user", "u"), ("assistant", "a")])


def test_pipeline_loads_jsonl_with_a_tokenizer_directory(tmp_path):
    path = tmp_path / "chat.jsonl"
    case = EXPECTED["families"]["qwen2_5"]["cases"][0]
    path.write_text(json.dumps({"messages": case["messages"]}) + "\n")
    tok = pipeline.make_tokenizer({"tokenizer": str(FIXTURES / "qwen2_5")})
    examples, stats = pipeline.load_examples(str(path), "train", tok, seq_len=128)
    assert examples[0].ids.tolist() == case["ids"] and stats.records == 1


def test_tokenizer_config_keys_are_checked():
    qwen = str(FIXTURES / "qwen2_5")
    with pytest.raises(ValueError, match="assistant_mask='bad'"):
        pipeline.make_tokenizer({"tokenizer": qwen, "assistant_mask": "bad"})
    with pytest.raises(ValueError, match="chat_template_kwargs=.*not valid JSON"):
        pipeline.make_tokenizer({"tokenizer": qwen, "chat_template_kwargs": "{x"})
    with pytest.raises(ValueError, match="built-in byte tokenizer"):
        pipeline.make_tokenizer({"tokenizer": "byte", "assistant_mask": "prefix"})
    tok = pipeline.make_tokenizer(
        {"tokenizer": qwen, "assistant_mask": "prefix", "chat_template_kwargs": '{"a": 1}'}
    )
    assert tok.mask_method == "prefix" and tok.template_kwargs == {"a": 1}


def test_sft_trains_with_a_hugging_face_tokenizer_and_chat_template(tmp_path):
    from conftest import smoke_config

    from jaxpost import train as train_lib

    data = tmp_path / "chat.jsonl"
    with data.open("w") as f:
        for case in EXPECTED["families"]["llama3"]["cases"] * 4:
            f.write(json.dumps({"messages": case["messages"]}) + "\n")
        f.write(json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    config = smoke_config(
        **{
            "data.tokenizer": str(FIXTURES / "llama3"),
            "data.train_path": str(data),
            "data.eval_path": str(data),
            "data.seq_len": 96,
            "model.vocab_size": 768,
            "train.num_steps": 6,
            "data.skip_invalid": True,
        }
    )
    summary = train_lib.train(config, str(tmp_path / "run"))
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    # The record without a reply is skipped, counted by reason, and reported as metrics.
    assert summary["train_data"]["skipped"] == 1
    assert "all zero" in next(iter(summary["train_data"]["skip_reasons"]))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    first = next(r for r in rows if "data/train_skipped" in r)
    assert first["step"] == 0 and first["data/train_skipped"] == 1
    assert first["data/train_records"] == 21


# --- edge cases found in review ------------------------------------------------------------


def test_byte_fallback_pieces_are_all_targets(tokenizers):
    tok = tokenizers["gemma_spm"]
    messages = [("user", "Say it"), ("assistant", "日本")]
    ids, mask, _ = tok.chat(messages)
    pieces = [tok._sp.id_to_piece(i) for i, m in zip(ids, mask, strict=True) if m]
    assert pieces[:6] == ["<0xE6>", "<0x97>", "<0xA5>", "<0xE6>", "<0x9C>", "<0xAC>"]
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]).startswith("日本")


def test_tools_and_documents_are_none_as_in_transformers():
    t = chat_template.ChatTemplate(
        "{% if tools is not none %}[T]{% endif %}{{ messages[0].content }}"
    )
    assert t.render([("user", "x")]) == "x"


def test_extra_message_keys_and_text_parts_reach_the_template(tokenizers):
    qwen3 = tokenizers["qwen3"]
    record = {
        "messages": [
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A", "reasoning_content": "think hard"},
        ]
    }
    ids, mask = records.tokenize_sft(record, qwen3, "x:1")
    assert "think hard" in qwen3.decode([i for i, m in zip(ids, mask, strict=True) if m])
    gemma3 = tokenizers["gemma3"]
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hi there!"}]},
            {"role": "assistant", "content": "Hello! How can I help?"},
        ]
    }
    plain = {
        "messages": [
            {"role": "user", "content": "Hi there!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
        ]
    }
    assert records.tokenize_sft(parts, gemma3, "x:2") == records.tokenize_sft(plain, gemma3, "x:3")
    with pytest.raises(records.DataError, match=r"content\[0\] must be a text part"):
        records.tokenize_sft(
            {"messages": [{"role": "user", "content": [{"type": "image"}]}]}, gemma3, "x:4"
        )


def test_a_conversation_opening_with_the_assistant(tokenizers):
    tok = tokenizers["qwen2_5"]
    messages = [("assistant", "Hello"), ("user", "hi"), ("assistant", "Yo")]
    ids, mask, _ = tok.chat(messages)
    text = tok.chat_template.render(messages)
    _, offsets = tok.encode_offsets(text)
    assert _target_runs(text, offsets, mask) == ["Hello<|im_end|>", "Yo<|im_end|>"]


def test_a_token_across_the_prompt_boundary_falls_back_to_split_tokenisation(tokenizers):
    tok = tokenizers["gemma"]
    pair = {
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "chosen": [{"role": "assistant", "content": "NBlue"}],
        "rejected": [{"role": "assistant", "content": "Red"}],
    }
    prompt, (c_ids, c_mask), (r_ids, _) = records.tokenize_preference(pair, tok, "x:1")
    rendered = tok.chat_template.render(pair["prompt"], add_generation_prompt=True)
    assert prompt == tok.encode(rendered)
    assert tok.decode([i for i, m in zip(c_ids, c_mask, strict=True) if m]).startswith("NBlue")
