"""Symmetric InfoNCE and the shared score-matrix helpers against plain numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unialign_jax.losses import diagonal_log_softmax, info_nce, l2_normalize


def numpy_info_nce(a, b, log_logit_scale):
    a = a / np.sqrt((a * a).sum(1, keepdims=True))
    b = b / np.sqrt((b * b).sum(1, keepdims=True))
    logits = min(math.exp(log_logit_scale), 100.0) * a @ b.T
    n = len(a)
    a_to_b = -np.mean([logits[i, i] - np.log(np.exp(logits[i, :]).sum()) for i in range(n)])
    b_to_a = -np.mean([logits[i, i] - np.log(np.exp(logits[:, i]).sum()) for i in range(n)])
    accuracy_a_to_b = np.mean([np.argmax(logits[i, :]) == i for i in range(n)])
    accuracy_b_to_a = np.mean([np.argmax(logits[:, i]) == i for i in range(n)])
    return (a_to_b + b_to_a) / 2, accuracy_a_to_b, accuracy_b_to_a


def test_info_nce_matches_numpy(precision):
    dtype, rtol = precision
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 5)).astype(dtype)
    b = (a + rng.normal(size=(6, 5))).astype(dtype)
    log_scale = math.log(1 / 0.07)
    loss, metrics = jax.jit(info_nce)(jnp.asarray(a), jnp.asarray(b), jnp.asarray(log_scale, dtype))
    expected, accuracy_a_to_b, accuracy_b_to_a = numpy_info_nce(
        a.astype(np.float64), b.astype(np.float64), log_scale
    )
    assert loss.dtype == dtype
    np.testing.assert_allclose(loss, expected, rtol=rtol)
    np.testing.assert_allclose(metrics["accuracy_a_to_b"], accuracy_a_to_b)
    np.testing.assert_allclose(metrics["accuracy_b_to_a"], accuracy_b_to_a)
    np.testing.assert_allclose(metrics["logit_scale"], 1 / 0.07, rtol=rtol)


def test_info_nce_clamps_logit_scale_at_100_without_gradient():
    rng = np.random.default_rng(1)
    a, b = jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray(rng.normal(size=(4, 3)))
    loss_fn = jax.jit(lambda s: info_nce(a, b, s)[0])
    np.testing.assert_allclose(loss_fn(jnp.log(1000.0)), loss_fn(jnp.log(100.0)), rtol=1e-6)
    grad_fn = jax.jit(jax.grad(loss_fn))
    assert grad_fn(jnp.log(1000.0)) == 0.0
    assert grad_fn(jnp.log(10.0)) != 0.0


def test_info_nce_is_near_zero_for_perfectly_separated_pairs():
    embeddings = jnp.eye(4) * 3.0  # orthogonal: after normalisation, logits 100 on the diagonal, 0 off it
    loss, metrics = info_nce(embeddings, embeddings, jnp.log(100.0))
    assert loss < 1e-6
    assert metrics["accuracy_a_to_b"] == 1.0 and metrics["accuracy_b_to_a"] == 1.0


def test_l2_normalize_has_finite_gradient_at_zero():
    gradient = jax.grad(lambda x: jnp.sum(l2_normalize(x)))(jnp.zeros((2, 3)))
    assert np.all(np.isfinite(gradient))


def test_diagonal_log_softmax_rejects_other_axes():
    with pytest.raises(ValueError, match="axis -1 or -2"):
        diagonal_log_softmax(jnp.zeros((2, 3, 3)), axis=0)
