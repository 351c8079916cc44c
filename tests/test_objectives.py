"""RM and DPO on the shared loop: pair data, the log-2 check, references, init from SFT."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from jaxpost import checkpoint as ckpt
from jaxpost import config as config_lib
from jaxpost import losses, objectives, optim, sharding
from jaxpost import model as model_lib
from jaxpost import step as step_lib
from jaxpost import train as train_lib
from jaxpost.data import pipeline, records
from jaxpost.data.tokenizer import BOS, ByteTokenizer

TOK = ByteTokenizer()


def cfg(name, variant="smoke", **overrides):
    config = config_lib.load_config(
        f"{REPO}/configs/{name}.py" + (f":{variant}" if variant else "")
    )
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])
    return config


# --- preference records -------------------------------------------------------------------------


def test_prompt_is_tokenised_once_and_both_completions_continue_it():
    rec = {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}
    prompt, (c, cm), (r, rm) = records.tokenize_preference(rec, TOK, "x:1")
    assert prompt[0] == BOS and prompt.count(BOS) == 1 and BOS not in c + r
    assert TOK.decode(prompt + c) == "Q: 2+2? 4" and TOK.decode(prompt + r) == "Q: 2+2? 5"
    assert all(cm) and all(rm)
    ex, _ = pipeline.load_examples(
        "builtin:reverse_prefs", "train", TOK, kind="pairs", seq_len=32, max_examples=3
    )
    for pair in ex:
        n = int(np.argmax(pair.chosen.mask))  # first target token
        np.testing.assert_array_equal(pair.chosen.ids[:n], pair.rejected.ids[:n])
        assert not pair.chosen.mask[:n].any() and not pair.rejected.mask[:n].any()


def test_implicit_prompt_conversations_share_their_prefix():
    user = {"role": "user", "content": "hi"}
    rec = {
        "chosen": [user, {"role": "assistant", "content": "hello"}],
        "rejected": [user, {"role": "assistant", "content": "go away"}],
    }
    prompt, (c, cm), (r, _) = records.tokenize_preference(rec, TOK, "x:1")
    assert TOK.decode(prompt) == "hi" and TOK.decode(c) == "hello" and TOK.decode(r) == "go away"
    assert cm[0] == 0 and cm[-1] == 1  # the role token is not a target; <eos> is


@pytest.mark.parametrize(
    "record, problem",
    [
        ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
        ({"prompt": "p", "chosen": "", "rejected": "b"}, "empty chosen completion"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, "identical"),
        ({"chosen": "a", "rejected": "b"}, "needs conversations"),
        (
            {
                "prompt": [{"role": "user", "content": "q"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "b"}],
            },
            "no assistant turn",
        ),
    ],
)
def test_bad_preference_records(tmp_path, record, problem):
    path = tmp_path / "prefs.jsonl"
    path.write_text(
        json.dumps({"prompt": "p", "chosen": "x", "rejected": "y"})
        + "\n"
        + json.dumps(record)
        + "\n"
    )
    with pytest.raises(records.DataError, match=rf"prefs.jsonl:2: .*{problem}"):
        pipeline.load_examples(str(path), "train", TOK, kind="pairs", seq_len=32)
    ex, stats = pipeline.load_examples(
        str(path), "train", TOK, kind="pairs", seq_len=32, skip_invalid=True
    )
    assert len(ex) == 1 and stats.skipped == 1 and problem.split()[-1] in stats.summary()


def test_pair_rows_have_a_pair_axis():
    ex, _ = pipeline.load_examples(
        "builtin:reverse_prefs", "eval", TOK, kind="pairs", seq_len=32, max_examples=5
    )
    batches = pipeline.make_eval_batches(ex, seq_len=32, micro_batch=4)
    assert batches[0]["inputs"].shape == (1, 4, 2, 32)
    assert len(batches) == 2 and batches[1]["segment_ids"][0, 1:].sum() == 0  # padded pairs


# --- objectives on the loop ---------------------------------------------------------------------


def _setup(config, mesh_config=None):
    model_config = model_lib.Config(**config.model)
    objective = objectives.make_objective(config.objective, model_config)
    mesh = sharding.make_mesh(mesh_config or {"data": -1, "fsdp": 1, "tensor": 1})
    tx = optim.make_optimizer(config.optim, 10)
    schedule = optim.make_schedule(config.optim, 10)
    examples, _ = pipeline.load_examples(
        config.data.train_path, "train", TOK, kind="pairs", seq_len=32, max_examples=16
    )
    rows = [pipeline.to_row(e, 32) for e in examples]
    batch = {k: np.stack([r[k] for r in rows])[None] for k in rows[0]}
    return objective, mesh, tx, schedule, examples, batch


def test_dpo_loss_is_exactly_log2_at_step_0_with_a_frozen_reference():
    config = cfg("dpo", **{"objective.reference": "frozen"})
    objective, mesh, tx, schedule, _, batch = _setup(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state, sh = step_lib.create_state(objective.model, tx, mesh, seed=0, seq_len=32)
        frozen = jax.tree.map(jnp.copy, state.params)
        step = step_lib.make_train_step(
            objective, tx, schedule, state_shardings=sh, mesh=mesh, frozen_shardings=sh.params
        )
        _, m = step(state, sharding.to_global(batch, mesh), frozen)
    # Policy and reference are separate (bitwise equal) buffers run through the same model; XLA
    # may fuse the two passes differently, so allow float32 rounding of the log-prob sums.
    assert float(m["loss"]) == pytest.approx(math.log(2), abs=1e-6)
    assert abs(float(m["rewards/margins"])) < 1e-6


def test_dpo_objective_matches_the_loss_library_on_independent_log_probs():
    config = cfg(
        "dpo",
        **{
            "objective.reference": "frozen",
            "objective.loss_type": "ipo,sft",
            "objective.loss_weights": "1.0,0.3",
            "objective.beta": 0.5,
        },
    )
    objective, mesh, tx, _, examples, batch = _setup(config)
    model = objective.model
    params = sharding.strip_boxes(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    params = params["params"]
    ref = jax.tree.map(lambda x: x * 0.9, params)

    apply = jax.jit(model.apply)  # compiled once per distinct sequence length

    def seq_logps(p, ex):  # one sequence at a time, no padding: an independent computation
        ids = jnp.asarray(ex.ids)[None]
        logits = apply({"params": p}, ids[:, :-1])
        lp = np.asarray(losses.token_logps(logits, ids[:, 1:]))[0]
        return float((lp * ex.mask[1:]).sum()), float(ex.mask[1:].sum())

    pc, pr, rc, rr, lc, lr = ([] for _ in range(6))
    for ex in examples:
        a, n = seq_logps(params, ex.chosen)
        b, m = seq_logps(params, ex.rejected)
        pc.append(a), pr.append(b), lc.append(n), lr.append(m)
        rc.append(seq_logps(ref, ex.chosen)[0]), rr.append(seq_logps(ref, ex.rejected)[0])
    want, _, _ = losses.dpo_loss(
        *map(jnp.asarray, (pc, pr, rc, rr)),
        loss_type=["ipo", "sft"],
        loss_weights=[1.0, 0.3],
        beta=0.5,
        chosen_lengths=jnp.asarray(lc),
        rejected_lengths=jnp.asarray(lr),
    )
    micro = jax.tree.map(lambda x: jnp.asarray(x[0]), batch)
    terms, _ = objective.loss_fn(params, micro, ref)
    denoms = objective.denominators(micro)
    got = sum(float(terms[k]) / float(denoms[k]) for k in terms)
    assert got == pytest.approx(float(jnp.mean(want)), rel=2e-5)


def test_rm_objective_equals_reward_loss():
    config = cfg("rm", **{"objective.center_rewards_coefficient": 0.01})
    objective, _, _, _, _, batch = _setup(config)
    params = sharding.strip_boxes(
        objective.model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))
    )["params"]
    params["score"] = jax.random.normal(jax.random.PRNGKey(2), params["score"].shape)
    micro = jax.tree.map(lambda x: jnp.asarray(x[0]), batch)
    from jaxpost.objectives import rm

    rc, rr, valid = rm.pair_rewards(params, micro, model=objective.model)
    assert bool(valid.all())
    rewards = jnp.stack([rc, rr], axis=-1)
    want = losses.reward_loss(rc, rr, center_rewards_coefficient=0.01)
    terms, aux = objective.loss_fn(params, micro, None)
    denoms = objective.denominators(micro)
    got = sum(float(terms[k]) / float(denoms[k]) for k in terms)
    assert got == pytest.approx(float(want), rel=1e-5)
    assert float(aux["minima"]["min_reward"]) == pytest.approx(float(rewards.min()), rel=1e-6)
    # The reward is read at the last real token: padding after it changes nothing.
    seg = micro["segment_ids"][0, 0]
    last = int(np.nonzero(np.asarray(seg))[0][-1])
    scores = objective.model.apply(
        {"params": params},
        micro["inputs"][0, :1],
        micro["positions"][0, :1],
        micro["segment_ids"][0, :1],
    )
    # One row vs a batch of 32 rows: float32 matmuls may block the reductions differently.
    assert float(rewards[0, 0]) == pytest.approx(float(scores[0, last]), rel=1e-5)


@pytest.mark.slow
def test_rm_and_dpo_start_from_an_sft_workdir_and_precompute_the_reference_once(tmp_path):
    sft = tmp_path / "sft"
    train_lib.train(cfg("sft", **{"train.num_steps": 4, "data.max_eval_examples": 16}), str(sft))
    sft_params = ckpt.load_params(str(sft))

    rm_dir = tmp_path / "rm"
    train_lib.train(
        cfg("rm", **{"init.workdir": str(sft), "train.num_steps": 1, "checkpoint.every_steps": 0}),
        str(rm_dir),
    )
    rm_params = ckpt.load_params(str(rm_dir))
    assert set(rm_params) == {"decoder", "score"} and "lm_head" not in rm_params["decoder"]

    cache = tmp_path / "refcache"
    overrides = {
        "init.workdir": str(sft),
        "train.num_steps": 2,
        "checkpoint.every_steps": 0,
        "objective.reference_cache_dir": str(cache),
        "optim.lr": 0.0,
    }
    summary = train_lib.train(cfg("dpo", **overrides), str(tmp_path / "dpo1"))
    # lr = 0: the policy stays the SFT model, which is the reference: log 2 at every step.
    assert summary["eval_before"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert summary["last_train_metrics"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    files = sorted(os.listdir(cache))
    assert len(files) == 2  # train and eval splits
    stamps = [os.path.getmtime(cache / f) for f in files]
    train_lib.train(cfg("dpo", **overrides), str(tmp_path / "dpo2"))  # a second sweep point
    assert sorted(os.listdir(cache)) == files
    assert [os.path.getmtime(cache / f) for f in files] == stamps

    # The precomputed reference equals the frozen one.
    ex, _ = pipeline.load_examples("builtin:sort_prefs", "train", TOK, kind="pairs", seq_len=32)
    stored = (
        np.load(cache / files[0])
        if np.load(cache / files[0]).shape[0] == len(ex)
        else np.load(cache / files[1])
    )
    model = model_lib.Decoder(model_lib.preset("smoke"))
    first = ex[0]
    for seq, want in ((first.chosen, stored[0, 0]), (first.rejected, stored[0, 1])):
        ids = jnp.asarray(seq.ids)[None]
        lp = losses.token_logps(model.apply({"params": sft_params}, ids[:, :-1]), ids[:, 1:])
        assert float((np.asarray(lp)[0] * seq.mask[1:]).sum()) == pytest.approx(want, rel=1e-5)


def test_dpo_refuses_a_missing_or_different_reference(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        train_lib.train(
            cfg("dpo", **{"init.workdir": str(tmp_path / "nothing")}), str(tmp_path / "run")
        )
    sft = tmp_path / "sft"
    train_lib.train(cfg("sft", **{"train.num_steps": 1, "data.max_eval_examples": 16}), str(sft))
    with pytest.raises(ValueError, match=r"different architecture \(model.n_layers: 2 there, 3"):
        train_lib.train(
            cfg("dpo", **{"init.workdir": str(sft), "model.n_layers": 3}), str(tmp_path / "run")
        )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_objective_settings_fail_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="exo_pair' needs 0 < label_smoothing"):
        train_lib.train(cfg("dpo", **{"objective.loss_type": "exo_pair"}), str(tmp_path))
    with pytest.raises(ValueError, match="2 weights for 1 loss types"):
        train_lib.train(cfg("dpo", **{"objective.loss_weights": "1,2"}), str(tmp_path))
    with pytest.raises(ValueError, match="objective.reference='copy'"):
        train_lib.train(cfg("dpo", **{"objective.reference": "copy"}), str(tmp_path))
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name", ["sft", "dpo"])
def test_chunked_logits_give_the_same_losses_metrics_and_gradients(name):
    """objective.logits_chunk_size > 0 never builds [B, L, V] logits and changes nothing."""
    full = cfg(name, **({"objective.reference": "frozen"} if name == "dpo" else {}))
    chunked = cfg(
        name,
        **{
            "objective.logits_chunk_size": 8,
            **({"objective.reference": "frozen"} if name == "dpo" else {}),
        },
    )
    kind = "pairs" if name == "dpo" else "sft"
    examples, _ = pipeline.load_examples(
        full.data.train_path, "train", TOK, kind=kind, seq_len=32, max_examples=6
    )
    rows = [pipeline.to_row(e, 32) for e in examples]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    results = []
    for config in (full, chunked):
        objective = objectives.make_objective(config.objective, model_lib.Config(**config.model))
        params = sharding.strip_boxes(
            objective.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
        )["params"]
        frozen = jax.tree.map(lambda x: x * 0.9, params) if name == "dpo" else None

        def loss(p, objective=objective, frozen=frozen):
            terms, aux = objective.loss_fn(p, batch, frozen)
            return sum(terms.values()), aux

        (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
        results.append((value, aux, grads))
    (v0, a0, g0), (v1, a1, g1) = results
    assert float(v1) == pytest.approx(float(v0), rel=1e-5)
    for (k, (s0, c0)), (_, (s1, c1)) in zip(
        a0["metrics"].items(), a1["metrics"].items(), strict=True
    ):
        assert float(s1) == pytest.approx(float(s0), rel=1e-4, abs=1e-5), k
        assert float(c1) == float(c0), k
    for x, y in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["simpo", "orpo"])
def test_reference_free_objectives_equal_their_losses_and_train(tmp_path, kind):
    overrides = {"objective.name": kind, "objective.beta": 2.0 if kind == "simpo" else 0.1}
    config = cfg("dpo", **overrides)
    objective, _, _, _, _, batch = _setup(config)
    assert objective.reference == "none"
    params = sharding.strip_boxes(
        objective.model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    )["params"]
    micro = jax.tree.map(lambda x: jnp.asarray(x[0]), batch)
    from jaxpost.objectives import dpo

    (pc, pr), (lc, lr), _, _ = dpo.pair_logps(params, micro, model=objective.model)
    if kind == "simpo":
        want = losses.simpo_loss(pc, pr, lc, lr, beta=2.0, gamma=0.5)[0].mean()
    else:
        want = losses.orpo_loss(pc, pr, lc, lr, beta=0.1)[0].mean()
    terms, _ = objective.loss_fn(params, micro, None)
    denoms = objective.denominators(micro)
    got = sum(float(terms[k]) / float(denoms[k]) for k in terms)
    assert got == pytest.approx(float(want), rel=1e-5)
    summary = train_lib.train(
        cfg(
            "dpo",
            **overrides,
            **{"train.num_steps": 3, "eval.every_steps": 0, "checkpoint.every_steps": 0},
        ),
        str(tmp_path),
    )
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    assert not (tmp_path / "reference_logps").exists()  # no reference at all


def test_exported_reward_model_scores_full_sequences_as_training_did(tmp_path):
    """transformers' sequence classifiers (and TRL's RewardTrainer) read a reward at the last
    non-pad token of the whole sequence -- the EOS here. Training must read the same token, so
    the exported model scores a text exactly as training scored it."""
    from jaxpost import hf, serve
    from jaxpost.objectives import rm

    run = tmp_path / "rm"
    config = cfg(
        "rm", **{"train.num_steps": 3, "checkpoint.every_steps": 0, "data.max_eval_examples": 8}
    )
    summary = train_lib.train(config, str(run))
    out = serve.export(str(run), str(tmp_path / "hf"))
    hf_model, hf_params = hf.load_pretrained(out)
    pad = json.loads((tmp_path / "hf" / "config.json").read_text())["pad_token_id"]
    assert pad is not None and pad != TOK.eos_id

    # The exported model, read as transformers reads it: the full token sequences, right-padded
    # with the pad id, scored at the last token that is not the pad id.
    examples, _ = pipeline.load_examples(
        "builtin:sort_prefs", "eval", TOK, kind="pairs", seq_len=64, max_examples=8
    )
    seqs = [s.ids for e in examples for s in (e.chosen, e.rejected)]
    assert all(s[-1] == TOK.eos_id for s in seqs)
    ids = np.full((len(seqs), max(map(len, seqs))), pad, np.int32)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    scores = np.asarray(model_lib.RewardModel(hf_model).apply({"params": hf_params}, ids))
    last = (np.arange(ids.shape[1]) * (ids != pad)).argmax(-1)
    exported = scores[np.arange(len(seqs)), last]

    # Training-time rewards of the same pairs, from the rows the objective reads.
    objective = objectives.make_objective(config.objective, model_lib.Config(**config.model))
    batch = pipeline.make_eval_batches(
        examples, seq_len=32, micro_batch=len(examples), kind=objective.data_kind
    )[0]
    micro = jax.tree.map(lambda x: jnp.asarray(x[0]), batch)
    rc, rr, valid = rm.pair_rewards(ckpt.load_params(str(run)), micro, model=objective.model)
    assert bool(valid.all())
    trained = np.stack([np.asarray(rc), np.asarray(rr)], axis=-1).reshape(-1)
    spread = exported.max() - exported.min()
    assert spread > 1e-2  # the rewards differ between sequences: the comparison means something
    np.testing.assert_allclose(trained, exported, rtol=0, atol=1e-5 * max(1.0, spread))
    # And the run's own held-out metrics describe the exported model's scores.
    assert summary["eval_after"]["mean_reward"] == pytest.approx(exported.mean(), abs=1e-5)
    assert summary["eval_after"]["max_reward"] == pytest.approx(exported.max(), abs=1e-5)

    # Evaluating this checkpoint with a causal-LM config is refused, naming what is missing.
    from jaxpost import evaluation

    with pytest.raises(ValueError, match="do not fit the sft model"):
        evaluation.evaluate_checkpoint(cfg("sft"), str(run))

    # A reward-model workdir of an earlier jaxpost (next-token rows: the reward read one token
    # early) is not resumed under the new rows.
    saved = json.loads((run / "config.json").read_text())
    assert saved["_data_kind"] == "reward_pairs" and saved["model"]["dtype"] == "float32"
    del saved["_data_kind"]
    (run / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"earlier jaxpost whose rows were next-token rows"):
        train_lib.train(cfg("rm", **{"train.num_steps": 4}), str(run))
