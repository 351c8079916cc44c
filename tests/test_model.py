"""The decoder: causality, segment isolation, rotary convention, logical axes on every param."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import model as model_lib
from jaxpost import sharding


@pytest.fixture(scope="module")
def setup():
    cfg = model_lib.preset("smoke")
    model = model_lib.Decoder(cfg)
    boxed = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return cfg, model, boxed, sharding.strip_boxes(boxed)


def test_every_parameter_has_logical_axis_names(setup):
    _, _, boxed, params = setup
    specs = nn.get_partition_spec(boxed)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_params = jax.tree.leaves(params)
    assert len(flat_specs) == len(flat_params)
    for spec, p in zip(flat_specs, flat_params, strict=True):
        assert len(spec) == p.ndim and all(name is not None for name in spec)


def test_parameter_shapes_map_onto_hugging_face_llama(setup):
    cfg, _, _, params = setup
    n, D, H, K, Dh, F = (
        cfg.n_layers,
        cfg.d_model,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.mlp_dim,
    )
    layers = params["layers"]
    assert params["embedding"].shape == (cfg.vocab_size, D)
    assert params["lm_head"].shape == (D, cfg.vocab_size)
    assert layers["attn"]["q"]["kernel"].shape == (n, D, H, Dh)
    assert layers["attn"]["k"]["kernel"].shape == (n, D, K, Dh)
    assert layers["attn"]["o"]["kernel"].shape == (n, H, Dh, D)
    assert layers["mlp"]["gate"]["kernel"].shape == (n, D, F)
    assert layers["mlp"]["down"]["kernel"].shape == (n, F, D)
    assert layers["attn_norm"]["scale"].shape == (n, D)


def test_causality_through_gradients(setup):
    """d logits[t] / d input-embedding[s] is exactly zero for s > t, and nonzero for s <= t."""
    cfg, model, _, params = setup
    L = 6
    tokens = jnp.arange(1, L + 1)[None]
    emb = params["embedding"]

    def logits_at(t, delta):
        # Perturb the embedding rows of the sequence's tokens through a per-position offset.
        p = dict(params)
        onehot = jax.nn.one_hot(tokens[0], cfg.vocab_size)  # [L, V]
        p["embedding"] = emb + (onehot.T @ delta)  # each token id is distinct
        return model.apply({"params": p}, tokens)[0, t].sum()

    for t in range(L):
        g = jax.grad(logits_at, argnums=1)(t, jnp.zeros((L, cfg.d_model)))
        norms = np.linalg.norm(np.asarray(g), axis=-1)
        assert (norms[t + 1 :] == 0).all(), (t, norms)
        assert (norms[: t + 1] > 0).all(), (t, norms)


def test_packed_segments_never_attend_across_documents(setup):
    """Two documents packed in one row give the same logits as each alone."""
    _, model, _, params = setup
    a, b = jnp.array([5, 9, 13, 17]), jnp.array([3, 8, 21])
    packed = jnp.concatenate([a, b])[None]
    segments = jnp.array([[1, 1, 1, 1, 2, 2, 2]])
    positions = jnp.array([[0, 1, 2, 3, 0, 1, 2]])
    out = model.apply({"params": params}, packed, positions, segments)
    alone_a = model.apply({"params": params}, a[None])
    alone_b = model.apply({"params": params}, b[None])
    np.testing.assert_allclose(out[0, :4], alone_a[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[0, 4:], alone_b[0], rtol=1e-5, atol=1e-5)


def test_rotary_embedding_matches_transformers_rotate_half():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 3, 2, 8)).astype(np.float32)
    pos = np.array([[0, 4, 7]])
    config = model_lib.Config(
        vocab_size=8, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8, mlp_dim=8
    )
    cos, sin = model_lib.rope_tables(jnp.asarray(pos), config)
    got = np.asarray(model_lib.apply_rope(jnp.asarray(x), cos, sin))
    # transformers: inv_freq = 1/theta^(arange(0,d,2)/d); emb = cat(freqs, freqs);
    # q*cos + rotate_half(q)*sin with rotate_half(x) = cat(-x2, x1).
    inv = 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8)
    freqs = pos[..., None] * inv
    emb = np.concatenate([freqs, freqs], -1)[:, :, None, :]
    rot = np.concatenate([-x[..., 4:], x[..., :4]], -1)
    np.testing.assert_allclose(got, x * np.cos(emb) + rot * np.sin(emb), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_does_not_change_values_or_gradients(setup, remat):
    cfg, model, _, params = setup
    remat_model = model_lib.Decoder(dataclasses.replace(cfg, remat=remat))
    tokens = jnp.array([[1, 2, 3, 4, 5]])

    def loss(m, p):
        return m.apply({"params": p}, tokens).astype(jnp.float32).mean()

    np.testing.assert_allclose(loss(remat_model, params), loss(model, params), rtol=1e-6)
    g1, g2 = jax.grad(loss, 1)(model, params), jax.grad(loss, 1)(remat_model, params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)


def test_tied_embeddings_and_qkv_bias_variants():
    cfg = model_lib.preset("smoke", tie_embeddings=True, qkv_bias=True)
    m = model_lib.Decoder(cfg)
    params = sharding.strip_boxes(m.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    params = params["params"]
    assert "lm_head" not in params
    assert params["layers"]["attn"]["q"]["bias"].shape == (cfg.n_layers, cfg.n_heads, cfg.head_dim)
    hidden = m.apply({"params": params}, jnp.array([[1, 2]]), return_hidden=True)
    logits = m.apply({"params": params}, jnp.array([[1, 2]]))
    np.testing.assert_allclose(
        logits, hidden @ model_lib.unembedding(params, cfg), rtol=1e-5, atol=1e-6
    )


def test_invalid_config_is_reported():
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide n_heads=4"):
        model_lib.preset("smoke", n_kv_heads=3)
    with pytest.raises(ValueError, match="Unknown model preset"):
        model_lib.preset("nope")


def test_bench_presets_match_the_issue():
    t = model_lib.preset("bench-tiny")
    assert (t.vocab_size, t.d_model, t.mlp_dim, t.n_layers, t.n_heads, t.n_kv_heads) == (
        8192,
        256,
        688,
        4,
        4,
        4,
    )
    s = model_lib.preset("bench-small")
    assert (s.d_model, s.mlp_dim, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim) == (
        512,
        1408,
        8,
        8,
        8,
        64,
    )
    assert not s.tie_embeddings and s.rms_eps == 1e-6 and s.rope_theta == 10000.0


def test_flops_per_token_by_hand():
    cfg = model_lib.preset("bench-tiny")
    # per layer: attention 256*64*(2*4 + 2*4) = 262,144; MLP 3*256*688 = 528,384
    # matmul params: 4 * 790,528 + 256*8192 (head) = 5,259,264; x6 = 31,555,584
    # attention scores/values: 12 * 4 layers * 4 heads * 64 * 256 = 3,145,728
    assert model_lib.flops_per_token(cfg, 256) == 31_555_584 + 3_145_728
    assert model_lib.flops_per_token(cfg, 256, lm_head=False) == (
        6 * (4 * 790_528 + 256) + 3_145_728
    )


def test_llama3_rope_scaling_matches_the_published_formula():
    """Llama 3.1's frequency scaling, re-derived in numpy from the reference implementation's
    description: wavelengths above original/low_freq are divided by factor, below
    original/high_freq kept, and interpolated in between."""
    config = model_lib.Config(
        vocab_size=8,
        d_model=64,
        n_layers=1,
        n_heads=1,
        n_kv_heads=1,
        head_dim=64,
        mlp_dim=8,
        rope_theta=500000.0,
        rope_scaling="llama3",
        rope_factor=32.0,
        rope_low_freq_factor=1.0,
        rope_high_freq_factor=4.0,
        rope_original_max_position=8192,
    )
    inv = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
    want = []
    for f in inv:
        wavelen = 2 * np.pi / f
        if wavelen < 8192 / 4.0:
            want.append(f)
        elif wavelen > 8192 / 1.0:
            want.append(f / 32.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            want.append((1 - smooth) * f / 32.0 + smooth * f)
    got = np.asarray(model_lib.rope_frequencies(config))
    np.testing.assert_allclose(got, np.array(want), rtol=1e-5)
    assert (got < inv).any() and (got == inv.astype(np.float32)).any()  # both regimes occur
    linear = dataclasses.replace(config, rope_scaling="linear", rope_factor=4.0)
    np.testing.assert_allclose(model_lib.rope_frequencies(linear), inv / 4.0, rtol=1e-5)


def test_sliding_window_mask():
    seg = jnp.ones((1, 5), jnp.int32)
    mask = np.asarray(model_lib.attention_mask(seg, sliding_window=2))[0, 0]
    want = np.array([[abs(q - k) < 2 and k <= q for k in range(5)] for q in range(5)])
    np.testing.assert_array_equal(mask, want)
    np.testing.assert_array_equal(
        np.asarray(model_lib.attention_mask(seg))[0, 0], np.tril(np.ones((5, 5), bool))
    )


def test_attention_kernel_choice():
    base = model_lib.preset("smoke", dtype="bfloat16")
    # auto: cudnn only on a GPU, blockwise on CPU
    assert model_lib.attention_kernel(base) == "blockwise"
    assert model_lib.attention_kernel(dataclasses.replace(base, attention="xla")) == "xla"
    assert model_lib.attention_kernel(dataclasses.replace(base, attention="cudnn")) == "cudnn"
    with pytest.raises(ValueError, match="attention='flash' is not one of"):
        dataclasses.replace(base, attention="flash")


def test_logits_and_rewards_accumulate_in_float32_under_bf16_compute():
    """The output projection and the reward head run with float32 accumulation and output, so
    bf16 compute never rounds logits before the log-softmax (or rewards): the values equal the
    float32 product of the bf16 hidden states and weights, not its bf16 rounding."""
    config = model_lib.preset("smoke", dtype="bfloat16")
    decoder = model_lib.Decoder(config)
    params = model_lib.init_params(config, seed=0)
    params = jax.tree.map(lambda x: x * 8.0, params)  # logits of a trained model's scale
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, config.vocab_size)
    hidden = decoder.apply({"params": params}, ids, return_hidden=True)
    assert hidden.dtype == jnp.bfloat16
    h32 = np.asarray(hidden, np.float32)
    w32 = np.asarray(params["lm_head"].astype(jnp.bfloat16), np.float32)
    want = h32 @ w32  # exact bf16 products, float32 sums
    scale = np.abs(want).max()
    assert scale > 1.0
    rounded = want.astype(jnp.bfloat16).astype(np.float32)
    assert np.abs(rounded - want).max() > 1e-3 * scale  # what bf16 logits would be off by

    logits = decoder.apply({"params": params}, ids)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), want, rtol=0, atol=1e-5 * scale)

    # The chunked path (hidden states, then the projection in position chunks) as well.
    from jaxpost import losses

    targets = jnp.roll(ids, -1, axis=1)
    chunked = losses.chunked_token_logps(
        hidden, params["lm_head"].astype(jnp.bfloat16), targets, chunk_size=5
    )
    want_logps = np.asarray(losses.token_logps(jnp.asarray(want), targets))
    np.testing.assert_allclose(np.asarray(chunked), want_logps, rtol=0, atol=1e-5 * scale)

    # The reward head.
    rm = model_lib.RewardModel(config)
    rm_params = sharding.strip_boxes(rm.init(jax.random.PRNGKey(2), ids))["params"]
    rm_params["score"] = rm_params["score"] * 50.0
    rewards = rm.apply({"params": rm_params}, ids)
    rm_hidden = model_lib.Decoder(config).apply(
        {"params": rm_params["decoder"]}, ids, return_hidden=True
    )
    want_r = np.asarray(rm_hidden, np.float32) @ np.asarray(
        rm_params["score"].astype(jnp.bfloat16), np.float32
    )
    r_scale = np.abs(want_r).max()
    assert np.abs(want_r.astype(jnp.bfloat16).astype(np.float32) - want_r).max() > 1e-3 * r_scale
    np.testing.assert_allclose(np.asarray(rewards), want_r, rtol=0, atol=1e-5 * r_scale)
