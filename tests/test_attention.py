"""Splash attention (Pallas, interpret mode on CPU) against the XLA path: values and gradients."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import attention, matmul, memory, sharding
from jaxpost import config as config_lib
from jaxpost import model as model_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
B, H, DH = 2, 4, 64


def _segments(L: int, packed: bool) -> np.ndarray:
    """`[B, L]` segment ids: one document per row, or 3 documents and padding (id 0)."""
    if not packed:
        return np.ones((B, L), np.int32)
    bounds = [(0, 70, 150, L - 30), (0, 40, 180, L - 5)]  # row 1 ends in a short document
    seg = np.zeros((B, L), np.int32)
    for row, (a, b, c, d) in enumerate(bounds):
        seg[row, a:b], seg[row, b:c], seg[row, c:d] = 1, 2, 3
    return seg


def _inputs(L: int, K: int, seed: int = 0, batch: int = B):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (batch, L, H, DH), jnp.float32)
    k = jax.random.normal(keys[1], (batch, L, K, DH), jnp.float32)
    v = jax.random.normal(keys[2], (batch, L, K, DH), jnp.float32)
    cotangent = jax.random.normal(keys[3], (batch, L, H, DH), jnp.float32)
    return q, k, v, cotangent


def _xla(q, k, v, seg, window):
    mask = model_lib.attention_mask(seg, window)
    return jax.nn.dot_product_attention(q, k, v, mask=mask)


def _splash(q, k, v, seg, window):
    return attention.splash_attention(q, k, v, seg, sliding_window=window)


def _value_and_grads(fn, q, k, v, cotangent, seg, window):
    """Output and d<out, cotangent>/d(q, k, v)."""

    def loss(q, k, v):
        out = fn(q, k, v, seg, window)
        return jnp.sum(out * cotangent), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _assert_close(got, want):
    # float32 round-off: both sum softmax-weighted values over <= 256 keys of O(1) numbers, in
    # different orders (blockwise online softmax vs one softmax); 1e-5 relative to the largest.
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = float(np.max(np.abs(w)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-5 * scale)


CASES = {
    # name: (L, K, packed, sliding_window)
    "causal": (256, H, False, 0),
    "packed_3_segments_and_padding": (256, H, True, 0),
    "gqa_packed": (256, 2, True, 0),
    "sliding_window_gqa_packed": (256, 2, True, 50),
    "length_not_a_block_multiple": (200, 2, True, 0),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_splash_equals_xla_values_and_gradients(name):
    L, K, packed, window = CASES[name]
    q, k, v, cotangent = _inputs(L, K)
    seg = jnp.asarray(_segments(L, packed))
    want = _value_and_grads(_xla, q, k, v, cotangent, seg, window)
    with attention.interpret():
        got = _value_and_grads(_splash, q, k, v, cotangent, seg, window)
    _assert_close(got, want)


@pytest.mark.parametrize("shape", [(2, 2, 2), (2, 1, 4)])
def test_splash_on_a_mesh_equals_xla(shape):
    """Under a (data, fsdp, tensor) mesh the kernel runs per device in shard_map: rows over
    data x fsdp (4 rows on 2 x 2; 4 rows over data only when fsdp=1), heads over tensor (4 query
    heads, 2 kv heads: tensor=4 gives each query head its own kv copy)."""
    L, K = 256, 2
    mesh = sharding.make_mesh(dict(zip(sharding.AXES, shape, strict=True)))
    q, k, v, cotangent = _inputs(L, K, seed=1, batch=4)
    seg = jnp.asarray(np.concatenate([_segments(L, True)] * 2))
    want = _value_and_grads(_xla, q, k, v, cotangent, seg, 0)
    with attention.interpret(), jax.set_mesh(mesh):
        got = _value_and_grads(_splash, q, k, v, cotangent, seg, 0)
    _assert_close(got, want)


def test_decoder_with_splash_equals_xla():
    """The model path: segment ids reach the kernel through the scanned layers, no mask built."""
    cfg = model_lib.preset("smoke", head_dim=64, attention="xla", sliding_window=40)
    params = model_lib.init_params(cfg)
    L = 128
    tokens = jax.random.randint(jax.random.PRNGKey(2), (B, L), 0, cfg.vocab_size)
    seg = jnp.asarray(_segments(256, True)[:, :L])
    positions = jnp.asarray(np.concatenate([np.arange(70), np.arange(58)])[None].repeat(B, 0))
    want = model_lib.forward_logits(cfg, params, tokens, positions, seg)
    with attention.interpret():
        splash_cfg = dataclasses.replace(cfg, attention="splash")
        got = model_lib.forward_logits(splash_cfg, params, tokens, positions, seg)
    _assert_close(got, want)


def test_kernel_choice():
    cfg = model_lib.preset("smoke", dtype="bfloat16")
    assert model_lib.attention_kernel(cfg) == "blockwise"  # auto on CPU
    splash_cfg = dataclasses.replace(cfg, attention="splash")
    with pytest.raises(ValueError, match="attention='splash' is a TPU kernel.*'cpu'"):
        model_lib.attention_kernel(splash_cfg)
    with pytest.raises(ValueError, match="attention='splash' is a TPU kernel"):
        model_lib.forward_logits(splash_cfg, model_lib.init_params(cfg), jnp.ones((1, 4), int))
    with attention.interpret():
        assert model_lib.attention_kernel(splash_cfg) == "splash"
    model_lib.init_params(splash_cfg)  # init needs only shapes: the xla path, on any backend
    tpu = jax.sharding.AbstractDevice(device_kind="TPU v5", num_cores=1, platform="tpu")
    tpu_mesh = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=tpu)
    with jax.sharding.use_abstract_mesh(tpu_mesh):
        assert model_lib.attention_kernel(cfg) == "splash"  # auto, compiling for a TPU
        assert model_lib.attention_kernel(splash_cfg) == "splash"
        assert model_lib.attention_kernel(dataclasses.replace(cfg, attention="xla")) == "xla"
        assert not matmul.enabled()  # the CPU projections only when compiling for CPU
    gpu = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="gpu")
    gpu_mesh = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=gpu)
    with jax.sharding.use_abstract_mesh(gpu_mesh):
        assert model_lib.attention_kernel(cfg) == "cudnn"  # auto, bf16 on a GPU
        f32 = dataclasses.replace(cfg, dtype="float32")
        assert model_lib.attention_kernel(f32) == "xla"
        assert not matmul.enabled()
    assert matmul.enabled()


# --- compiled for a TPU slice on this machine (needs libtpu: pip install 'jaxpost[tpu-aot]') ---


def test_smoke_step_with_auto_attention_compiles_splash_for_a_tpu_slice():
    pytest.importorskip("libtpu")
    config = config_lib.load_config(str(REPO / "configs/sft.py:smoke"))
    overrides = ["mesh.data=1", "mesh.fsdp=-1", "model.head_dim=64", "data.seq_len=512"]
    config_lib.apply_overrides(config, overrides)
    setup = memory.make_setup(config, memory.parse_target("v5p-8"))
    assert setup.config.model.attention == "auto"
    compiled, report = memory.compile_step(setup)
    assert report.fits
    hlo = compiled.as_text()
    assert "splash" in hlo and "tpu_custom_call" in hlo
