"""Shared-prompt pairs: one encoding of a pair's prompt gives the losses, metrics and gradients
of two separate sequences, for every pair objective."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from jaxpost import config as config_lib
from jaxpost import model as model_lib
from jaxpost import objectives, plan, sharding
from jaxpost import train as train_lib
from jaxpost.data import pipeline
from jaxpost.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _pair(prompt, chosen, rejected):
    def ex(completion):
        ids = np.int32(prompt + completion)
        return pipeline.Example(ids, np.int32([0] * len(prompt) + [1] * len(completion)))

    return pipeline.PairExample(ex(chosen), ex(rejected))


def test_shared_features_hold_the_prompt_once():
    pair = _pair([1, 2, 3], [4, 5], [6, 7, 8])
    # Next-token rows: the prompt's last token predicts each side's first completion token,
    # so it is in both branches; positions continue from the prompt in both.
    got = pipeline.shared_features(pair, shift=True)
    assert got["inputs"].tolist() == [1, 2, 3, 4, 3, 6, 7]
    assert got["targets"].tolist() == [2, 3, 4, 5, 6, 7, 8]
    assert got["loss_mask"].tolist() == [0, 0, 1, 1, 1, 1, 1]
    assert got["positions"].tolist() == [0, 1, 2, 3, 2, 3, 4]
    assert got["branch_ids"].tolist() == [0, 0, 1, 1, 2, 2, 2]
    # Whole sequences (reward models): the whole prompt once, each completion after it.
    got = pipeline.shared_features(pair, shift=False)
    assert got["inputs"].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert got["positions"].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert got["branch_ids"].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    # Completions that begin alike still each keep all their loss tokens.
    got = pipeline.shared_features(_pair([1, 2], [5, 6], [5, 7]), shift=True)
    assert got["inputs"].tolist() == [1, 2, 5, 2, 5]
    assert got["targets"].tolist() == [2, 5, 6, 5, 7]
    assert got["branch_ids"].tolist() == [0, 1, 1, 2, 2]
    row = pipeline.to_row(_pair([1, 2], [5], [6]), 4, "shared_pairs")
    assert row["inputs"].shape == (8,) and row["segment_ids"].tolist() == [1] * 3 + [0] * 5


@pytest.mark.parametrize("window", [0, 3])
def test_shared_row_logits_equal_separate_sequences(window):
    cfg = model_lib.preset("smoke", sliding_window=window)
    model = model_lib.Decoder(cfg)
    params = model_lib.init_params(cfg, seed=1)
    pair = _pair([5, 9, 14, 3], [7, 8, 2], [11, 4])
    row = {k: jnp.asarray(v)[None] for k, v in pipeline.shared_features(pair, True).items()}
    shared = model.apply(
        {"params": params},
        row["inputs"],
        row["positions"],
        jnp.ones_like(row["inputs"]),
        branch_ids_BL=row["branch_ids"],
    )[0]
    for branch, side in ((1, pair.chosen), (2, pair.rejected)):
        alone = model.apply({"params": params}, jnp.asarray(side.ids[:-1])[None])[0]
        # the shared prompt, then this branch: the same tokens at the same positions
        branches = np.asarray(row["branch_ids"][0])
        rows = np.flatnonzero((branches == 0) | (branches == branch))
        np.testing.assert_allclose(shared[rows], alone, rtol=1e-5, atol=1e-5)


def _batch(objective_name, kind, examples, overrides=()):
    config = config_lib.load_config(f"{REPO}/configs/{objective_name.split(':')[0]}.py:smoke")
    config_lib.apply_overrides(config, list(overrides))
    shared = pipeline.is_shared(kind)
    segments = 8 if shared else 1
    config.objective.shared_prompt = shared
    objective = objectives.make_objective(
        config.objective, model_lib.Config(**config.model), segments_per_row=segments
    )
    assert objective.data_kind == kind
    (batch,) = pipeline.make_eval_batches(
        examples,
        seq_len=64,
        micro_batch=len(examples),
        packing="first_fit" if shared else "none",
        segments_per_row=segments,
        packing_bins=8,
        kind=kind,
    )
    return objective, jax.tree.map(lambda x: jnp.asarray(x[0]), batch)


def _loss(objective, params, batch, frozen):
    terms, aux = objective.loss_fn(params, batch, frozen)
    den = objective.denominators(batch)
    return sum(terms[k] / den[k] for k in terms), aux


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("dpo", ["objective.loss_type=sigmoid,sft", "objective.logits_chunk_size=0"]),
        ("orpo", ["objective.name=orpo", "objective.logits_chunk_size=16"]),
        ("rm", []),
    ],
)
def test_shared_prompt_gives_the_same_loss_metrics_and_gradients(name, overrides):
    """In float64, so that the comparison is tight: the two layouts sum the same terms in other
    orders (packing reorders the pairs; a shared prompt token receives both sides' gradients at
    once), which in float32 differs by round-off amplified by cancellation in the embedding
    gradients. `jax.nn.dot_product_attention` still takes its softmax in float32 (its
    sums over keys run over rows of other lengths here), so the agreement is at float32's
    round-off of the attention weights, ~1e-7 relative, not float64's."""
    config_name = "rm" if name == "rm" else "dpo"
    base = "reward_pairs" if name == "rm" else "pairs"
    examples, _ = pipeline.load_examples(
        "builtin:sort_prefs", "eval", TOK, kind=base, seq_len=48, max_examples=16
    )
    if name == "dpo":  # precomputed reference log-probs travel with the pairs
        ref = np.random.default_rng(0).normal(-20, 3, (len(examples), 2)).astype(np.float32)
        examples = [pipeline.ex_lib.with_ref(e, r) for e, r in zip(examples, ref, strict=True)]
    overrides = [*overrides, "model.dtype=float64", "model.param_dtype=float64"]
    with jax.enable_x64(True):
        unshared, b_u = _batch(config_name, base, examples, overrides)
        shared, b_s = _batch(config_name, "shared_" + base, examples, overrides)
        # Several pairs share a row, and the prompts are encoded once: fewer tokens run.
        assert int((b_s["segment_ids"] > 0).any(-1).sum()) < len(examples) / 2
        assert int((b_s["segment_ids"] > 0).sum()) < 0.9 * int((b_u["segment_ids"] > 0).sum())
        params = sharding.strip_boxes(
            unshared.model.init(jax.random.PRNGKey(3), jnp.zeros((1, 8), jnp.int32))
        )["params"]
        grad_fn = jax.jit(jax.value_and_grad(_loss, argnums=1, has_aux=True), static_argnums=0)
        (loss_u, aux_u), g_u = grad_fn(unshared, params, b_u, None)
        (loss_s, aux_s), g_s = grad_fn(shared, params, b_s, None)
    assert jax.tree.leaves(g_s)[0].dtype == np.float64
    assert float(loss_s) == pytest.approx(float(loss_u), rel=1e-6)
    for key, (total, count) in aux_u["metrics"].items():
        got = aux_s["metrics"][key]
        assert float(got[1]) == pytest.approx(float(count)), key
        assert float(got[0]) == pytest.approx(float(total), rel=1e-6, abs=1e-6), key
    for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_u), strict=True):
        scale = float(np.max(np.abs(b)))
        # An embedding row of a token in every prompt sums many terms that largely cancel:
        # the float32 attention round-off shows there relative to the leaf's scale.
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)


def test_shared_prompt_needs_pairs_packing_and_a_masking_kernel():
    def config(name, *overrides):
        c = config_lib.load_config(f"{REPO}/configs/{name}.py:smoke")
        config_lib.apply_overrides(c, ["objective.shared_prompt=True", *overrides])
        return c

    with pytest.raises(ValueError, match="shared_prompt=True is for preference pairs"):
        plan.make_plan(config("sft", "data.packing=first_fit"))
    with pytest.raises(ValueError, match="data.packing=first_fit"):
        plan.make_plan(config("dpo"))
    with pytest.raises(ValueError, match="splash kernel"):
        plan.make_plan(config("rm", "data.packing=first_fit", "model.attention=splash"))


def test_shared_prompt_dpo_trains(tmp_path):
    c = config_lib.load_config(f"{REPO}/configs/dpo.py:smoke")
    config_lib.apply_overrides(
        c,
        [
            "objective.shared_prompt=True",
            "data.packing=first_fit",
            "data.max_segments_per_row=4",
            "train.num_steps=4",
            "train.global_batch=8",
            "eval.every_steps=4",
            "eval.batch_size=8",
            "checkpoint.every_steps=0",
        ],
    )
    summary = train_lib.train(c, str(tmp_path / "run"))
    assert summary["final_step"] == 4
    assert np.isfinite(summary["eval_after"]["loss"])
    assert np.isfinite(summary["last_train_metrics"]["loss"])
    assert '"_data_kind": "shared_pairs"' in (tmp_path / "run" / "config.json").read_text()


def test_the_layout_does_not_change_what_the_examples_are():
    """The examples' digest (the precomputed reference's cache key) ignores the row layout:
    switching shared prompts on reuses the reference log-probs."""
    handle = pipeline._handle(TOK)
    digests = {
        kind: pipeline.open_examples(
            "builtin:sort_prefs", "eval", handle, pipeline.Settings(kind, 48)
        )[0].digest
        for kind in ("pairs", "shared_pairs", "reward_pairs", "shared_reward_pairs")
    }
    assert digests["pairs"] == digests["shared_pairs"]
    assert digests["reward_pairs"] == digests["shared_reward_pairs"] != digests["pairs"]


def test_auto_attention_takes_the_branch_mask_when_compiling_for_tpu():
    """On TPUs `auto` means splash, which cannot mask branches: shared-prompt rows get the
    blockwise kernel instead (traced for a TPU mesh here); an explicit splash is refused."""
    import dataclasses

    cfg = model_lib.preset("smoke")
    params = model_lib.init_params(cfg, seed=0)
    row = {
        k: jnp.asarray(v)[None]
        for k, v in pipeline.shared_features(_pair([5, 9, 14], [7, 8], [11]), True).items()
    }

    def trace(config):
        model = model_lib.Decoder(config)
        return jax.make_jaxpr(
            lambda p: model.apply(
                {"params": p},
                row["inputs"],
                row["positions"],
                jnp.ones_like(row["inputs"]),
                branch_ids_BL=row["branch_ids"],
            )
        )(params)

    tpu = jax.sharding.AbstractDevice(device_kind="TPU v5", num_cores=1, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=tpu)
    with jax.sharding.use_abstract_mesh(mesh):
        assert model_lib.attention_kernel(cfg) == "splash"
        jaxpr = str(trace(cfg))
        assert "custom_vjp_call" in jaxpr  # jaxpost.blockwise (the CPU projections are off)
        assert "dot_product_attention" not in jaxpr and "pallas_call" not in jaxpr
        with pytest.raises(ValueError, match="attention=blockwise"):
            trace(dataclasses.replace(cfg, attention="splash"))
