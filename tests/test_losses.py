"""The loss library against hand-computed values (float64) and its own invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import losses


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _np_logsoftmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def test_token_logps_matches_hand_computed_values():
    # Vocabulary of 3, logits [0, ln 2, ln 3] -> probabilities 1/6, 2/6, 3/6.
    logits = np.log(np.array([[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]]))
    targets = np.array([[2, 1]])
    got = losses.token_logps(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(np.asarray(got), [[np.log(3 / 6), np.log(2 / 6)]], rtol=1e-12)
    assert got.dtype == jnp.float64


def test_sequence_logps_and_sft_loss_are_token_means_over_the_batch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 4, 5))
    targets = rng.integers(0, 5, size=(2, 4))
    mask = np.array([[1, 1, 1, 0], [0, 0, 1, 0]])
    lp = np.take_along_axis(_np_logsoftmax(logits), targets[..., None], -1)[..., 0]
    seq = np.asarray(losses.sequence_logps(logits, targets, mask))
    np.testing.assert_allclose(seq, (lp * mask).sum(-1), rtol=1e-12)
    loss = float(losses.sft_loss(logits, targets, mask))
    # A token mean (4 tokens), not the mean of per-sequence means.
    np.testing.assert_allclose(loss, -(lp * mask).sum() / 4, rtol=1e-12)
    mean_of_means = -np.mean([(lp[0] * mask[0]).sum() / 3, (lp[1] * mask[1]).sum() / 1])
    assert abs(loss - mean_of_means) > 1e-3


def test_masked_positions_contribute_nothing_even_if_not_finite():
    logits = jnp.array([[[0.0, 0.0], [jnp.nan, jnp.inf]]])
    targets = jnp.array([[0, 1]])
    mask = jnp.array([[1, 0]])
    assert float(losses.sft_loss(logits, targets, mask)) == pytest.approx(np.log(2), rel=1e-12)
    grad = jax.grad(lambda x: losses.sft_loss(x, targets, mask))(logits)
    assert np.isfinite(np.asarray(grad)[0, 0]).all()


def test_empty_mask_gives_zero_not_nan():
    logits = jnp.zeros((1, 3, 4))
    assert float(losses.sft_loss(logits, jnp.zeros((1, 3), int), jnp.zeros((1, 3)))) == 0.0


def test_half_precision_large_logits_do_not_overflow():
    logits = jnp.array([[[60000.0, -60000.0, 0.0]]], dtype=jnp.float16)
    lp = losses.token_logps(logits, jnp.array([[0]]))
    assert lp.dtype == jnp.float32 and float(lp[0, 0]) == 0.0
    logits = jnp.array([[[1e30, 0.0]]], dtype=jnp.bfloat16)
    assert np.isfinite(float(losses.token_logps(logits, jnp.array([[1]]))[0, 0]))


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_chunked_token_logps_equals_full_logits(chunk):
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 7, 4)))
    unembed = jnp.asarray(rng.normal(size=(4, 11)))
    targets = jnp.asarray(rng.integers(0, 11, size=(2, 7)))
    full = losses.token_logps(hidden @ unembed, targets)
    chunked = losses.chunked_token_logps(hidden, unembed, targets, chunk_size=chunk)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), rtol=1e-12)

    g_full = jax.grad(lambda h, w: losses.token_logps(h @ w, targets).sum(), (0, 1))(
        hidden, unembed
    )
    g_chunk = jax.grad(
        lambda h, w: losses.chunked_token_logps(h, w, targets, chunk_size=chunk).sum(), (0, 1)
    )(hidden, unembed)
    for a, b in zip(g_full, g_chunk, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_the_head_at_target_positions_only_equals_the_full_logits_there(chunk):
    """`masked_chunked_token_stats` computes logits only at masked (target) positions: the same
    log-probs, argmax and mean logits there (0 elsewhere), and the same gradients through a loss
    that reads only those positions -- rows with no targets and with only targets included, and
    sharded over a mesh (batch over `data`, the vocabulary over `tensor`)."""
    rng = np.random.default_rng(2)
    B, L, D, V = 4, 9, 5, 12
    hidden = jnp.asarray(rng.normal(size=(B, L, D)))
    unembed = jnp.asarray(rng.normal(size=(D, V)))
    targets = jnp.asarray(rng.integers(0, V, size=(B, L)))
    mask = rng.random((B, L)) < 0.4
    mask[1] = False  # a row without targets
    mask[2] = True  # a row of targets only
    mask = jnp.asarray(mask)
    w_lp, w_mean = (jnp.asarray(rng.normal(size=(B, L))) for _ in range(2))

    def loss(stats):
        lp, _, mean = stats
        return jnp.sum(jnp.where(mask, w_lp * lp + w_mean * mean, 0.0))

    want = losses.token_stats(hidden @ unembed, targets)
    got = losses.masked_chunked_token_stats(hidden, unembed, targets, mask, chunk)
    m = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(got[0])[m], np.asarray(want[0])[m], rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(got[1])[m], np.asarray(want[1])[m])
    np.testing.assert_allclose(np.asarray(got[2])[m], np.asarray(want[2])[m], rtol=1e-12)
    assert not np.asarray(got[0])[~m].any() and not np.asarray(got[1])[~m].any()

    g_want = jax.grad(lambda h, w: loss(losses.token_stats(h @ w, targets)), (0, 1))(
        hidden, unembed
    )
    masked = jax.jit(
        jax.grad(
            lambda h, w: loss(losses.masked_chunked_token_stats(h, w, targets, mask, chunk)),
            (0, 1),
        )
    )
    for a, b in zip(g_want, masked(hidden, unembed), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-10, atol=1e-12)

    auto = (jax.sharding.AxisType.Auto,) * 2  # as jaxpost's meshes
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=auto)
    spec = jax.sharding.NamedSharding
    P = jax.sharding.PartitionSpec
    sharded = masked(
        jax.device_put(hidden, spec(mesh, P("data"))),
        jax.device_put(unembed, spec(mesh, P(None, "tensor"))),
    )
    for a, b in zip(g_want, sharded, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-10, atol=1e-12)
