"""Packing: several sequences (or pairs) per row give the same losses as one per row."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from jaxpost import config as config_lib
from jaxpost import evaluation, losses, objectives, sharding
from jaxpost import model as model_lib
from jaxpost import step as step_lib
from jaxpost import train as train_lib
from jaxpost.data import pipeline
from jaxpost.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _evaluate(name, packing, examples, params=None):
    config = config_lib.load_config(f"{REPO}/configs/{name}.py:smoke")
    if name == "dpo":
        config_lib.apply_overrides(
            config, ["objective.reference=frozen", "objective.loss_type=sigmoid,sft"]
        )
    segments = 6 if packing != "none" else 1
    objective = objectives.make_objective(
        config.objective, model_lib.Config(**config.model), segments_per_row=segments
    )
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    batches = pipeline.make_eval_batches(
        examples,
        seq_len=64,
        micro_batch=8,
        packing=packing,
        segments_per_row=segments,
        packing_bins=4,
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        boxed = jax.eval_shape(
            lambda r: objective.model.init(r, jnp.zeros((1, 8), jnp.int32))["params"],
            jax.random.PRNGKey(0),
        )
        shardings = sharding.logical_shardings(boxed, mesh)
        if params is None:
            params = jax.jit(
                lambda r: sharding.strip_boxes(
                    objective.model.init(r, jnp.zeros((1, 8), jnp.int32))["params"]
                ),
                out_shardings=shardings,
            )(jax.random.PRNGKey(3))
        frozen = None
        frozen_sh = None
        if objective.reference == "frozen":
            frozen = jax.tree.map(lambda x: x * 0.9, params)
            frozen_sh = shardings
        step = step_lib.make_eval_step(
            objective, params_shardings=shardings, mesh=mesh, frozen_shardings=frozen_sh
        )
        metrics = evaluation.evaluate(step, params, batches, frozen, mesh)
    rows = sum(
        int((b["segment_ids"].reshape(-1, b["segment_ids"].shape[-1]) > 0).any(-1).sum())
        for b in batches
    )
    return metrics, rows, params


@pytest.mark.parametrize(
    "name, kind, path",
    [
        ("sft", "sft", "builtin:sort"),
        ("rm", "pairs", "builtin:sort_prefs"),
        ("dpo", "pairs", "builtin:sort_prefs"),
    ],
)
@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
def test_packed_rows_give_the_same_metrics_as_unpacked(name, kind, path, packing):
    examples, _ = pipeline.load_examples(path, "eval", TOK, kind=kind, seq_len=64, max_examples=40)
    unpacked, rows_u, params = _evaluate(name, "none", examples)
    packed, rows_p, _ = _evaluate(name, packing, examples, params)
    assert rows_p < rows_u / 2  # several examples really share a row
    assert packed["num_tokens"] == unpacked["num_tokens"]
    for key, value in unpacked.items():
        # float32 sums over differently laid out rows: rounding-level differences only.
        assert packed[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_packed_reward_model_rows_give_the_same_metrics_as_unpacked(packing="first_fit"):
    """The rows a reward model trains on (whole sequences, no targets) pack like the others."""
    from jaxpost.objectives import rm

    config = config_lib.load_config(f"{REPO}/configs/rm.py:smoke")
    objective = objectives.make_objective(config.objective, model_lib.Config(**config.model))
    assert objective.data_kind == "reward_pairs"
    examples, _ = pipeline.load_examples(
        "builtin:sort_prefs", "eval", TOK, kind="reward_pairs", seq_len=64, max_examples=40
    )
    results = {}
    for how, segments in (("none", 1), (packing, 6)):
        batches = pipeline.make_eval_batches(
            examples,
            seq_len=64,
            micro_batch=48,
            packing=how,
            segments_per_row=segments,
            packing_bins=4,
            kind="reward_pairs",
        )
        assert len(batches) == 1 and "targets" not in batches[0]
        micro = jax.tree.map(lambda x: jnp.asarray(x[0]), batches[0])
        # Each sequence's last input token is its EOS, where its reward is read.
        seg = np.asarray(micro["segment_ids"])
        last = np.asarray(
            losses.segment_last(micro["inputs"].reshape(-1, 64), seg.reshape(-1, 64), segments)
        )
        assert set(last[seg.reshape(-1, 64).max(-1) > 0].ravel()) - {0} == {TOK.eos_id}
        params = sharding.strip_boxes(
            objective.model.init(jax.random.PRNGKey(3), jnp.zeros((1, 8), jnp.int32))
        )["params"]
        rc, rr, valid = rm.pair_rewards(params, micro, model=objective.model, segments=segments)
        results[how] = (np.asarray(rc)[np.asarray(valid)], np.asarray(rr)[np.asarray(valid)])
    # Packing reorders the pairs: compare them as sets of (chosen, rejected) rewards.
    (uc, ur), (pc, pr) = results["none"], results[packing]
    assert len(uc) == len(pc) == len(examples)
    u, p = np.lexsort((ur, uc)), np.lexsort((pr, pc))
    np.testing.assert_allclose(pc[p], uc[u], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pr[p], ur[u], rtol=1e-5, atol=1e-6)


def test_gradients_never_cross_packed_segments():
    """The loss of segment 2 does not depend on the tokens of segment 1."""
    cfg = model_lib.preset("smoke")
    model = model_lib.Decoder(cfg)
    params = sharding.strip_boxes(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    params = params["params"]
    tokens = jnp.array([[11, 12, 13, 14, 21, 22, 23, 0]])
    segments = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]])
    positions = jnp.array([[0, 1, 2, 3, 0, 1, 2, 0]])
    emb = params["embedding"]

    def segment2_loss(delta):
        p = dict(params, embedding=emb + jax.nn.one_hot(tokens[0], cfg.vocab_size).T @ delta)
        logits = model.apply({"params": p}, tokens, positions, segments)
        return jnp.sum(logits[0, 4:7])

    g = np.asarray(jax.grad(segment2_loss)(jnp.zeros((8, cfg.d_model))))
    assert np.abs(g[:4]).max() == 0.0 and np.abs(g[4:7]).min() > 0.0


def test_packed_training_runs_and_resumes_exactly(tmp_path):
    """The packing iterator's position is checkpointed like the plain one."""
    import shutil

    from jaxpost import checkpoint as ckpt

    def config():
        c = config_lib.load_config(f"{REPO}/configs/sft.py:smoke")
        config_lib.apply_overrides(
            c,
            [
                "data.packing=first_fit",
                "data.max_segments_per_row=8",
                "train.num_steps=4",
                "checkpoint.every_steps=2",
                "checkpoint.keep=5",
                "eval.every_steps=0",
                "data.max_eval_examples=16",
            ],
        )
        return c

    straight = tmp_path / "a"
    train_lib.train(config(), str(straight))
    resumed = tmp_path / "b"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "4")
    assert train_lib.train(config(), str(resumed))["start_step"] == 2
    for x, y in zip(
        jax.tree.leaves(ckpt.load_params(str(straight))),
        jax.tree.leaves(ckpt.load_params(str(resumed))),
        strict=True,
    ):
        np.testing.assert_array_equal(x, y)
