"""Tiny random Hugging Face checkpoints and what `transformers` computes with them, for the
parity tests in tests/test_hf.py (CI needs no torch). Run by hand with torch + transformers:

    python tools/make_hf_fixtures.py                       # writes tests/fixtures/hf/
    python tools/make_hf_fixtures.py --verify DIR [DIR..]  # transformers on jaxpost exports

One checkpoint per supported architecture feature: Llama (untied, sharded safetensors), Llama 3
RoPE scaling with tied embeddings (as Llama 3.2), Mistral (sliding window), Qwen2 (QKV bias,
stored in bfloat16), Qwen3 (q/k norms), and a Llama sequence classifier (reward model). Weights are
drawn wider than the default init, norms and biases included, so that a wrong transpose or a
missing norm changes the logits. Saved with each: float32 logits for fixed token ids, and greedy
generations of two prompts of different lengths.

`--verify` loads directories written by `jaxpost export` / `jaxpost.hf.save_pretrained` (named
after the fixture they came from) with transformers' Auto classes and reports the largest logit
difference from the fixture's saved logits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV, HEAD_DIM = (
    272,
    32,
    64,
    2,
    4,
    2,
    8,
)  # VOCAB fits the byte tokenizer
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=INTER,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV,
    head_dim=HEAD_DIM,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
INPUT_SHAPE = (2, 12)
PROMPT_LENGTHS = (5, 8)
NEW_TOKENS = 10


def fixtures():
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForSequenceClassification,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    llama3_rope = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    return {
        # name: (model class, config, save kwargs)
        "llama": (LlamaForCausalLM, LlamaConfig(**COMMON), {"max_shard_size": "60KB"}),
        "llama3_tied": (
            LlamaForCausalLM,
            LlamaConfig(**COMMON, tie_word_embeddings=True, rope_scaling=llama3_rope),
            {},
        ),
        "mistral": (MistralForCausalLM, MistralConfig(**COMMON, sliding_window=4), {}),
        "qwen2_bf16": (
            Qwen2ForCausalLM,
            Qwen2Config(**COMMON, tie_word_embeddings=True, rope_theta=1e6),
            {"bf16": True},
        ),
        "qwen3": (Qwen3ForCausalLM, Qwen3Config(**COMMON), {}),
        "llama_rm": (LlamaForSequenceClassification, LlamaConfig(**COMMON, num_labels=1), {}),
    }


def make(out_root: str) -> None:
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, size=INPUT_SHAPE)
    summary = {}
    for name, (cls, config, opts) in fixtures().items():
        model = cls(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p + 0.25 * torch.randn_like(p))  # norms, biases and all
            if opts.get("bf16"):  # logits of the bf16-rounded weights, as stored
                for p in model.parameters():
                    p.copy_(p.to(torch.bfloat16).to(torch.float32))
            out = model(torch.tensor(ids))
        out_dir = os.path.join(out_root, name)
        shutil.rmtree(out_dir, ignore_errors=True)
        save_model = model.to(torch.bfloat16) if opts.get("bf16") else model
        save_model.save_pretrained(out_dir, max_shard_size=opts.get("max_shard_size", "5GB"))
        model = model.to(torch.float32)
        arrays = {"input_ids": ids.astype(np.int32)}
        if name.endswith("_rm"):
            arrays["scores"] = out.logits[:, 0].numpy().astype(np.float32)
        else:
            arrays["logits"] = out.logits.numpy().astype(np.float32)
            for k, n in enumerate(PROMPT_LENGTHS):
                prompt = torch.tensor(ids[k : k + 1, :n])
                with torch.no_grad():
                    gen = model.generate(
                        prompt,
                        attention_mask=torch.ones_like(prompt),
                        max_new_tokens=NEW_TOKENS,
                        do_sample=False,
                        eos_token_id=2,
                        pad_token_id=0,
                    )
                arrays[f"greedy_{k}"] = gen[0, n:].numpy().astype(np.int32)
        np.savez(os.path.join(out_dir, "expected.npz"), **arrays)
        files = sorted(os.listdir(out_dir))
        summary[name] = files
        print(name, files)
    import transformers

    with open(os.path.join(out_root, "README.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "files": summary}, f, indent=1)


def verify(dirs, fixtures_root: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for d in dirs:
        name = os.path.basename(os.path.normpath(d))
        expected = np.load(os.path.join(fixtures_root, name, "expected.npz"))
        ids = torch.tensor(expected["input_ids"].astype(np.int64))
        with open(os.path.join(d, "config.json")) as f:
            arch = json.load(f)["architectures"][0]
        cls = AutoModelForSequenceClassification if "Sequence" in arch else AutoModelForCausalLM
        model = cls.from_pretrained(d, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            out = model(ids).logits.numpy()
        want = expected["scores"] if "scores" in expected else expected["logits"]
        got = out[:, 0] if "scores" in expected else out
        print(f"{name}: {type(model).__name__} max |logit diff| = {np.abs(got - want).max():.3g}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures/hf")
    parser.add_argument("--verify", nargs="*", help="exported directories to check")
    args = parser.parse_args()
    if args.verify:
        verify(args.verify, args.out)
    else:
        make(args.out)


if __name__ == "__main__":
    main()
