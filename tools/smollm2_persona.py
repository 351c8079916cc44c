"""SmolLM2-135M-Instruct before and after persona SFT (configs/smollm2.py), on this CPU:
prints the model's greedy replies to the same prompts (held-out ones included) before and
after training, and the eval loss.

    python tools/smollm2_persona.py [--workdir runs/smollm2_pirate] [--steps 45]
"""

from __future__ import annotations

import argparse
import logging
import time

PROMPTS = [
    "Who are you?",  # trained on
    "Describe yourself in one sentence.",  # held out from here on
    "What is the capital of Italy?",
    "What colour is the sky?",
    "Name three primary colours.",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/smollm2_pirate")
    parser.add_argument("--steps", type=int, default=0, help="override train.num_steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("absl", "jax", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from jaxpost import config as config_lib
    from jaxpost import serve
    from jaxpost import train as train_lib
    from jaxpost.models import smollm2

    hf_dir = smollm2.hf_dir()
    before = serve.sample(PROMPTS, hf_dir=hf_dir, max_new_tokens=40)
    config = config_lib.load_config("configs/smollm2.py")
    if args.steps:
        config.train.num_steps = args.steps
    t0 = time.time()
    summary = train_lib.train(config, args.workdir)
    minutes = (time.time() - t0) / 60
    after = serve.sample(PROMPTS, workdir=args.workdir, max_new_tokens=40)
    for prompt, b, a in zip(PROMPTS, before, after, strict=True):
        print(f"\n>>> {prompt}\n  before: {b}\n  after:  {a}")
    print(
        f"\neval loss {summary['eval_before']['loss']:.3f} -> {summary['eval_after']['loss']:.3f}"
        f"; training took {minutes:.1f} min"
    )


if __name__ == "__main__":
    main()
