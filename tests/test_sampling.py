"""KV-cache sampling: greedy output equals transformers' generate (fixtures by
tools/make_hf_fixtures.py), cached decoding equals the full forward pass, and the sampling
distribution is the one asked for."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import hf, sampling
from jaxpost import model as model_lib

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"


@pytest.mark.parametrize("name", ["llama", "llama3_tied", "mistral", "qwen2_bf16", "qwen3"])
def test_greedy_generation_matches_transformers(name):
    config, params = hf.load_pretrained(str(FIXTURES / name))
    expected = np.load(FIXTURES / name / "expected.npz")
    ids = expected["input_ids"]
    # Two prompts of different lengths in one batch (5 and 8 tokens), as transformers
    # generated them one at a time; eos is id 2 there.
    out = sampling.generate(
        config, params, [ids[0, :5].tolist(), ids[1, :8].tolist()], max_new_tokens=10, stop_ids=[2]
    )
    assert out == [expected["greedy_0"].tolist(), expected["greedy_1"].tolist()]


def test_cached_decoding_equals_the_full_forward_pass():
    config, params = hf.load_pretrained(str(FIXTURES / "mistral"))  # sliding window 4
    ids = np.load(FIXTURES / "mistral" / "expected.npz")["input_ids"]
    full = np.asarray(model_lib.forward_logits(config, params, ids))
    decoder = model_lib.Decoder(config)
    cache = model_lib.init_cache(config, 2, 16)
    pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
    logits, cache = decoder.apply({"params": params}, ids[:, :4], pos, cache=cache)
    steps = [np.asarray(logits)]
    for t in range(4, ids.shape[1]):
        pos = jnp.full((2, 1), t)
        logits, cache = decoder.apply({"params": params}, ids[:, t : t + 1], pos, cache=cache)
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_sampling_distribution_top_k_and_top_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.tile(jnp.log(jnp.asarray(probs))[None], (20000, 1))
    key = jax.random.PRNGKey(0)

    def freq(**kw):
        draws = np.asarray(sampling.sample_logits(logits, key, **kw))
        return np.bincount(draws, minlength=4) / len(draws)

    np.testing.assert_allclose(freq(temperature=1.0), probs, atol=0.015)
    # Temperature 0.5 squares the probabilities (renormalised).
    np.testing.assert_allclose(freq(temperature=0.5), probs**2 / (probs**2).sum(), atol=0.015)
    # top_k=2 keeps tokens 0 and 1 in ratio 5:3; top_p=0.7 keeps the same two (0.5 < 0.7).
    np.testing.assert_allclose(freq(temperature=1.0, top_k=2), [0.625, 0.375, 0, 0], atol=0.015)
    np.testing.assert_allclose(freq(temperature=1.0, top_p=0.7), [0.625, 0.375, 0, 0], atol=0.015)
    # top_p=0.85 also keeps token 2 (the mass before it, 0.8, is below 0.85).
    np.testing.assert_allclose(
        freq(temperature=1.0, top_p=0.85), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.015
    )
    assert freq(temperature=1.0, top_p=0.01)[0] == 1.0 and freq(temperature=0.0)[0] == 1.0


def test_stop_tokens_limits_and_seeds():
    config, params = hf.load_pretrained(str(FIXTURES / "llama"))
    expected = np.load(FIXTURES / "llama" / "expected.npz")
    ids = expected["input_ids"]
    greedy = expected["greedy_0"].tolist()
    prompts = [ids[0, :5].tolist(), ids[1, :8].tolist()]
    # Stopping at the third greedy token of row 0 ends that row there (token included);
    # row 1 runs on to the limit.
    out = sampling.generate(config, params, prompts, max_new_tokens=7, stop_ids=[greedy[2]])
    assert out[0] == greedy[:3] and len(out[1]) == 7
    assert sampling.generate(config, params, prompts[:1], max_new_tokens=3) == [greedy[:3]]
    a = sampling.generate(config, params, prompts, max_new_tokens=8, temperature=1.0, seed=1)
    b = sampling.generate(config, params, prompts, max_new_tokens=8, temperature=1.0, seed=1)
    c = sampling.generate(config, params, prompts, max_new_tokens=8, temperature=1.0, seed=2)
    assert a == b and a != c
    with pytest.raises(ValueError, match="top_p=0"):
        sampling.generate(config, params, prompts, top_p=0.0)
    with pytest.raises(ValueError, match="no empty prompt"):
        sampling.generate(config, params, [[]])
    with pytest.raises(ValueError, match="token ids must be in"):
        sampling.generate(config, params, [[config.vocab_size]])


def test_top_k_above_the_vocabulary_is_no_limit():
    logits = jnp.zeros((3, 5))
    out = sampling.sample_logits(logits, jax.random.PRNGKey(0), temperature=1.0, top_k=50)
    assert out.shape == (3,) and int(out.max()) < 5
