"""Write the tokenizer and chat-template fixtures under tests/fixtures/tokenizers/ with the
reference outputs of Hugging Face `transformers`, so CI checks jaxpost against it without torch.

Needs `transformers`, `tokenizers`, `sentencepiece` and `protobuf` (no torch), and the chat
templates that TRL's wheel ships (real model templates: Llama 3, Llama 3.2, Qwen2.5, Qwen3,
Gemma, Gemma 3, plus TRL's `{% generation %}` training variants):

    pip download --no-deps trl==1.16.0 -d /tmp/trl && unzip -q /tmp/trl/trl-*.whl -d /tmp/trl
    python tools/make_tokenizer_fixtures.py --trl_templates /tmp/trl/trl/chat_templates

For each template family it trains a small tokenizer of the family's kind (byte-level BPE as in
Llama 3 and Qwen; SentencePiece-style BPE as in Llama 2, Mistral and Gemma; and a real
SentencePiece .model), writes a tokenizer directory with the family's special tokens and chat
template, and records what `transformers`' AutoTokenizer makes of a few conversations: the
rendered text (with and without a generation prompt), the token ids, the assistant masks of
templates with generation markers, and `tokenizer(text)` ids for the BOS rule.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

# Mistral-7B-Instruct-v0.1's template (not among TRL's).
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and "
    "assistant roles are supported!') }}{% endif %}{% endfor %}"
)

LLAMA3 = dict(
    kind="bytelevel",
    bos="<|begin_of_text|>",
    eos="<|eot_id|>",
    specials=[
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ],
    add_bos=True,
)
QWEN = dict(
    kind="bytelevel",
    bos=None,
    eos="<|im_end|>",
    pad="<|endoftext|>",
    specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
    add_bos=False,
)
GEMMA = dict(
    kind="spstyle",
    bos="<bos>",
    eos="<eos>",
    pad="<pad>",
    specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
    add_bos=True,
)
MISTRAL_TOK = dict(
    kind="spstyle",
    bos="<s>",
    eos="</s>",
    unk="<unk>",
    specials=["<unk>", "<s>", "</s>"],
    add_bos=True,
)

# family -> (template file in TRL's chat_templates, or inline source; tokenizer settings)
FAMILIES = {
    "llama3": ("llama3.jinja", LLAMA3),
    "llama3_training": ("llama3_training.jinja", LLAMA3),
    "llama3_2": ("llama3_2.jinja", LLAMA3),
    "qwen2_5": ("qwen2_5.jinja", QWEN),
    "qwen2_5_training": ("qwen2_5_training.jinja", QWEN),
    "qwen3": ("qwen3.jinja", QWEN),
    "gemma": ("gemma.jinja", GEMMA),
    "gemma3": ("gemma3.jinja", GEMMA),
    "mistral": (MISTRAL, MISTRAL_TOK),
    "gemma_spm": ("gemma.jinja", dict(GEMMA, kind="spm")),
}

CONVERSATIONS = [
    [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "2+2 is 4."},
    ],
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ],
    [
        {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "Why did the chicken cross the road? To get across."},
    ],
    [
        {"role": "user", "content": "  Spaces around  "},
        {"role": "assistant", "content": "  kept or trimmed?  "},
    ],
    [
        {"role": "user", "content": "Ünïcödé and emoji 🙂?"},
        {"role": "assistant", "content": "Sí, ça marche 🙂.\nNew line."},
    ],
]
PLAIN_TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello world"]
EXTRA = {"date_string": "26 Jul 2024"}  # llama3_2 would otherwise print today's date

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Post-training turns a pretrained language model into an assistant.",
    "Supervised fine-tuning, reward modeling and preference optimization follow pretraining.",
    "A chat template renders messages from the system, the user and the assistant.",
    "Numbers like 2+2 is 4 and 12345 appear in text, as do punctuation marks: ; , . ! ?",
    "Cutting Knowledge Date: December 2023. Today Date: 26 Jul 2024.",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "Conversation roles must alternate user/assistant/user/assistant/...",
] + [m["content"] for conv in CONVERSATIONS for m in conv]


def train_tokenizer(settings: dict, out_dir: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = settings["specials"]
    corpus = CORPUS * 20
    if settings["kind"] == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=700,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    else:  # SentencePiece-style BPE: "▁" for spaces, prepended to the first word
        tok = Tokenizer(models.BPE(unk_token=settings.get("unk", "<unk>")))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials)
    tok.train_from_iterator(corpus, trainer)
    steps = [processors.ByteLevel(trim_offsets=False)] if settings["kind"] == "bytelevel" else []
    if settings["add_bos"]:
        bos = settings["bos"]
        steps.append(
            processors.TemplateProcessing(
                single=f"{bos} $A",
                pair=f"{bos} $A {bos} $B",
                special_tokens=[(bos, tok.token_to_id(bos))],
            )
        )
    if steps:
        tok.post_processor = processors.Sequence(steps)
    tok.save(os.path.join(out_dir, "tokenizer.json"))


def train_spm(settings: dict, out_dir: str) -> None:
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=model,
        vocab_size=420,
        hard_vocab_limit=False,
        model_type="bpe",
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        normalization_rule_name="identity",  # as Gemma's own model
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())


def write_family(name: str, template: str, settings: dict, root: str) -> str:
    out_dir = os.path.join(root, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    if settings["kind"] == "spm":
        train_spm(settings, out_dir)
        tokenizer_class = "GemmaTokenizer"
    else:
        train_tokenizer(settings, out_dir)
        tokenizer_class = "PreTrainedTokenizerFast"
    config = {
        "tokenizer_class": tokenizer_class,
        "bos_token": settings["bos"],
        "eos_token": settings["eos"],
        "chat_template": template,
        "model_max_length": 4096,
    }
    for key in ("pad", "unk"):
        if settings.get(key):
            config[f"{key}_token"] = settings[key]
    if settings["kind"] == "spm":
        config["add_bos_token"] = True
        config["add_eos_token"] = False
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1, ensure_ascii=False)
    return out_dir


def reference(out_dir: str) -> dict:
    """What transformers makes of the conversations with this tokenizer directory."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir)
    has_markers = "generation" in tok.chat_template and "{%- generation" in tok.chat_template
    cases = []
    for conv in CONVERSATIONS:
        case = {"messages": conv}
        try:
            case["text"] = tok.apply_chat_template(conv, tokenize=False, **EXTRA)
            case["prompt_text"] = tok.apply_chat_template(
                conv[:-1], tokenize=False, add_generation_prompt=True, **EXTRA
            )
            enc = tok.apply_chat_template(
                conv,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=has_markers,
                **EXTRA,
            )
            case["ids"] = list(enc["input_ids"])
            if has_markers:
                case["assistant_masks"] = list(enc["assistant_masks"])
            case["decoded"] = tok.decode(case["ids"], skip_special_tokens=True)
        except Exception as e:  # the template's raise_exception, e.g. no system role
            case = {"messages": conv, "error": str(e)}
        cases.append(case)
    plain = [{"text": t, "ids": list(tok(t)["input_ids"])} for t in PLAIN_TEXTS]
    return {
        "cases": cases,
        "plain": plain,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "vocab_size": len(tok),
        "has_generation_markers": has_markers,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trl_templates", required=True, help="trl/chat_templates directory")
    parser.add_argument("--out", default="tests/fixtures/tokenizers")
    args = parser.parse_args()
    import transformers

    os.makedirs(args.out, exist_ok=True)
    expected = {"transformers": transformers.__version__, "extra": EXTRA, "families": {}}
    for name, (template, settings) in FAMILIES.items():
        if template.endswith(".jinja"):
            with open(os.path.join(args.trl_templates, template), encoding="utf-8") as f:
                template = f.read()
        out_dir = write_family(name, template, settings, args.out)
        expected["families"][name] = reference(out_dir)
        errors = sum("error" in c for c in expected["families"][name]["cases"])
        print(f"{name}: {len(CONVERSATIONS) - errors} conversations rendered, {errors} refused")
    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
