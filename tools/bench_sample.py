"""Sampling throughput (KV cache) on random weights: prefill + decode tokens per second.

python tools/bench_sample.py --model bench-1b --batch 8 --prompt 128 --new 256 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from jaxpost import model as model_lib
from jaxpost import sampling


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bench-tiny", choices=sorted(model_lib.PRESETS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128, help="prompt length (tokens)")
    parser.add_argument("--new", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    config = dataclasses.replace(model_lib.preset(args.model), dtype=args.dtype)
    params = jax.jit(lambda: model_lib.init_params(config))()
    params = jax.tree.map(lambda x: x.astype(args.dtype), params)
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, config.vocab_size, size=(args.batch, args.prompt)).tolist()

    def run():
        t0 = time.perf_counter()
        out = sampling.generate(config, params, prompts, max_new_tokens=args.new)
        return time.perf_counter() - t0, out

    first_s, _ = run()
    steady_s, out = run()
    generated = sum(len(o) for o in out)
    print(
        json.dumps(
            {
                "model": args.model,
                "device": jax.devices()[0].device_kind,
                "batch": args.batch,
                "prompt": args.prompt,
                "new_tokens": args.new,
                "dtype": args.dtype,
                "first_call_s": round(first_s, 2),
                "call_s": round(steady_s, 3),
                "generated_tokens_per_s": round(generated / steady_s, 1),
                "ms_per_step": round(1000 * steady_s / args.new, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
