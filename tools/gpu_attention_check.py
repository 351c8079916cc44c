"""On an NVIDIA GPU: the cuDNN attention path gives the XLA path's logits (bf16), packed rows
included. Prints the largest differences.  python tools/gpu_attention_check.py"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import model as model_lib

config = dataclasses.replace(model_lib.preset("bench-small"), dtype="bfloat16")
params = model_lib.init_params(config)
rng = np.random.default_rng(0)
tokens = jnp.asarray(rng.integers(3, config.vocab_size, size=(4, 1024)), jnp.int32)
segments = np.ones((4, 1024), np.int32)
segments[1, 300:] = 2  # a packed row: two documents
segments[2, 900:] = 0  # padding at the end
positions = np.concatenate([np.arange(300), np.arange(724)])[None].repeat(4, 0)
positions[[0, 2, 3]] = np.arange(1024)
out = {}
for impl in ("xla", "cudnn"):
    c = dataclasses.replace(config, attention=impl)
    f = jax.jit(lambda p, t, pos, s, c=c: model_lib.Decoder(c).apply({"params": p}, t, pos, s))
    out[impl] = np.asarray(
        f(params, tokens, jnp.asarray(positions), jnp.asarray(segments)), np.float32
    )
real = segments > 0
diff = np.abs(out["xla"] - out["cudnn"])[real]
scale = np.abs(out["xla"][real]).max()
packed = np.abs(out["xla"] - out["cudnn"])[1].max()
print(
    f"cudnn vs xla logits (bf16, real tokens): max |diff| {diff.max():.4g}, "
    f"mean {diff.mean():.3g}, logit scale {scale:.3g}; packed row max {packed:.4g}"
)
