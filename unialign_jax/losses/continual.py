"""Continual-learning losses: CMoE gate load balancing (COMET Eq. 4-5), the EWC penalty (Eq. 6) and
its empirical Fisher, and feature distillation from a stage-start encoder (LwF-style, beyond COMET)."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def gate_load_balance_loss(router_probs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """COMET load-balancing loss L_gate (Eq. 5) from the router's softmax outputs G (Eq. 4).

    router_probs: [..., U] gate values G_ij of each routed item i (all leading axes are flattened,
    so per-token routing [B, L, U] works as well as per-sample [B, U]); mask: optional [...] bool,
    False rows are excluded.

      L_j = Σ_i G_ij  (summed probabilities: differentiable, unlike hard counts),
      I   = Σ_j L_j / U,
      L_gate = (1/U) Σ_j (L_j / I − 1)²  =  Var_pop(L) / mean(L)².

    The paper writes I = B/U, which is the same when every row sums to 1. The variance is the
    population one (÷U), unlike the unbiased `cv_squared` of LoRAMoE. Returns 0 when no row is counted.
    """
    num_experts = router_probs.shape[-1]
    probs = router_probs.reshape(-1, num_experts)
    if mask is not None:
        probs = probs * mask.reshape(-1, 1).astype(probs.dtype)
    loads = jnp.sum(probs, axis=0)
    ideal_load = jnp.sum(loads) / num_experts
    has_load = ideal_load > 0
    relative = loads / jnp.where(has_load, ideal_load, 1.0)
    return jnp.where(has_load, jnp.mean(jnp.square(relative - 1.0)), 0.0)


def ewc_penalty(params: Any, anchor: Any, fisher: Any, strength: float | jax.Array) -> jax.Array:
    """Elastic Weight Consolidation penalty (COMET Eq. 6): (λ/2) Σ_i F_i (θ_i − θ*_i)².

    Tree contract: `fisher` (diagonal Fisher F) and `anchor` (θ*, the parameters after the previous
    stage) have the same structure, a sub-tree of `params` matched by key path: every leaf of
    `fisher` names a leaf of `params` with the same shape, e.g. fisher = {"moe": {"common": {"kernel": F}}}
    for params = {"moe": {"common": {"kernel": θ, "bias": b}}, "decoder": {...}}. Parameters absent
    from `fisher` contribute 0 (COMET restricts the penalty to the common and activated
    modality-specific expert layers by what it puts in the Fisher; an adaptive per-expert scaling
    belongs in F too). Fisher and anchor are constants: no gradient flows into them.

    Returns λ/2 · Σ over fisher leaves of Σ F·(θ − θ*)².
    """
    if jax.tree.structure(anchor) != jax.tree.structure(fisher):
        raise ValueError(
            "EWC anchor and fisher must have the same tree structure, got "
            f"{jax.tree.structure(anchor)} and {jax.tree.structure(fisher)}."
        )
    params_by_path = {
        jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }
    fisher_leaves = jax.tree_util.tree_leaves_with_path(fisher)
    total = 0.0
    for (path, importance), reference in zip(fisher_leaves, jax.tree.leaves(anchor)):
        name = jax.tree_util.keystr(path)
        if name not in params_by_path:
            raise KeyError(f"EWC fisher leaf {name} has no matching parameter.")
        value = params_by_path[name]
        if value.shape != importance.shape or value.shape != reference.shape:
            raise ValueError(
                f"EWC shapes differ at {name}: param {value.shape}, anchor {reference.shape}, "
                f"fisher {importance.shape}."
            )
        importance, reference = jax.lax.stop_gradient((importance, reference))
        total = total + jnp.sum(importance * jnp.square(value - reference))
    return jnp.asarray(0.5 * strength * total)


def empirical_fisher(grad_fn: Callable[[Any], Any], micro_batches: Any) -> Any:
    """Diagonal empirical Fisher from N micro-batches: F = (1/N) Σ_n g_n ⊙ g_n, g_n = ∇L(micro-batch n).

    `micro_batches` is a pytree whose leaves share a leading axis of length N; `grad_fn(one)` maps one
    micro-batch (the leaves without that axis) to a gradient tree. The squares are taken before the
    mean, so F measures how strongly each parameter's gradient varies over the data, unlike the square
    of one batch-mean gradient ((1/N Σ_n g_n)², ~N times smaller for independent noise). With
    micro-batches of m examples of a mean loss, F ≈ μ² + σ²/m (μ, σ² the per-example gradient's mean
    and variance). The micro-batches run one after another (`lax.scan`), so memory is one gradient.
    """
    first = jax.tree.map(lambda x: x[0], micro_batches)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(grad_fn, first))

    def add_square(total, micro_batch):
        return jax.tree.map(lambda t, g: t + jnp.square(g), total, grad_fn(micro_batch)), None

    total, _ = jax.lax.scan(add_square, zeros, micro_batches)
    count = jax.tree.leaves(micro_batches)[0].shape[0]
    return jax.tree.map(lambda t: t / count, total)


def fisher_magnitude(fisher: Any) -> dict[str, jax.Array]:
    """Scale of a Fisher tree: `mean` = Σ_i F_i / n and `max` = max_i F_i over all n entries (0 if empty)."""
    leaves = [jnp.ravel(leaf) for leaf in jax.tree.leaves(fisher)]
    if not leaves:
        return {"mean": jnp.zeros(()), "max": jnp.zeros(())}
    values = jnp.concatenate(leaves)
    return {"mean": jnp.mean(values), "max": jnp.max(values)}


def feature_distillation_loss(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """Feature distillation from a frozen teacher (LwF-style): (1/(B·T·D)) Σ_{b,t,d} (s_btd − sg(t_btd))².

    student: [..., D] features of the encoder being trained; teacher: the same inputs' features from a
    frozen copy (e.g. the mediator encoder at the start of the stage); no gradient flows into it.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student features {student.shape} and teacher features {teacher.shape} differ in shape.")
    return jnp.mean(jnp.square(student - jax.lax.stop_gradient(teacher)))
