"""The CPU kernels: blockwise attention and the projections that save x^T, against the plain
formulations (`jax.nn.dot_product_attention`, `dot_general`), values and gradients."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import blockwise, matmul
from jaxpost import model as model_lib


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _rel(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / np.abs(want).max()


def test_num_blocks():
    assert [blockwise.num_blocks(n) for n in (256, 96, 64, 40, 7, 2048)] == [8, 2, 2, 1, 1, 8]


@pytest.mark.parametrize(
    "L,H,K,window,branches",
    [
        (256, 4, 2, 0, False),  # 8 blocks, grouped-query heads
        (96, 4, 4, 0, True),  # 2 blocks, shared-prompt branches
        (128, 4, 1, 16, False),  # 4 blocks, sliding window
        (40, 2, 2, 0, False),  # one block
    ],
)
def test_blockwise_attention_equals_dot_product_attention(x64, L, H, K, window, branches):
    rng = np.random.default_rng(L)
    B, D = 2, 16
    q, dout = (jnp.asarray(rng.standard_normal((B, L, H, D))) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((B, L, K, D))) for _ in range(2))
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (B, L)), axis=-1), jnp.int32)  # 0: padding
    branch_ids = positions = None
    if branches:  # prompt (0), then branches 1 and 2, positions continuing after the prompt
        branch_ids = jnp.asarray(np.repeat([[0, 1, 2]], B, 0).repeat(L // 3, 1), jnp.int32)
        third = np.arange(L // 3)
        positions = jnp.asarray(np.concatenate([third, third + L // 3, third + L // 3])[None])
    mask = model_lib.attention_mask(seg, window, branch_ids, positions)

    def loss(fn):
        return jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * dout), argnums=(0, 1, 2))

    # The reference in float64 throughout (jax.nn's own softmax runs in float32).
    def reference(q, k, v):
        G = H // K
        s = jnp.einsum("blkgd,bskd->bkgls", q.reshape(B, L, K, G, D), k) / np.sqrt(D)
        p = jax.nn.softmax(jnp.where(mask[:, :, None], s, -jnp.inf), axis=-1)
        return jnp.einsum("bkgls,bskd->blkgd", p, v).reshape(B, L, H, D)

    want_value, want_grads = loss(reference)(q, k, v)
    got_value, got_grads = jax.jit(loss(lambda *a: blockwise.attention(*a, mask)))(q, k, v)
    assert got_value.dtype == jnp.float64
    np.testing.assert_allclose(got_value, want_value, rtol=1e-12)
    for got, want in zip(got_grads, want_grads, strict=True):
        assert _rel(got, want) < 1e-12
    # and what the model's xla kernel computes, to its float32 softmax
    plain = jax.nn.dot_product_attention(q, k, v, mask=mask)
    assert _rel(blockwise.attention(q, k, v, mask), plain) < 1e-6


def test_blockwise_attention_bfloat16_close_to_float32():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 128, 4, 32)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, 128, 2, 32)), jnp.float32) for _ in range(2))
    mask = model_lib.attention_mask(jnp.ones((2, 128), jnp.int32))
    want = jax.nn.dot_product_attention(q, k, v, mask=mask)
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    got = blockwise.attention(*bf16, mask)
    assert got.dtype == jnp.bfloat16
    assert _rel(got, want) < 2e-2
    grads = jax.grad(lambda q: jnp.sum(blockwise.attention(q, *bf16[1:], mask)))(bf16[0])
    assert grads.dtype == jnp.bfloat16 and np.isfinite(np.asarray(grads, np.float32)).all()


def test_blockwise_attention_refuses_shapes_it_does_not_handle():
    q = jnp.zeros((1, 8, 2, 4))
    with pytest.raises(ValueError, match="k, v \\[B, L, K, D\\]"):
        blockwise.attention(q, jnp.zeros((1, 6, 2, 4)), jnp.zeros((1, 6, 2, 4)), None)
    with pytest.raises(ValueError, match="\\[B, 1, 8, 8\\] mask"):
        blockwise.attention(q, q, q, jnp.ones((1, 8, 8), bool))


def test_project_equals_dot(x64):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((12, 5)))
    ws = [jnp.asarray(rng.standard_normal((5, n))) for n in (3, 7)]
    cots = [jnp.asarray(rng.standard_normal((12, n))) for n in (3, 7)]

    def loss(fn):
        def total(x, ws):
            return sum(jnp.sum(y * c) for y, c in zip(fn(x, ws), cots, strict=True))

        return jax.value_and_grad(total, argnums=(0, 1))

    want = loss(lambda x, ws: [x @ w for w in ws])(x, ws)
    got = jax.jit(loss(matmul.project))(x, ws)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13)
    # bf16 inputs, float32 products (the LM head): gradients come back in the inputs' dtype
    xb, wb = x.astype(jnp.bfloat16), ws[0].astype(jnp.bfloat16)
    (y,) = matmul.project(xb, [wb], jnp.float32)
    assert y.dtype == jnp.float32
    gx, gw = jax.grad(lambda x, w: jnp.sum(matmul.project(x, [w], jnp.float32)[0]), (0, 1))(xb, wb)
    assert gx.dtype == gw.dtype == jnp.bfloat16


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_decoder_cpu_kernels_equal_the_plain_path(x64, monkeypatch, qkv_bias):
    """The whole decoder with blockwise attention and `matmul.project` (what CPU compiles) gives
    the logits and parameter gradients of the plain `dot_general` + xla-attention model."""
    cfg = model_lib.preset("smoke", dtype="float64", param_dtype="float64", qkv_bias=qkv_bias)
    params = model_lib.init_params(cfg, seed=3)
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 64), 0, cfg.vocab_size)
    seg = jnp.asarray(np.repeat([[1] * 40 + [2] * 20 + [0] * 4], 2, 0), jnp.int32)

    def grads(config):
        model = model_lib.Decoder(config)

        def loss(p):
            logits = model.apply({"params": p}, tokens, segment_ids_BL=seg)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 7] * (seg > 0)), logits

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (_, got_logits), got = grads(cfg)  # auto: blockwise on CPU, and matmul.project
    monkeypatch.setattr(matmul, "enabled", lambda: False)
    (_, want_logits), want = grads(dataclasses.replace(cfg, attention="xla"))
    assert _rel(got_logits, want_logits) < 1e-6  # jax.nn's float32 softmax on the xla side
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = dict(jax.tree_util.tree_leaves_with_path(want))[path]
        assert _rel(g, w) < 1e-5, jax.tree_util.keystr(path)
