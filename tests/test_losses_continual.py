"""COMET gate load-balancing loss (Eq. 4-5) and EWC penalty (Eq. 6) against plain numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unialign_jax.losses import continual as continual_losses
from unialign_jax.losses import ewc_penalty, gate_load_balance_loss


def random_router_probs(shape, dtype, seed):
    logits = np.random.default_rng(seed).normal(size=shape) * 2
    return (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(dtype)


def test_gate_loss_matches_paper_formula(precision):
    """Unmasked softmax rows: I = B/U exactly as the paper writes it."""
    dtype, rtol = precision
    probs = random_router_probs((10, 6), dtype, seed=0)
    batch, experts = probs.shape
    loads = probs.astype(np.float64).sum(0)
    expected = np.mean([(loads[j] / (batch / experts) - 1) ** 2 for j in range(experts)])
    np.testing.assert_allclose(jax.jit(gate_load_balance_loss)(probs), expected, rtol=rtol)


def test_gate_loss_with_mask_and_token_axes_is_population_cv_squared(precision):
    dtype, rtol = precision
    probs = random_router_probs((3, 4, 6), dtype, seed=1)  # per-token routing [B, L, U]
    mask = np.random.default_rng(2).uniform(size=(3, 4)) > 0.3
    loads = probs[mask].astype(np.float64).sum(0)
    expected = np.var(loads) / np.mean(loads) ** 2
    np.testing.assert_allclose(jax.jit(gate_load_balance_loss)(probs, mask), expected, rtol=rtol)


def test_gate_loss_behaviour():
    assert gate_load_balance_loss(jnp.full((8, 4), 0.25)) == 0.0
    probs = jnp.asarray(random_router_probs((5, 3), np.float32, seed=3))
    loss, gradient = jax.jit(jax.value_and_grad(gate_load_balance_loss))(probs, jnp.zeros(5, bool))
    assert loss == 0.0 and np.all(gradient == 0), "no counted row: zero loss, zero (finite) gradient"
    one_hot = jnp.eye(3)[jnp.array([0, 0, 0, 0])]
    # loads (4, 0, 0), ideal 4/3: ((3 − 1)² + 1 + 1) / 3 = 2
    np.testing.assert_allclose(gate_load_balance_loss(one_hot), 2.0, rtol=1e-6)


def test_ewc_penalty_matches_numpy_over_a_sub_tree(precision):
    dtype, rtol = precision
    rng = np.random.default_rng(4)
    params = {
        "moe": {"common": {"kernel": rng.normal(size=(3, 4)), "bias": rng.normal(size=(4,))},
                "video": {"kernel": rng.normal(size=(3, 4))}},
        "decoder": {"kernel": rng.normal(size=(4, 2))},
    }
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    # The anchor and Fisher cover the MoE sub-tree only, not "decoder".
    anchor = {"moe": jax.tree.map(lambda p: p + rng.normal(size=p.shape).astype(dtype), params["moe"])}
    fisher = jax.tree.map(lambda p: rng.uniform(size=p.shape).astype(dtype), anchor)
    strength = 3.0
    expected = 0.0
    for expert, layer in (("common", "kernel"), ("common", "bias"), ("video", "kernel")):
        theta = params["moe"][expert][layer].astype(np.float64)
        theta_star = anchor["moe"][expert][layer].astype(np.float64)
        expected += np.sum(fisher["moe"][expert][layer].astype(np.float64) * (theta - theta_star) ** 2)
    expected *= strength / 2
    result = jax.jit(ewc_penalty)(params, anchor, fisher, strength)
    np.testing.assert_allclose(result, expected, rtol=rtol)


def test_ewc_penalty_is_zero_at_anchor_and_only_pulls_covered_parameters():
    params = {"common": jnp.arange(4.0), "specific": jnp.ones(3)}
    fisher = {"common": jnp.array([1.0, 0.0, 2.0, 0.5])}
    anchor = {"common": params["common"]}
    assert ewc_penalty(params, anchor, fisher, 10.0) == 0.0
    moved = {"common": params["common"] + 1.0, "specific": params["specific"] + 1.0}
    gradient = jax.grad(ewc_penalty)(moved, anchor, fisher, 10.0)
    np.testing.assert_allclose(gradient["common"], 10.0 * fisher["common"] * 1.0)  # λ F (θ − θ*)
    assert np.all(gradient["specific"] == 0)
    assert ewc_penalty(params, {}, {}, 10.0) == 0.0


def test_ewc_penalty_names_mismatched_trees():
    params = {"common": jnp.zeros(4)}
    with pytest.raises(KeyError, match="other"):
        ewc_penalty(params, {"other": jnp.zeros(4)}, {"other": jnp.zeros(4)}, 1.0)
    with pytest.raises(ValueError, match="shapes differ"):
        ewc_penalty(params, {"common": jnp.zeros(3)}, {"common": jnp.zeros(3)}, 1.0)
    with pytest.raises(ValueError, match="same tree structure"):
        ewc_penalty(params, {"common": jnp.zeros(4)}, {"common": jnp.zeros(4), "x": jnp.zeros(1)}, 1.0)


def test_empirical_fisher_is_the_mean_of_squared_micro_batch_gradients(precision):
    """Least squares L_n(w) = ½ mean_i (w·x_ni − y_ni)², so g_n = mean_i (w·x_ni − y_ni) x_ni by hand."""
    dtype, rtol = precision
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(6, 2, 3)).astype(dtype), rng.normal(size=(6, 2)).astype(dtype)  # 6 micro-batches of 2
    w = rng.normal(size=3).astype(dtype)

    def grad_fn(micro_batch):
        return {"w": jax.grad(lambda w: 0.5 * jnp.mean((micro_batch["x"] @ w - micro_batch["y"]) ** 2))(w)}

    residual = np.einsum("nid,d->ni", x.astype(np.float64), w) - y
    per_micro_batch = np.einsum("ni,nid->nd", residual, x.astype(np.float64)) / 2
    fisher = jax.jit(continual_losses.empirical_fisher, static_argnums=0)(grad_fn, {"x": x, "y": y})
    np.testing.assert_allclose(fisher["w"], np.mean(per_micro_batch**2, axis=0), rtol=rtol)
    assert np.all(np.asarray(fisher["w"]) > np.mean(per_micro_batch, axis=0) ** 2)  # not the squared mean


def test_fisher_magnitude_and_feature_distillation_against_numpy():
    fisher = {"a": jnp.array([[1.0, 4.0]]), "b": {"c": jnp.array([0.5])}}
    magnitude = continual_losses.fisher_magnitude(fisher)
    np.testing.assert_allclose([magnitude["mean"], magnitude["max"]], [5.5 / 3, 4.0], rtol=1e-6)
    assert continual_losses.fisher_magnitude({})["max"] == 0
    rng = np.random.default_rng(6)
    student, teacher = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    expected = np.sum((student.astype(np.float64) - teacher) ** 2) / student.size
    np.testing.assert_allclose(continual_losses.feature_distillation_loss(student, teacher), expected, rtol=1e-6)
    gradient = jax.grad(lambda t: continual_losses.feature_distillation_loss(jnp.asarray(student), t))(teacher)
    assert np.all(gradient == 0)  # the teacher is a constant
    with pytest.raises(ValueError, match="differ in shape"):
        continual_losses.feature_distillation_loss(student, teacher[:, :2])
