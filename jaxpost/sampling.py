"""Text generation with a KV cache: batched prompts of different lengths, greedy or
temperature / top-k / top-p sampling, stopping at stop tokens or a length limit.

    outs = generate(config, params, [ids_a, ids_b], max_new_tokens=64)        # greedy
    outs = generate(config, params, prompts, temperature=0.7, top_p=0.9, seed=1)

The prompt pass (prefill) runs the right-padded prompts at once and fills the cache; then one
token per step for every row, each row at its own position, inside one compiled `while_loop`
that ends when every row has stopped. Prompt length and cache size are rounded up to buckets
(powers of two), so a new prompt length rarely compiles again.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import model as model_lib


def sample_logits(logits_BV, rng, *, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """One token id per row: argmax when `temperature == 0`, else a draw from
    softmax(logits / temperature) restricted to the `top_k` most likely tokens (0 = all) and to
    the smallest set whose probability reaches `top_p` (the most likely token always stays)."""
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if 0 < top_k < logits_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if top_p < 1.0:
        order_BV = jnp.argsort(-logits_BV, axis=-1)
        sorted_BV = jnp.take_along_axis(logits_BV, order_BV, axis=-1)
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the more likely tokens
        drop_sorted_BV = before_BV >= top_p
        drop_BV = (
            jnp.zeros_like(drop_sorted_BV)
            .at[jnp.arange(logits_BV.shape[0])[:, None], order_BV]
            .set(drop_sorted_BV)
        )
        logits_BV = jnp.where(drop_BV, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


def _bucket(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("config", "slots", "temperature", "top_k", "top_p"))
def _generate(
    params, tokens_BL, lengths_B, stop_ids, rng, limit, *, config, slots, temperature, top_k, top_p
):
    """Up to `limit` (<= slots) new tokens per row; -1 after a row stops."""
    max_new_tokens = slots
    B, L = tokens_BL.shape
    decoder = model_lib.Decoder(config)
    cache = model_lib.init_cache(config, B, L + max_new_tokens)
    positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    # Prefill: hidden states only, then the output projection at each row's last prompt token
    # (never the [B, L, V] logits).
    hidden_BLD, cache = decoder.apply(
        {"params": params}, tokens_BL, positions_BL, cache=cache, return_hidden=True
    )
    last_BD = hidden_BLD[jnp.arange(B), lengths_B - 1]
    unembed_DV = model_lib.unembedding(params, config).astype(config.dtype)
    last_BV = jnp.einsum(
        "bd,dv->bv", last_BD, unembed_DV, preferred_element_type=model_lib.logits_dtype(config)
    ).astype(jnp.float32)
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

    def cond(state):
        step, _, done_B, *_ = state
        return (step < limit) & ~jnp.all(done_B)

    def body(state):
        step, out_BT, done_B, logits_BV, cache, rng = state
        rng, key = jax.random.split(rng)
        token_B = jnp.where(done_B, -1, sample(logits_BV, key))
        out_BT = out_BT.at[:, step].set(token_B)
        done_B = done_B | jnp.isin(token_B, stop_ids)
        positions_B1 = (lengths_B + step)[:, None]
        logits_B1V, cache = decoder.apply(
            {"params": params}, jnp.maximum(token_B, 0)[:, None], positions_B1, cache=cache
        )
        return step + 1, out_BT, done_B, logits_B1V[:, 0], cache, rng

    out_BT = jnp.full((B, max_new_tokens), -1, jnp.int32)
    state = (0, out_BT, jnp.zeros((B,), bool), last_BV, cache, rng)
    return jax.lax.while_loop(cond, body, state)[1]


def generate(
    config: model_lib.Config,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_ids: Sequence[int] = (),
    seed: int = 0,
) -> list[list[int]]:
    """Completions (token ids, without the prompt) for each prompt; a completion ends after
    its first stop token (included) or at `max_new_tokens`."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and no empty prompt")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 1:
        raise ValueError(
            f"bad sampling settings: temperature={temperature} (>= 0), top_k={top_k} (>= 0), "
            f"top_p={top_p} (in (0, 1]), max_new_tokens={max_new_tokens} (>= 1)"
        )
    for p in prompts:
        if max(p) >= config.vocab_size or min(p) < 0:
            raise ValueError(f"prompt token ids must be in [0, {config.vocab_size})")
    config = _sampling_config(config)
    L = _bucket(max(len(p) for p in prompts))
    tokens = np.zeros((len(prompts), L), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    stops = np.array(list(stop_ids) or [-2], np.int32)
    out = _generate(
        params,
        tokens,
        lengths,
        stops,
        jax.random.PRNGKey(seed),
        np.int32(max_new_tokens),
        config=config,
        slots=_bucket(max_new_tokens),
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
    )
    result = []
    for row in np.asarray(out):
        row = [int(t) for t in row[:max_new_tokens] if t >= 0]
        for i, t in enumerate(row):
            if t in set(stop_ids):
                row = row[: i + 1]
                break
        result.append(row)
    return result


def _sampling_config(config: model_lib.Config) -> model_lib.Config:
    # Sampling needs no activation checkpointing.
    import dataclasses

    return dataclasses.replace(config, remat="none")
