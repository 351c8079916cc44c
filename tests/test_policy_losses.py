"""GRPO/RLOO advantages and the clipped policy-gradient surrogate against values worked out by
hand from the equations (TRL 1.16 GRPOTrainer/RLOOTrainer semantics)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import losses


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def test_group_advantages_by_hand():
    rewards = jnp.asarray([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    group_std = math.sqrt(1 / 3)  # Bessel-corrected std of [1, 0, 0, 1]
    adv, std = losses.group_advantages(rewards, 4)
    half = 0.5 / (group_std + 1e-4)
    np.testing.assert_allclose(adv, [half, -half, -half, half, 0, 0, 0, 0], rtol=1e-12)
    np.testing.assert_allclose(std, [group_std] * 4 + [0] * 4, rtol=1e-12)
    batch_std = math.sqrt(5.5 / 7)  # all eight rewards, mean 1.25
    adv, std = losses.group_advantages(rewards, 4, scale_rewards="batch")
    half = 0.5 / (batch_std + 1e-4)
    np.testing.assert_allclose(adv, [half, -half, -half, half, 0, 0, 0, 0], rtol=1e-12)
    np.testing.assert_allclose(std, [batch_std] * 8, rtol=1e-12)
    adv, _ = losses.group_advantages(rewards, 4, scale_rewards="none")  # Dr. GRPO
    np.testing.assert_allclose(adv, [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], rtol=1e-12)
    # one generation per prompt: no spread to measure; std 0 and advantages 0, as in TRL
    adv, std = losses.group_advantages(jnp.asarray([3.0, 1.0]), 1)
    assert np.asarray(std).tolist() == [0.0, 0.0] and np.asarray(adv).tolist() == [0.0, 0.0]


def test_rloo_advantages_by_hand():
    rewards = jnp.asarray([1.0, 0.0, 0.0, 1.0, 4.0, 1.0])
    adv = losses.rloo_advantages(rewards[:4], 4)
    # r=1: baseline (0 + 0 + 1) / 3; r=0: baseline (1 + 0 + 1) / 3
    np.testing.assert_allclose(adv, [2 / 3, -2 / 3, -2 / 3, 2 / 3], rtol=1e-12)
    adv = losses.rloo_advantages(rewards, 2)  # pairs: each minus the other
    np.testing.assert_allclose(adv, [1, -1, -1, 1, 3, -3], rtol=1e-12)
    adv = losses.rloo_advantages(rewards[:4], 4, normalize_advantages=True)
    std = math.sqrt(4 * (2 / 3) ** 2 / 3)
    np.testing.assert_allclose(adv, np.array([2, -2, -2, 2]) / 3 / (std + 1e-4), rtol=1e-12)
    with pytest.raises(ValueError, match="num_generations >= 2"):
        losses.rloo_advantages(rewards, 1)
    with pytest.raises(ValueError, match="6 completions do not split into groups of"):
        losses.group_advantages(rewards, 4)


# Two completions of 3 tokens: row 0 (advantage +1) has ratios 1.5, 1, 0.5; row 1 (advantage
# -2) has 1.5, 0.5 and a padding token.
OLD = np.log(np.array([[0.2, 0.3, 0.4], [0.1, 0.5, 0.9]]))
RATIOS = np.array([[1.5, 1.0, 0.5], [1.5, 0.5, 7.0]])
LOGPS = OLD + np.log(RATIOS)
ADV = np.array([1.0, -2.0])
MASK = np.array([[1, 1, 1], [1, 1, 0]])
# -min(w A, clip(w, 0.8, 1.2) A) per token
PER_TOKEN = np.array([[-1.2, -1.0, -0.5], [3.0, 1.6, 0.0]])


def _terms(**kw):
    return losses.policy_loss_terms(
        jnp.asarray(LOGPS), jnp.asarray(OLD), jnp.asarray(ADV), jnp.asarray(MASK), **kw
    )


def test_clipped_surrogate_by_hand():
    terms = _terms()
    np.testing.assert_allclose(terms["loss"], PER_TOKEN, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(terms["high_clipped"], [[1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(terms["low_clipped"], [[0, 0, 0], [0, 1, 0]])
    assert "kl" not in terms
    args = [jnp.asarray(x) for x in (LOGPS, OLD, ADV, MASK)]
    total = PER_TOKEN.sum()  # 1.9 over 5 tokens
    want = {
        "grpo": np.mean([PER_TOKEN[0].sum() / 3, PER_TOKEN[1].sum() / 2]),
        "bnpo": total / 5,
        "dr_grpo": total / (2 * 4),
        "dapo": total / 5,
    }
    for loss_type, value in want.items():
        got = losses.policy_loss(*args, loss_type=loss_type, max_completion_length=4)
        assert float(got) == pytest.approx(value, rel=1e-12), loss_type
    # dapo over a generation batch larger than this micro-batch
    assert float(losses.policy_loss(*args, num_items=10)) == pytest.approx(total / 10)
    # asymmetric clipping (DAPO's clip-higher): 1.5 is inside [0.8, 1.6]
    loss = _terms(epsilon_high=0.6)["loss"]
    assert float(loss[0, 0]) == pytest.approx(-1.5) and float(loss[1, 0]) == pytest.approx(3.0)
    # two-sided clipping: with A < 0 the unclipped ratio is capped at delta
    assert float(_terms(delta=1.4)["loss"][1, 0]) == pytest.approx(2.8)


def test_sequence_level_ratio_and_kl_by_hand():
    terms = _terms(importance_sampling_level="sequence")
    w0 = (1.5 * 1.0 * 0.5) ** (1 / 3)  # geometric mean of row 0's ratios: 0.909, unclipped
    w1 = (1.5 * 0.5) ** (1 / 2)  # 0.866, unclipped; A < 0
    np.testing.assert_allclose(terms["loss"], [[-w0] * 3, [2 * w1, 2 * w1, 0]], rtol=1e-12)
    ref = OLD - 0.1
    terms = _terms(ref_logps_NT=jnp.asarray(ref), beta=0.04)
    d = ref - LOGPS
    kl = (np.exp(d) - d - 1) * MASK
    np.testing.assert_allclose(terms["kl"], kl, rtol=1e-12)
    np.testing.assert_allclose(terms["loss"], PER_TOKEN + 0.04 * kl, rtol=1e-12)


def test_gradient_flows_only_inside_the_trust_region():
    """d loss / d logp = -A w inside the clip range or on the side that does not stop it,
    0 where the clipped branch is the minimum."""

    def total(logps):
        return jnp.sum(
            losses.policy_loss_terms(logps, jnp.asarray(OLD), jnp.asarray(ADV), jnp.asarray(MASK))[
                "loss"
            ]
        )

    grad = jax.grad(total)(jnp.asarray(LOGPS))
    want = [[0.0, -1.0, -0.5], [3.0, 0.0, 0.0]]  # row 1: A = -2, w = 1.5 -> 3; w = 0.5 clipped
    np.testing.assert_allclose(grad, want, atol=1e-12)


def test_bad_options_are_named():
    args = [jnp.asarray(x) for x in (LOGPS, OLD, ADV, MASK)]
    with pytest.raises(ValueError, match="loss_type='ppo' is not one of"):
        losses.policy_loss(*args, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        losses.policy_loss(*args, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="importance_sampling_level='batch'"):
        losses.policy_loss(*args, importance_sampling_level="batch")
    with pytest.raises(ValueError, match="beta != 0 needs ref_logps"):
        losses.policy_loss(*args, beta=0.1)
    with pytest.raises(ValueError, match="scale_rewards='std'"):
        losses.group_advantages(jnp.ones(4), 2, scale_rewards="std")


def test_unscorable_rewards_leave_their_siblings_alone():
    """A NaN reward (no reward function could score it) gets advantage 0 and is left out of its
    group's statistics, as TRL's nan-aware mean and std do."""
    rewards = jnp.asarray([1.0, jnp.nan, 0.0, 1.0, 0.0, 1.0])
    adv, std = losses.group_advantages(rewards, 3)
    half = 0.5 / (math.sqrt(0.5) + 1e-4)  # group [1, 0]: mean 0.5, std sqrt(0.5)
    np.testing.assert_allclose(adv[:3], [half, 0.0, -half], rtol=1e-12)
    np.testing.assert_allclose(std[3:], [math.sqrt(1 / 3)] * 3, rtol=1e-12)  # group [1, 0, 1]
    adv = losses.rloo_advantages(rewards, 3)
    np.testing.assert_allclose(adv, [1.0, 0.0, -1.0, 0.5, -1.0, 0.5], rtol=1e-12)
