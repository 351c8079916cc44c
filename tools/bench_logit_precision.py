"""How much bf16 logits move DPO's log-probs and log-ratios, against float32 logits.

  python tools/bench_logit_precision.py --model bench-small [--pairs 8 --seq 256]
  python tools/bench_logit_precision.py --hf_dir builtin:smollm2-135m-instruct --data builtin:pirate

The model computes in bfloat16 (float32 params). Completion log-prob sums are taken three ways:
  * bf16 logits: the output projection in bf16, rounded before the float32 log-softmax (what
    jaxpost did before its logits accumulated in float32);
  * f32 logits: the same bf16 hidden states, projection accumulated and output in float32 (now);
  * exact: the whole model in float32 (the reference).
A DPO log-ratio is `logp_policy(y) - logp_reference(y)`; the policy here is the reference with
every weight perturbed by `--policy_noise` of its own standard deviation, and the reference
log-probs are computed the same way as the policy's (as a precomputed reference pass would).
Prints one JSON line of mean / max absolute errors against the exact values.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import hf, losses
from jaxpost import model as model_lib
from jaxpost.data import pipeline
from jaxpost.models import smollm2


def _sequences(args, vocab: int):
    """`(ids [N, L+1], completion mask [N, L])`: real conversations from `--data` through the
    model's tokenizer, or random tokens whose second half is the completion."""
    if args.data:
        tok = pipeline.make_tokenizer({"tokenizer": args.tokenizer_dir})
        examples, _ = pipeline.load_examples(
            args.data, "train", tok, seq_len=args.seq, max_examples=2 * args.pairs
        )
        ids = np.zeros((len(examples), args.seq + 1), np.int32)
        mask = np.zeros((len(examples), args.seq), np.float32)
        for i, ex in enumerate(examples):
            ids[i, : len(ex.ids)] = ex.ids
            mask[i, : len(ex.ids) - 1] = ex.mask[1:]
        return ids, mask
    rng = np.random.default_rng(0)
    ids = rng.integers(3, vocab, size=(2 * args.pairs, args.seq + 1), dtype=np.int32)
    mask = np.zeros((2 * args.pairs, args.seq), np.float32)
    mask[:, args.seq // 2 :] = 1
    return ids, mask


def _logps(config, params, ids, mask, how: str) -> np.ndarray:
    inputs, targets = ids[:, :-1], ids[:, 1:]
    if how == "exact":
        config = dataclasses.replace(config, dtype="float32")
    hidden = model_lib.Decoder(config).apply({"params": params}, inputs, return_hidden=True)
    unembed = model_lib.unembedding(params, config).astype(hidden.dtype)
    out_dtype = hidden.dtype if how == "bf16_logits" else jnp.float32
    logits = jnp.einsum("bld,dv->blv", hidden, unembed, preferred_element_type=out_dtype)
    return np.asarray(jnp.sum(losses.token_logps(logits, targets) * mask, axis=-1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench-small", choices=sorted(model_lib.PRESETS))
    parser.add_argument("--hf_dir", default="", help="a Hugging Face directory (or builtin:...)")
    parser.add_argument("--data", default="", help="SFT records (with --hf_dir's tokenizer)")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--policy_noise", type=float, default=0.01)
    args = parser.parse_args()
    if args.hf_dir:
        if args.hf_dir.startswith("builtin:"):
            args.hf_dir = smollm2.hf_dir()
        config, ref = hf.load_pretrained(args.hf_dir)
        config = dataclasses.replace(config, dtype="bfloat16")
        name = args.hf_dir
    else:
        config = model_lib.preset(args.model, dtype="bfloat16")
        ref = model_lib.init_params(config, seed=0)
        name = args.model
    args.tokenizer_dir = args.hf_dir
    ids, mask = _sequences(args, config.vocab_size)
    key = jax.random.PRNGKey(1)
    leaves, tree = jax.tree.flatten(ref)
    keys = jax.random.split(key, len(leaves))
    policy = jax.tree.unflatten(
        tree,
        [
            x + args.policy_noise * jnp.std(x) * jax.random.normal(k, x.shape, x.dtype)
            for x, k in zip(leaves, keys, strict=True)
        ],
    )
    result = {"model": name, "sequences": len(ids), "seq": args.seq}
    values = {
        how: {
            "policy": _logps(config, policy, ids, mask, how),
            "reference": _logps(config, ref, ids, mask, how),
        }
        for how in ("exact", "bf16_logits", "f32_logits")
    }
    exact = values["exact"]
    result["completion_tokens_mean"] = float(mask.sum(-1).mean())
    result["exact_logp_mean"] = float(exact["policy"].mean())
    result["exact_log_ratio_mean_abs"] = float(np.abs(exact["policy"] - exact["reference"]).mean())
    for how in ("bf16_logits", "f32_logits"):
        v = values[how]
        logp_err = np.abs(v["policy"] - exact["policy"])
        ratio_err = np.abs((v["policy"] - v["reference"]) - (exact["policy"] - exact["reference"]))
        # DPO's margin h = (pc - rc) - (pr - rr) over consecutive (chosen, rejected) sequences.
        ratio = v["policy"] - v["reference"]
        ratio_exact = exact["policy"] - exact["reference"]
        margin_err = np.abs((ratio[0::2] - ratio[1::2]) - (ratio_exact[0::2] - ratio_exact[1::2]))
        result[how] = {
            "logp_abs_err_mean": float(logp_err.mean()),
            "logp_abs_err_max": float(logp_err.max()),
            "log_ratio_abs_err_mean": float(ratio_err.mean()),
            "log_ratio_abs_err_max": float(ratio_err.max()),
            "margin_abs_err_mean": float(margin_err.mean()),
        }
    old, new = values["bf16_logits"], values["f32_logits"]
    change = np.abs((old["policy"] - old["reference"]) - (new["policy"] - new["reference"]))
    result["log_ratio_change_mean"] = float(change.mean())
    result["log_ratio_change_max"] = float(change.max())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
