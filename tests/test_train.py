"""The shared loop: gradient accumulation, sharded = unsharded, learning, non-finite stop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import smoke_config

from jaxpost import model as model_lib
from jaxpost import objectives, optim, sharding
from jaxpost import step as step_lib
from jaxpost import train as train_lib
from jaxpost.data import pipeline
from jaxpost.data.tokenizer import ByteTokenizer


def _examples(n=32, seq_len=32):
    examples, _ = pipeline.load_sft_examples(
        "builtin:arithmetic", "train", ByteTokenizer(), seq_len=seq_len
    )
    return examples[:n]


def _batch(examples, accum, seq_len=32):
    rows = [pipeline.to_row(ex, seq_len) for ex in examples]
    stacked = {k: np.stack([r[k] for r in rows]) for k in pipeline.SFT_KEYS}
    return {k: v.reshape(accum, -1, seq_len) for k, v in stacked.items()}


# Adam's first update is lr * g / (|g| + eps): with the default tiny eps it is ~lr * sign(g), which
# flips on float-rounding noise where g ~ 0. A large eps makes the update ~ lr * g, so comparing
# parameters after a step compares the gradients themselves.
SMOOTH_ADAM = {"optim.warmup_steps": 0, "optim.eps": 1.0, "optim.lr": 1.0}


def _one_step(mesh_config, devices, batch_np, config):
    model_config = model_lib.Config(**config.model)
    model = model_lib.Decoder(model_config)
    mesh = sharding.make_mesh(mesh_config, devices)
    tx = optim.make_optimizer(config.optim, 10)
    schedule = optim.make_schedule(config.optim, 10)
    objective = objectives.make_objective(config.objective, model)
    import flax.linen as nn

    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state, shardings = step_lib.create_state(model, tx, mesh, seed=0, seq_len=32)
        step = step_lib.make_train_step(
            objective, tx, schedule, state_shardings=shardings, mesh=mesh
        )
        state, metrics = step(state, sharding.to_global(batch_np, mesh), None)
    return jax.device_get(state.params), jax.device_get(metrics), shardings


def test_gradient_accumulation_equals_the_large_batch():
    config = smoke_config(**SMOOTH_ADAM)
    examples = _examples(16)
    devices = jax.devices()[:1]
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    p1, m1, _ = _one_step(one, devices, _batch(examples, 1), config)
    p4, m4, _ = _one_step(one, devices, _batch(examples, 4), config)
    # Micro-batches differ in target-token counts, so a mean of per-micro-batch means would differ.
    counts = _batch(examples, 4)["loss_mask"].sum(axis=(1, 2))
    assert len(set(counts.tolist())) > 1
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "mesh_config",
    [
        {"data": 2, "fsdp": 4, "tensor": 1},
        {"data": 2, "fsdp": 1, "tensor": 4},
        {"data": 2, "fsdp": 2, "tensor": 2},
    ],
)
def test_sharded_step_equals_single_device_step(mesh_config):
    config = smoke_config(**SMOOTH_ADAM)
    batch = _batch(_examples(16), 2)
    p1, m1, _ = _one_step({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1], batch, config)
    p8, m8, shardings = _one_step(mesh_config, jax.devices(), batch, config)
    # The parameters really are split over the mesh.
    q = shardings.params["layers"]["attn"]["q"]["kernel"].spec
    if mesh_config["fsdp"] > 1:
        assert "fsdp" in str(q)
    if mesh_config["tensor"] > 1:
        assert "tensor" in str(q)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_loss_falls_on_the_smoke_config(tmp_path):
    summary = train_lib.train(smoke_config(), str(tmp_path))
    before, after = summary["eval_before"]["loss"], summary["eval_after"]["loss"]
    assert after < 0.7 * before, (before, after)
    assert summary["eval_after"]["accuracy"] > summary["eval_before"]["accuracy"]


def test_non_finite_loss_stops_with_a_clear_message(tmp_path):
    # lr=1e30: step 1 (from the initial params) is finite and checkpointed; its update blows the
    # params up, so step 2's loss is not finite. The run must stop there and never save step 2.
    config = smoke_config(
        **{
            "optim.lr": 1e30,
            "optim.warmup_steps": 0,
            "optim.clip_grad_norm": 0.0,
            "train.num_steps": 6,
            "checkpoint.every_steps": 1,
        }
    )
    with pytest.raises(train_lib.NonFiniteLossError, match="Non-finite loss at step 2"):
        train_lib.train(config, str(tmp_path))
    from jaxpost import checkpoint

    params = checkpoint.load_params(str(tmp_path))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    with pytest.raises(FileNotFoundError, match="no step 2"):
        checkpoint.load_params(str(tmp_path), step=2)


def test_learning_rate_schedule_warmup_and_cosine():
    config = smoke_config()
    optim_cfg = dict(config.optim, lr=1.0, warmup_steps=10, final_lr_fraction=0.1)
    sched = optim.make_schedule(optim_cfg, 110)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(0.5)
    assert float(sched(10)) == pytest.approx(1.0)
    assert float(sched(60)) == pytest.approx(0.55, abs=1e-6)  # cosine midpoint
    assert float(sched(110)) == pytest.approx(0.1, abs=1e-6)
    lin = optim.make_schedule(dict(optim_cfg, decay="linear"), 110)
    assert float(lin(60)) == pytest.approx(0.55, abs=1e-6)


def test_weight_decay_skips_norms_and_biases():
    params = {
        "embedding": jnp.ones((3, 2)),
        "layers": {
            "attn_norm": {"scale": jnp.ones((2, 2))},
            "q": {"kernel": jnp.ones((2, 2, 2)), "bias": jnp.ones((2, 2))},
        },
    }
    mask = optim._decay_mask(params)
    assert mask["embedding"] and mask["layers"]["q"]["kernel"]
    assert not mask["layers"]["attn_norm"]["scale"] and not mask["layers"]["q"]["bias"]


def test_the_loop_knows_no_objective_by_name():
    """train.py stays one readable room: no objective names (the objective's record and hooks
    carry what differs) and about 300 lines."""
    import re

    from conftest import REPO

    source = (REPO / "jaxpost" / "train.py").read_text()
    assert not re.findall(r'"(sft|rm|dpo|simpo|orpo)"', source)
    assert len(source.splitlines()) <= 300


def test_sorting_losses_warn_that_accumulation_is_not_one_large_batch(caplog):
    from conftest import REPO

    from jaxpost import config as config_lib
    from jaxpost import plan as plan_lib

    config = config_lib.load_config(f"{REPO}/configs/dpo.py:smoke")
    config_lib.apply_overrides(config, ["objective.loss_type=aot", "train.accum_steps=2"])
    with caplog.at_level("WARNING", logger="jaxpost"):
        plan = plan_lib.make_plan(config)
    assert not plan.objective.accumulation_exact
    assert "not the same as one step on the whole batch" in caplog.text
    caplog.clear()
    config_lib.apply_overrides(config, ["objective.loss_type=sigmoid"])
    with caplog.at_level("WARNING", logger="jaxpost"):
        assert plan_lib.make_plan(config).objective.accumulation_exact
    assert "not the same" not in caplog.text


def test_an_evaluation_plan_needs_no_train_batch_layout():
    from jaxpost import plan as plan_lib

    config = smoke_config(**{"train.global_batch": 12})  # 8 devices do not divide 12
    assert plan_lib.make_plan(config, training=False).layout is None
    with pytest.raises(ValueError, match="not divisible by the data-parallel size"):
        plan_lib.make_plan(config)
    with pytest.raises(ValueError, match="eval.batch_size=12 is not divisible"):
        plan_lib.make_plan(smoke_config(**{"eval.batch_size": 12}), training=False)


def test_auto_dtype_is_float32_on_cpu_with_float32_master_weights():
    config = smoke_config()
    assert config.model.dtype == "auto" and config.model.param_dtype == "float32"
    assert model_lib.Config(**config.model).dtype == "float32"  # this test runs on CPU
    from jaxpost import plan as plan_lib

    # What config.json records (checked in test_objectives' reward-model run).
    assert plan_lib.make_plan(config).config.model.dtype == "float32"
