"""Reward, DPO-family, SimPO and ORPO losses against values derived by hand (float64).

Two kinds of checks: closed forms at zero log-ratios (worked out on paper in the comments), and
random inputs against scalar re-derivations written with Python's math module, straight from the
papers' equations as TRL 1.16 implements them.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpost import losses

LOG2 = math.log(2)


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def ls(x):  # log sigmoid, scalar
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x):
    return math.exp(ls(x))


def _inputs(seed=0, n=5):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = (rng.uniform(-30, -2, n) for _ in range(4))
    lc, lr = rng.integers(1, 12, n).astype(float), rng.integers(1, 12, n).astype(float)
    return pc, pr, rc, rr, lc, lr


def _dpo(loss_type, pc, pr, rc, rr, lc=None, lr=None, **kw):
    out = losses.dpo_loss(
        jnp.asarray(pc),
        jnp.asarray(pr),
        jnp.asarray(rc),
        jnp.asarray(rr),
        loss_type=loss_type,
        chosen_lengths=None if lc is None else jnp.asarray(lc),
        rejected_lengths=None if lr is None else jnp.asarray(lr),
        **kw,
    )
    return [np.asarray(x) for x in out]


# --- closed forms at policy == reference --------------------------------------------------------

ZERO_CASES = {
    # loss_type: (kwargs, value when every log-ratio is 0, derived by hand)
    "sigmoid": ({}, LOG2),  # -log sigmoid(0)
    "hinge": ({}, 1.0),  # relu(1 - 0)
    "ipo": ({"beta": 0.25}, (1 / 0.5) ** 2),  # (0 - 1/(2*0.25))^2 = 4
    "sigmoid_norm": ({}, LOG2),
    "nca_pair": ({}, 2 * LOG2),  # log2 + 0.5 log2 + 0.5 log2
    "robust": ({"label_smoothing": 0.2}, LOG2),  # ((1-e) - e) log2 / (1 - 2e)
    "bco_pair": ({}, 2 * LOG2),
    "sppo_hard": ({"beta": 0.5}, 2 * 1.0**2),  # (0 - 1)^2 + (0 + 1)^2
    "aot": ({"label_smoothing": 0.1}, LOG2),
    "aot_unpaired": ({}, LOG2),
    "apo_zero": ({}, 1.0),  # 1 - 1/2 + 1/2
    "apo_down": ({}, 1.0),  # 1/2 + 1 - 1/2
    "discopop": ({}, 0.5 * LOG2 + 0.5),  # weights sigmoid(0) = 1/2 on log2 and exp(0)
    "cdpo": ({"label_smoothing": 0.3}, LOG2),  # 0.7 log2 + 0.3 log2
    # q = (1/2, 1/2), p = (1 - e, e): KL = 1/2 log(1/2 / (1-e)) + 1/2 log(1/2 / e)
    "exo_pair": ({"label_smoothing": 0.1}, 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)),
}


@pytest.mark.parametrize("loss_type", sorted(ZERO_CASES))
def test_value_at_policy_equal_reference(loss_type):
    kwargs, want = ZERO_CASES[loss_type]
    logps = np.array([-3.0, -7.5, -12.0])
    lengths = np.array([2.0, 5.0, 9.0])
    per, rc, rr = _dpo(
        loss_type, logps, logps[::-1], logps, logps[::-1], lengths, lengths, **kwargs
    )
    np.testing.assert_allclose(per, want, rtol=1e-12)
    assert (rc == 0).all() and (rr == 0).all()


def test_every_trl_loss_type_is_covered():
    trl_names = {
        "sigmoid",
        "hinge",
        "ipo",
        "sigmoid_norm",
        "exo_pair",
        "nca_pair",
        "robust",
        "bco_pair",
        "sppo_hard",
        "aot",
        "aot_unpaired",
        "apo_zero",
        "apo_down",
        "discopop",
        "sft",
    }
    assert trl_names <= set(losses.DPO_LOSSES)
    assert set(ZERO_CASES) | {"sft"} == set(losses.DPO_LOSSES)


# --- random inputs against scalar re-derivations ------------------------------------------------


def _reference(loss_type, i, pc, pr, rc, rr, lc, lr, beta, eps, tau=0.05):
    cl, rl = pc[i] - rc[i], pr[i] - rr[i]  # log-ratios
    d = cl - rl
    if loss_type == "sigmoid":
        return -ls(beta * d)
    if loss_type == "cdpo":
        return -(1 - eps) * ls(beta * d) - eps * ls(-beta * d)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * d)
    if loss_type == "ipo":
        return (cl / lc[i] - rl / lr[i] - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return -ls(beta * (cl / lc[i] - rl / lr[i]))
    if loss_type == "exo_pair":
        qw, ql = sig(beta * d), sig(-beta * d)
        return qw * math.log(qw / (1 - eps)) + ql * math.log(ql / eps)
    if loss_type == "nca_pair":
        return -ls(beta * cl) - 0.5 * ls(-beta * cl) - 0.5 * ls(-beta * rl)
    if loss_type == "robust":
        return (-(1 - eps) * ls(beta * d) + eps * ls(-beta * d)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -ls(beta * cl) - ls(-beta * rl)
    if loss_type == "sppo_hard":
        return (cl - 0.5 / beta) ** 2 + (rl + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - sig(beta * cl) + sig(beta * rl)
    if loss_type == "apo_down":
        return sig(beta * cl) + 1 - sig(beta * (cl - rl))
    if loss_type == "discopop":
        z = beta * d
        w = sig(z / tau)
        return -ls(z) * (1 - w) + math.exp(-z) * w
    if loss_type == "sft":
        return -sum(pc) / sum(lc)
    raise AssertionError(loss_type)


ELEMENTWISE = [
    "sigmoid",
    "cdpo",
    "hinge",
    "ipo",
    "sigmoid_norm",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
]


@pytest.mark.parametrize("loss_type", ELEMENTWISE)
def test_variants_match_the_equations_on_random_inputs(loss_type):
    pc, pr, rc, rr, lc, lr = _inputs(1)
    beta, eps = 0.3, (0.1 if loss_type in losses.LABEL_SMOOTHING_LOSSES else 0.0)
    per, rew_c, rew_r = _dpo(loss_type, pc, pr, rc, rr, lc, lr, beta=beta, label_smoothing=eps)
    want = [_reference(loss_type, i, pc, pr, rc, rr, lc, lr, beta, eps) for i in range(len(pc))]
    np.testing.assert_allclose(per, want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rew_c, beta * (pc - rc), rtol=1e-12)
    np.testing.assert_allclose(rew_r, beta * (pr - rr), rtol=1e-12)


def test_aot_sorts_within_the_batch():
    pc, pr, rc, rr, _, _ = _inputs(2)
    beta, eps = 0.2, 0.05
    per, _, _ = _dpo("aot", pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    delta = np.sort(pc - pr) - np.sort(rc - rr)
    want = [-(1 - eps) * ls(beta * x) - eps * ls(-beta * x) for x in delta]
    np.testing.assert_allclose(per, want, rtol=1e-10)
    per, _, _ = _dpo("aot_unpaired", pc, pr, rc, rr, beta=beta)
    delta = np.sort(pc - rc) - np.sort(pr - rr)
    np.testing.assert_allclose(per, [-ls(beta * x) for x in delta], rtol=1e-10)


@pytest.mark.parametrize(
    "divergence, f_prime",
    [
        ("forward_kl", lambda u: 1 - 1 / u),
        ("js_divergence", lambda u: math.log(2 * u / (1 + u))),
        ("alpha_divergence", lambda u: (u ** (0.5 - 1) - 1) / (0.5 - 1)),
    ],
)
def test_f_divergence_scores(divergence, f_prime):
    pc, pr, rc, rr, _, _ = _inputs(3)
    # Keep ratios moderate so u = exp(log-ratio) is well inside float64.
    pc, pr = rc + np.linspace(-2, 2, 5), rr + np.linspace(1, -1, 5)
    per, _, _ = _dpo("sigmoid", pc, pr, rc, rr, beta=0.5, f_divergence_type=divergence)
    want = [
        -ls(0.5 * (f_prime(math.exp(a - b)) - f_prime(math.exp(c - e))))
        for a, b, c, e in zip(pc, rc, pr, rr, strict=True)
    ]
    np.testing.assert_allclose(per, want, rtol=1e-10)


def test_rpo_combines_weighted_losses():
    pc, pr, rc, rr, lc, lr = _inputs(4)
    sig_, _, _ = _dpo("sigmoid", pc, pr, rc, rr, lc, lr)
    sft, _, _ = _dpo("sft", pc, pr, rc, rr, lc, lr)
    rpo, _, _ = _dpo(["sigmoid", "sft"], pc, pr, rc, rr, lc, lr, loss_weights=[1.0, 0.5])
    np.testing.assert_allclose(rpo, sig_ + 0.5 * sft, rtol=1e-12)
    np.testing.assert_allclose(sft, -pc.sum() / lc.sum(), rtol=1e-12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_type": "nope"}, "Unknown loss_type"),
        ({"loss_type": "exo_pair"}, "exo_pair' needs 0 < label_smoothing"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "robust' needs 0 <= label_smoothing"),
        ({"loss_type": "ipo"}, "needs chosen_lengths"),
        ({"loss_type": "sigmoid", "label_smoothing": 0.1}, "use 'cdpo'"),
        ({"loss_type": "apo_zero", "f_divergence_type": "js_divergence"}, "works only with"),
        ({"loss_type": "sigmoid", "f_divergence_type": "kl"}, "is not one of"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights has 1"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    x = jnp.zeros(2)
    with pytest.raises(ValueError, match=message):
        losses.dpo_loss(x, x, x, x, **kwargs)


def test_losses_are_jit_and_grad_safe_and_stable_in_low_precision():
    pc, pr, rc, rr, lc, lr = (jnp.asarray(a) for a in _inputs(5))
    for name in losses.DPO_LOSSES:
        kw = {"label_smoothing": 0.1} if name in losses.LABEL_SMOOTHING_LOSSES else {}

        def f(p, name=name, kw=kw):
            return losses.dpo_loss(
                p, pr, rc, rr, loss_type=name, chosen_lengths=lc, rejected_lengths=lr, **kw
            )[0].mean()

        g = jax.jit(jax.grad(f))(pc)
        assert np.isfinite(np.asarray(g)).all(), name
    big = jnp.array([500.0, -500.0], jnp.bfloat16)
    per, _, _ = losses.dpo_loss(
        big, -big, jnp.zeros(2, jnp.bfloat16), jnp.zeros(2, jnp.bfloat16), beta=1.0
    )
    assert per.dtype == jnp.float32 and np.isfinite(np.asarray(per)).all()
    np.testing.assert_allclose(np.asarray(per), [0.0, 1000.0], rtol=1e-3)


def test_reward_loss_with_margin_and_centering():
    rc, rr = np.array([1.0, -0.5, 2.0]), np.array([0.2, 0.5, -1.0])
    margin = np.array([0.1, 0.0, 1.0])
    got = float(
        losses.reward_loss(
            jnp.asarray(rc),
            jnp.asarray(rr),
            margin=jnp.asarray(margin),
            center_rewards_coefficient=0.01,
        )
    )
    want = np.mean([-ls(a - b - m) for a, b, m in zip(rc, rr, margin, strict=True)])
    want += 0.01 * np.mean((rc + rr) ** 2)
    assert got == pytest.approx(want, rel=1e-12)
    assert float(losses.reward_loss(jnp.zeros(3), jnp.zeros(3))) == pytest.approx(LOG2)


def test_simpo_and_orpo_match_their_equations():
    pc, pr, _, _, lc, lr = _inputs(6)
    per, rc, rr = (
        np.asarray(x)
        for x in losses.simpo_loss(
            jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(lc), jnp.asarray(lr), beta=2.0, gamma=0.5
        )
    )
    want = [-ls(2.0 * a / m - 2.0 * b / n - 0.5) for a, b, m, n in zip(pc, pr, lc, lr, strict=True)]
    np.testing.assert_allclose(per, want, rtol=1e-10)
    np.testing.assert_allclose(rc, 2.0 * pc / lc, rtol=1e-12)

    pc, pr = pc / 10, pr / 10  # keep per-token probabilities away from 0 and 1
    per, rc, rr = (
        np.asarray(x)
        for x in losses.orpo_loss(
            jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(lc), jnp.asarray(lr), beta=0.1
        )
    )
    nll = -pc.sum() / lc.sum()

    def log_odds(logp, n):
        p = math.exp(logp / n)
        return math.log(p / (1 - p))

    want = [
        nll - 0.1 * ls(log_odds(a, m) - log_odds(b, n))
        for a, b, m, n in zip(pc, pr, lc, lr, strict=True)
    ]
    np.testing.assert_allclose(per, want, rtol=1e-10)
    np.testing.assert_allclose(rr, 0.1 * pr / lr, rtol=1e-12)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired", "sigmoid", "sft"])
def test_padding_pairs_change_nothing(loss_type):
    """A batch with padding pairs (mask False) gives the real pairs' losses, also when sorting."""
    pc, pr, rc, rr, lc, lr = _inputs(7, n=4)
    kw = {"beta": 0.2, "label_smoothing": 0.05 if loss_type.startswith("aot") else 0.0}
    real, _, _ = _dpo(loss_type, pc[:3], pr[:3], rc[:3], rr[:3], lc[:3], lr[:3], **kw)
    # Padding rows with extreme values that would sort first if not handled.
    pad = np.array([-1e4])
    padded = losses.dpo_loss(
        *(jnp.asarray(np.concatenate([x[:3], pad])) for x in (pc, pr, rc, rr)),
        loss_type=loss_type,
        chosen_lengths=jnp.asarray(np.append(lc[:3], 0.0)),
        rejected_lengths=jnp.asarray(np.append(lr[:3], 0.0)),
        mask=jnp.array([True, True, True, False]),
        **kw,
    )[0]
    assert float(padded[3]) == 0.0
    np.testing.assert_allclose(np.asarray(padded[:3]), real, rtol=1e-10)
