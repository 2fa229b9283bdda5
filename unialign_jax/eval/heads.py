"""Small downstream heads trained on frozen features (CMG protocol), with optax.

The heads follow the reference CMG code (`haihuangcode/CMG`, `code/src/model/main_model_2.py:121-145`):

- `ClassificationHead` = `Semantic_Decoder`: Dense(D -> H), max over time, Dense(H -> classes).
- `LocalisationHead` = `Semantic_Decoder_AVVP`: Dense(D -> H), Dense(H -> classes) at every time step.

Neither has an activation between the two layers (as in the reference; the max over time is the only
non-linearity of the classification head, and the localisation head is a linear classifier).

Training (`train_head`) is one jitted function: the whole run (initialisation, an epoch-wise
shuffled index schedule and a `lax.scan` over Adam steps) is a single XLA computation, compiled once
per (head, config, feature shape, target shape) and reused for every modality with those shapes.
`predict` applies a head in fixed-size chunks, so it compiles once per (head, chunk shape) whatever
the number of examples.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class ClassificationHead(nn.Module):
    """Sequence classifier: `logits = W2 · max_t(W1 · x_t + b1) + b2` (reference `Semantic_Decoder`)."""

    num_classes: int
    hidden_dim: int = 256

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        """features: float[B, T, D] -> logits float[B, num_classes]."""
        hidden = nn.Dense(self.hidden_dim, name="hidden")(features)
        return nn.Dense(self.num_classes, name="classifier")(hidden.max(axis=1))


class LocalisationHead(nn.Module):
    """Per-step classifier: `logits_t = W2 · (W1 · x_t + b1) + b2` (reference `Semantic_Decoder_AVVP`)."""

    num_classes: int
    hidden_dim: int = 256

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        """features: float[B, T, D] -> logits float[B, T, num_classes]."""
        hidden = nn.Dense(self.hidden_dim, name="hidden")(features)
        return nn.Dense(self.num_classes, name="classifier")(hidden)


@dataclasses.dataclass(frozen=True)
class HeadTrainConfig:
    """How a downstream head is trained and applied (hashable: it is a static jit argument).

    With the defaults a head on N=2000 sequences of T=10 x D=256 trains in ~0.5 s on a 2-core CPU
    (plus ~1.3 s for the one compilation; measured with the classification head).
    Reference (CMG `ave.py`): Adam lr 4e-4, batch 80, gradient clip 0.5, 30 epochs with MultiStepLR
    [10, 20, 30] x 0.5. Here: Adam at a constant rate for a fixed number of steps (no epoch selection
    on the test modality, see `cross_modal.py`).
    """

    learning_rate: float = 1e-3
    steps: int = 400
    batch_size: int = 64
    grad_clip_norm: float = 0.5  # global norm over the head's parameters, as `clip_grad_norm_` in the reference
    hidden_dim: int = 256
    eval_batch_size: int = 512
    seed: int = 0


def masked_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy over the entries whose target is >= 0.

    logits: float[..., C]; targets: int[...] with negative values marking ignored entries (padding).
    `L = -Σ_i m_i log softmax(logits_i)[y_i] / max(Σ_i m_i, 1)`, `m_i = [y_i >= 0]`.
    """
    valid = targets >= 0
    per_entry = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, targets, 0))
    return jnp.sum(per_entry * valid) / jnp.maximum(jnp.sum(valid), 1)


def _index_schedule(key: jax.Array, num_examples: int, steps: int, batch_size: int) -> jax.Array:
    """int[steps, batch_size]: consecutive batches of a sequence of fresh random permutations (epochs)."""
    num_epochs = math.ceil(steps * batch_size / num_examples)
    permutations = jax.vmap(lambda k: jax.random.permutation(k, num_examples))(jax.random.split(key, num_epochs))
    return permutations.reshape(-1)[: steps * batch_size].reshape(steps, batch_size)


@functools.partial(jax.jit, static_argnames=("head", "config"))
def _fit_head(head: nn.Module, config: HeadTrainConfig, features: jax.Array, targets: jax.Array):
    features, targets = features.astype(jnp.float32), targets.astype(jnp.int32)
    init_key, order_key = jax.random.split(jax.random.key(config.seed))
    params = head.init(init_key, features[:1])["params"]
    optimizer = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optax.adam(config.learning_rate))
    batches = _index_schedule(order_key, features.shape[0], config.steps, config.batch_size)

    def loss_fn(params, batch_features, batch_targets):
        return masked_cross_entropy(head.apply({"params": params}, batch_features), batch_targets)

    def step(carry, batch_indices):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, features[batch_indices], targets[batch_indices])
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), batches)
    return params, losses


def train_head(
    head: nn.Module, features: jax.Array, targets: jax.Array, config: HeadTrainConfig = HeadTrainConfig()
) -> tuple[dict, jax.Array]:
    """Trains `head` on frozen `features` with masked softmax cross-entropy and Adam.

    features: float[N, T, D]; targets: int[N] for `ClassificationHead` or int[N, T] for
    `LocalisationHead` (negative = ignored). Minibatches are drawn without replacement within each
    epoch (a fresh permutation per epoch, seeded by `config.seed`).

    Returns (params, losses float[config.steps]), the per-step training loss.
    """
    features_shape, targets_shape = np.shape(features), np.shape(targets)
    if len(features_shape) != 3:
        raise ValueError(f"head features must be float[N, T, D], got shape {features_shape}")
    if targets_shape[:1] != features_shape[:1]:
        raise ValueError(f"targets {targets_shape} do not match {features_shape[0]} feature sequences")
    return _fit_head(head, config, features, targets)


@functools.partial(jax.jit, static_argnames=("head",))
def _apply_head(head: nn.Module, params: dict, features: jax.Array) -> jax.Array:
    return head.apply({"params": params}, features)


def predict(
    head: nn.Module, params: dict, features: jax.Array, config: HeadTrainConfig = HeadTrainConfig()
) -> np.ndarray:
    """Logits of `head` on features float[N, T, D], computed in chunks of `config.eval_batch_size`.

    The last chunk is zero-padded so every call has the same shape (one compile per head and T, D).
    """
    features = np.asarray(features, np.float32)
    num_examples, chunk = features.shape[0], config.eval_batch_size
    logits = []
    for start in range(0, num_examples, chunk):
        block = features[start : start + chunk]
        padded = np.pad(block, [(0, chunk - block.shape[0])] + [(0, 0)] * (block.ndim - 1))
        logits.append(np.asarray(_apply_head(head, params, padded))[: block.shape[0]])
    return np.concatenate(logits, axis=0)
