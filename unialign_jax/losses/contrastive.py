"""Symmetric InfoNCE (CLIP) and the score-matrix helpers shared by every contrastive loss here.

A score matrix `scores[..., i, j]` pairs row item i with column item j; the positive pair of row i
is column i. `axis=-1` normalises each row over the columns j, `axis=-2` each column over the rows i.
"""

import chex
import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||_2, eps) along `axis` (torch `F.normalize`); finite gradient at x = 0."""
    squared_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, eps * eps))


def diagonal_log_softmax(scores: jax.Array, axis: int = -1) -> jax.Array:
    """log_softmax(scores, axis)[..., i, i]: log-probability of each positive pair, shape [..., N]."""
    if axis not in (-1, -2):
        raise ValueError(f"diagonal_log_softmax normalises over axis -1 or -2, got {axis}.")
    return jnp.diagonal(jax.nn.log_softmax(scores, axis=axis), axis1=-2, axis2=-1)


def diagonal_top1_accuracy(scores: jax.Array, axis: int = -1) -> jax.Array:
    """Fraction of items whose arg-max along `axis` is their positive (the diagonal entry)."""
    hits = jnp.argmax(scores, axis=axis) == jnp.arange(scores.shape[axis])
    return jnp.mean(hits.astype(jnp.float32))


def info_nce(
        embeddings_a: jax.Array,
        embeddings_b: jax.Array,
        log_logit_scale: jax.Array | float,
        max_logit_scale: float = 100.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Symmetric CLIP loss (UniAlign's L_NCE, Eq. 16) over N paired rows of `a` [N, D] and `b` [N, D].

    s = min(exp(log_logit_scale), max_logit_scale); logits = s · â b̂ᵀ with â, b̂ L2-normalised rows;
    L = ½ [CE_rows(logits) + CE_cols(logits)], each CE the mean over N of −log softmax at the diagonal.

    `log_logit_scale` is CLIP's learnable parameter (init log(1/0.07)); a fixed temperature τ is
    `log_logit_scale = −log τ`. CLIP clamps the parameter in place to ≤ log 100 after each optimizer
    step; here the forward clamps instead (same value, zero gradient above the cap). ViT-Lens's
    tri-modal loss is the sum of two calls, (x, image) + (x, text).

    Returns (loss, metrics) with per-direction losses and top-1 accuracies and the used scale.
    Rows of other ranks or unequal shapes raise at trace time (`chex`).
    """
    chex.assert_rank([embeddings_a, embeddings_b], 2)
    chex.assert_equal_shape([embeddings_a, embeddings_b])
    logit_scale = jnp.minimum(jnp.exp(log_logit_scale), max_logit_scale)
    logits = logit_scale * l2_normalize(embeddings_a) @ l2_normalize(embeddings_b).T
    loss_a_to_b = -jnp.mean(diagonal_log_softmax(logits, axis=-1))
    loss_b_to_a = -jnp.mean(diagonal_log_softmax(logits, axis=-2))
    metrics = {
            "loss_a_to_b": loss_a_to_b,
            "loss_b_to_a": loss_b_to_a,
            "accuracy_a_to_b": diagonal_top1_accuracy(logits, axis=-1),
            "accuracy_b_to_a": diagonal_top1_accuracy(logits, axis=-2),
            "logit_scale": logit_scale,
    }
    return 0.5 * (loss_a_to_b + loss_b_to_a), metrics

