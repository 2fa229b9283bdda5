"""Vector quantizer with a growable codebook, multimodal EMA (MM-EMA) and dead-code restarts.

The codebook is the CMG/DCID quantizer (`haihuangcode/CMG`, `main_model_2.py:627-823` tri-modal,
`Cross_VQEmbeddingEMA` bimodal) rewritten for a static-shape, jit-able JAX state, plus the pieces
COMET needs between stages (codebook growth, data-driven rows for new codes, pseudo-modality replay).

State (flax collection `quantizer`, never a param, never seen by the optimizer):

| name           | shape / dtype | meaning                                                          |
|----------------|---------------|------------------------------------------------------------------|
| `embedding`    | f32[C, D]     | code vectors e_k used by the nearest-code search                 |
| `ema_weight`   | f32[C, D]     | EMA sum of the features assigned to code k, W_k                  |
| `ema_count`    | f32[C]        | Laplace-smoothed EMA assignment count N_k                        |
| `unused_steps` | int32[C]      | training steps since code k was last chosen (-1 = fresh code)    |
| `active_count` | int32[]       | codes [0, active_count) are active, the others are not yet used  |
| `owned`        | bool[C]       | optional: codes reserved for modalities absent from this stage   |

C = `codebook_capacity` is static and `active_count` dynamic, so growth inside the capacity changes
no shape (no recompilation). Inactive codes never win a nearest-code search, never receive EMA
statistics, and are never restart sources or targets.

Training step (`update=True`), in the reference order:

1. Assignments from the PRE-update codebook, k_m = argmin over active codes of ||z_m − e_k||², for
   every present modality; `code_vectors` and `quantized` use these pre-update rows.
2. Sequential MM-EMA: one update per present modality m, in the order `mm_ema_update_order`
   gives (by default the reference's: audio, video, text, then any other modality in `modalities`
   order; the field `ema_order` changes it),
       N ← γ·N + (1−γ)·Σ_{b,t} onehot(k_m)
       N ← (N + ε) / (Σ_active N + M·ε) · Σ_active N                  (Laplace smoothing)
       W ← γ·W + (1−γ)·onehot(k_m)ᵀ·[w_own·z_m + Σ_o w_o·z_o]         (z stop-gradient)
       e ← W / N
   where o runs over the OTHER present modalities at the same (b, t), w_own = `own_feature_weight`
   (0.5) and the rest is split equally: 0.5/0.5 bimodal, 0.5/0.25/0.25 trimodal (the reference's
   weights); a lone modality gets weight 1. γ is applied once per modality, i.e. γ^P per step, which
   is not the same as one combined update, and the order matters: W gets the last-updated
   modality's batch sum with weight (1−γ), the one before it with γ(1−γ), and so on (N likewise,
   up to the smoothing). Only active rows change.
3. Dead codes: `unused_steps += 1`; codes chosen by any modality in this batch → 0; codes with
   `unused_steps > dead_code_steps` are restarted (counter → 0) onto a uniformly random "activated"
   code (`0 <= unused_steps < active_code_steps`) of the POST-update codebook plus
   U(−restart_noise, restart_noise) noise. If no code is activated, nothing is restarted that step.
   The random numbers come from the flax rng stream `quantizer`: `update=True` needs
   `rngs={"quantizer": key}`.

Owned codes (optional `owned` entry, COMET continual runs with `continual.own_codes`; absent = no
code owned): an owned code is still chosen by the nearest-code search of every modality, but neither
the MM-EMA nor a restart changes it (its `embedding`, `ema_weight` and `ema_count` stay as they are;
the Laplace smoothing runs over the active codes that are not owned). Which codes are owned is
decided between stages (`methods.cmg.continual.owned_codes`): those that a modality absent from the
stage, whose encoder is frozen, still maps its data to.

Deviations from the reference, all deliberate:

- Laplace smoothing uses M = the number of ACTIVE codes and sums N over the active codes. The
  reference has no inactive codes (M = C); with `active_count == codebook_capacity` both agree.
- The dead-code counter and restarts run only with `update=True`. The reference also counts (and
  restarts) in evaluation forwards; here evaluation never changes the model.
- Distances and argmin are float32 with `Precision.HIGHEST` matmuls; the reference is float64, so
  near-ties can break differently.

Reference behaviour kept on purpose (traps):

- `unused_steps` starts at −1 as in the reference, so the first step brings it to 0.
- A restart writes only `embedding` (default `reset_ema_on_restart=False`). The next EMA step
  recomputes `embedding = W / N` from the untouched statistics, so the restart survives only if the
  code is chosen in the very next batch (then W/N ≈ the mean of its new features, because N of a
  dead code is ≈ ε). `reset_ema_on_restart=True` also sets N to the mean active N and W = e·N, so
  W/N is the restarted vector and the restart persists (different dynamics).
- The initial `ema_count` is 0, so codes unused in the first step get N ≈ ε and their embedding jumps
  to W/N with norm ~1e2-1e3 (D = 256). Rows added later by `grow_codebook` get stable statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

QUANTIZER_COLLECTION = "quantizer"
RNG_STREAM = "quantizer"
# State entries whose leading axis is the codebook capacity.
_PER_CODE_STATE = ("embedding", "ema_weight", "ema_count", "unused_steps")
_FRESH_CODE = -1  # `unused_steps` of a code that has not seen a training step yet.
_HIGHEST = jax.lax.Precision.HIGHEST
# The reference's MM-EMA order (`Cross_VQEmbeddingEMA_AVT`, `_AT` and the AV `Cross_VQEmbeddingEMA`
# all update audio first, then video, then text).
REFERENCE_EMA_ORDER = ("audio", "video", "text")


@flax.struct.dataclass
class QuantizerOutput:
    """What `VectorQuantizer` returns; every dict is keyed by the present modalities.

    Attributes:
        quantized: straight-through z + sg(q − z), [B, T, D]: value q, identity gradient to z.
        code_vectors: q, the chosen codebook rows from BEFORE this step's update, [B, T, D].
        codes: int32 [B, T] chosen code indices (always < active_count).
        squared_distances: [B, T, C] ||z||² + ||e||² − 2 z·e, differentiable w.r.t. the features.
            Entries of inactive codes are finite but meaningless: mask them with `active_mask`.
        active_mask: bool [C], True for the codes [0, active_count).
    """

    quantized: dict[str, jax.Array]
    code_vectors: dict[str, jax.Array]
    codes: dict[str, jax.Array]
    squared_distances: dict[str, jax.Array]
    active_mask: jax.Array


def squared_distances_to_codes(features: jax.Array, codebook: jax.Array) -> jax.Array:
    """||z||² + ||e||² − 2 z·e for features [..., D] and a codebook [C, D] -> [..., C].

    The expanded form (as in the reference) can be slightly negative in float32: clamp at 0 before
    a square root.
    """
    cross = jnp.einsum("...d,cd->...c", features, codebook, precision=_HIGHEST)
    return (
        jnp.sum(jnp.square(features), axis=-1, keepdims=True)
        + jnp.sum(jnp.square(codebook), axis=-1)
        - 2.0 * cross
    )


def _nearest_allowed(distances: jax.Array, allowed: jax.Array) -> jax.Array:
    """argmin over the last axis among the `allowed` [C] codes; ties go to the lowest index."""
    masked = jnp.where(allowed, jax.lax.stop_gradient(distances), jnp.inf)
    return jnp.argmin(masked, axis=-1).astype(jnp.int32)


def mm_ema_update_order(
    present: tuple[str, ...], ema_order: tuple[str, ...] = REFERENCE_EMA_ORDER
) -> tuple[str, ...]:
    """Order of the sequential MM-EMA updates over the `present` modalities.

    `ema_order` is a priority list: the present modalities it names come first, in its order; the
    other present modalities follow in their order in `present`. Names not present are ignored, so
    one list serves every stage of a continual run. Default: the reference's audio, video, text.
    """
    if len(set(ema_order)) != len(ema_order):
        raise ValueError(f"ema_order must name distinct modalities, got {ema_order}.")
    first = tuple(m for m in ema_order if m in present)
    return first + tuple(m for m in present if m not in first)


def _mm_ema_feature_weights(num_present: int, own_feature_weight: float) -> np.ndarray:
    """[P, P]: row m = weights of the present modalities' features in modality m's W update."""
    if num_present == 1:
        return np.ones((1, 1))
    weights = np.full((num_present, num_present), (1.0 - own_feature_weight) / (num_present - 1))
    np.fill_diagonal(weights, own_feature_weight)
    return weights


class VectorQuantizer(nn.Module):
    """Shared discrete codebook with sequential multimodal EMA updates (see the module docstring).

    Attributes:
        codebook_capacity: static number of rows C (changed only by `grow_codebook` reallocating).
        code_dim: feature and code dimension D.
        initial_active_codes: active codes after `init` (the reference's codebook size, 400).
        modalities: every modality this codebook may see; a call may pass any non-empty subset.
        ema_order: priority list of the sequential MM-EMA updates (see `mm_ema_update_order`):
            the modalities it names are updated first, in its order, the others after them in
            `modalities` order. Default `REFERENCE_EMA_ORDER` = (audio, video, text), the
            reference's order; names this codebook does not have are ignored.
        decay: EMA decay γ, applied once per present modality per step.
        epsilon: Laplace smoothing ε.
        own_feature_weight: weight of a modality's own features in its W update; the rest is shared
            equally by the other present modalities.
        dead_code_steps: a code unused for more than this many training steps is restarted.
        active_code_steps: codes used within this many steps are restart sources ("activated").
        restart_noise: half-width of the uniform noise added to a restarted code.
        reset_ema_on_restart: also reset N and W of restarted codes so that the restart persists.
            Default False = reference behaviour (see the restart trap in the module docstring).
    """

    codebook_capacity: int
    code_dim: int
    initial_active_codes: int
    modalities: tuple[str, ...]
    ema_order: tuple[str, ...] = REFERENCE_EMA_ORDER
    decay: float = 0.99
    epsilon: float = 1e-5
    own_feature_weight: float = 0.5
    dead_code_steps: int = 300
    active_code_steps: int = 100
    restart_noise: float = 1 / 1024
    reset_ema_on_restart: bool = False

    @nn.compact
    def __call__(self, features: Mapping[str, jax.Array], *, update: bool) -> QuantizerOutput:
        """Quantizes every present modality; `update=True` also runs MM-EMA and dead-code restarts.

        Args:
            features: {modality: float[B, T, D]}, paired across modalities at the same (b, t).
            update: training step; needs `mutable=["quantizer"]` and `rngs={"quantizer": key}`.
                With False the state is untouched. `init` never updates.

        Returns:
            QuantizerOutput (see its docstring).
        """
        present = self._present_modalities(features)
        capacity = self.codebook_capacity
        embedding = self.variable(QUANTIZER_COLLECTION, "embedding", self._init_embedding)
        ema_weight = self.variable(QUANTIZER_COLLECTION, "ema_weight", lambda: embedding.value)
        ema_count = self.variable(
            QUANTIZER_COLLECTION, "ema_count", lambda: jnp.zeros((capacity,), jnp.float32))
        unused_steps = self.variable(
            QUANTIZER_COLLECTION, "unused_steps",
            lambda: jnp.full((capacity,), _FRESH_CODE, jnp.int32))
        active_count = self.variable(
            QUANTIZER_COLLECTION, "active_count",
            lambda: jnp.asarray(self.initial_active_codes, jnp.int32))
        if embedding.value.shape != (capacity, self.code_dim):
            raise ValueError(
                f"quantizer state has embedding {embedding.value.shape}, the module expects "
                f"({capacity}, {self.code_dim}); after grow_codebook reallocated, rebuild the "
                "module with codebook_capacity = the new number of rows.")

        codebook = embedding.value
        active_mask = jnp.arange(capacity) < active_count.value
        updatable = active_mask
        if self.has_variable(QUANTIZER_COLLECTION, "owned"):
            updatable = active_mask & ~self.get_variable(QUANTIZER_COLLECTION, "owned")
        quantized, code_vectors, codes, squared_distances = {}, {}, {}, {}
        for modality in present:
            z = features[modality]
            distances = squared_distances_to_codes(z.astype(codebook.dtype), codebook)
            chosen = _nearest_allowed(distances, active_mask)
            vectors = jnp.take(codebook, chosen, axis=0)
            quantized[modality] = z + jax.lax.stop_gradient(vectors.astype(z.dtype) - z)
            code_vectors[modality] = vectors
            codes[modality] = chosen
            squared_distances[modality] = distances

        if update and not self.is_initializing():
            order = mm_ema_update_order(present, tuple(self.ema_order))
            flat_features = jnp.stack([
                jax.lax.stop_gradient(features[m]).reshape(-1, self.code_dim) for m in order
            ]).astype(codebook.dtype)
            flat_codes = jnp.stack([codes[m].reshape(-1) for m in order])
            state = {
                "embedding": codebook,
                "ema_weight": ema_weight.value,
                "ema_count": ema_count.value,
                "unused_steps": unused_steps.value,
            }
            state = _mm_ema_update(
                state, flat_features, flat_codes, updatable, jnp.sum(updatable),
                feature_weights=_mm_ema_feature_weights(len(present), self.own_feature_weight),
                decay=self.decay, epsilon=self.epsilon)
            state = _restart_dead_codes(
                state, flat_codes, active_mask, updatable, self.make_rng(RNG_STREAM),
                dead_code_steps=self.dead_code_steps, active_code_steps=self.active_code_steps,
                restart_noise=self.restart_noise, reset_ema_on_restart=self.reset_ema_on_restart)
            embedding.value = state["embedding"]
            ema_weight.value = state["ema_weight"]
            ema_count.value = state["ema_count"]
            unused_steps.value = state["unused_steps"]

        return QuantizerOutput(
            quantized=quantized, code_vectors=code_vectors, codes=codes,
            squared_distances=squared_distances, active_mask=active_mask)

    def _init_embedding(self) -> jax.Array:
        """Reference init U(±1/K), K = initial active codes; inactive rows are zero."""
        bound = 1.0 / self.initial_active_codes
        shape = (self.codebook_capacity, self.code_dim)
        rows = jax.random.uniform(self.make_rng("params"), shape, jnp.float32, -bound, bound)
        active = jnp.arange(self.codebook_capacity) < self.initial_active_codes
        return jnp.where(active[:, None], rows, 0.0)

    def _present_modalities(self, features: Mapping[str, jax.Array]) -> tuple[str, ...]:
        """The modalities of `features` in `modalities` order, after checking config and shapes."""
        if not 0 < self.initial_active_codes <= self.codebook_capacity:
            raise ValueError(f"initial_active_codes={self.initial_active_codes} must be in "
                             f"[1, codebook_capacity={self.codebook_capacity}].")
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be non-empty and distinct, got {self.modalities}.")
        if len(set(self.ema_order)) != len(tuple(self.ema_order)):
            raise ValueError(f"ema_order must name distinct modalities, got {self.ema_order}.")
        unknown = sorted(set(features) - set(self.modalities))
        if unknown:
            raise ValueError(f"features hold modalities {unknown} unknown to this codebook "
                             f"(modalities={self.modalities}).")
        present = tuple(m for m in self.modalities if m in features)
        if not present:
            raise ValueError(f"features is empty; expected a subset of {self.modalities}.")
        shapes = {m: tuple(features[m].shape) for m in present}
        first = shapes[present[0]]
        if len(first) != 3 or first[-1] != self.code_dim or len(set(shapes.values())) != 1:
            raise ValueError(f"every modality must be paired features [B, T, {self.code_dim}] of "
                             f"one shape; got {shapes}.")
        return present


def _mm_ema_update(
    state: dict[str, jax.Array],
    features: jax.Array,
    codes: jax.Array,
    active_mask: jax.Array,
    active_count: jax.Array,
    *,
    feature_weights: np.ndarray,
    decay: float,
    epsilon: float,
) -> dict[str, jax.Array]:
    """Sequential MM-EMA (module docstring, step 2); features [P, BT, D], codes [P, BT].

    The leading axis is the update order: row 0 is updated first. `feature_weights[m]` are the
    weights of the P feature rows in update m.
    """
    capacity = state["embedding"].shape[0]
    active_rows = active_mask[:, None]
    num_active = active_count.astype(features.dtype)
    count, weight = state["ema_count"], state["ema_weight"]
    for m in range(features.shape[0]):  # Static: one update per present modality, row order.
        one_hot = jax.nn.one_hot(codes[m], capacity, dtype=features.dtype)  # [BT, C]
        mixed = jnp.einsum("p,pnd->nd", feature_weights[m].astype(features.dtype), features)
        batch_sum = jnp.einsum("nc,nd->cd", one_hot, mixed, precision=_HIGHEST)  # [C, D]
        count = jnp.where(active_mask, decay * count + (1.0 - decay) * one_hot.sum(0), count)
        total = jnp.sum(jnp.where(active_mask, count, 0.0))
        smoothed = (count + epsilon) / (total + num_active * epsilon) * total
        count = jnp.where(active_mask, smoothed, count)
        weight = jnp.where(active_rows, decay * weight + (1.0 - decay) * batch_sum, weight)
    safe_count = jnp.where(active_mask, count, 1.0)
    embedding = jnp.where(active_rows, weight / safe_count[:, None], state["embedding"])
    return {**state, "embedding": embedding, "ema_weight": weight, "ema_count": count}


def _restart_dead_codes(
    state: dict[str, jax.Array],
    codes: jax.Array,
    active_mask: jax.Array,
    restartable: jax.Array,
    rng: jax.Array,
    *,
    dead_code_steps: int,
    active_code_steps: int,
    restart_noise: float,
    reset_ema_on_restart: bool,
) -> dict[str, jax.Array]:
    """Dead-code counter and restarts (module docstring, step 3), vectorised over the codes; only
    `restartable` [C] codes (the active ones that are not owned) can be restarted."""
    embedding = state["embedding"]
    capacity = embedding.shape[0]
    used = jnp.zeros((capacity,), bool).at[codes.reshape(-1)].set(True)
    unused = jnp.where(active_mask, state["unused_steps"] + 1, state["unused_steps"])
    unused = jnp.where(used, 0, unused)
    dead = restartable & (unused > dead_code_steps)
    sources = active_mask & (unused >= 0) & (unused < active_code_steps) & ~dead
    restart = dead & jnp.any(sources)

    source_rng, noise_rng = jax.random.split(rng)
    # One uniform draw among the sources for every code; only restarted codes use theirs.
    source = jax.random.categorical(
        source_rng, jnp.where(sources, 0.0, -jnp.inf), shape=(capacity,))
    noise = jax.random.uniform(
        noise_rng, embedding.shape, embedding.dtype, -restart_noise, restart_noise)
    embedding = jnp.where(restart[:, None], embedding[source] + noise, embedding)
    new_state = {**state, "embedding": embedding, "unused_steps": jnp.where(restart, 0, unused)}
    if reset_ema_on_restart:
        mean_count = jnp.sum(jnp.where(active_mask, state["ema_count"], 0.0)) / jnp.sum(active_mask)
        new_state["ema_count"] = jnp.where(restart, mean_count, state["ema_count"])
        new_state["ema_weight"] = jnp.where(
            restart[:, None], embedding * mean_count, state["ema_weight"])
    return new_state


def grow_codebook(
    state: Mapping[str, jax.Array],
    new_rows: jax.Array,
    *,
    new_code_count: float | None = None,
    capacity: int | None = None,
) -> dict[str, jax.Array]:
    """Appends `new_rows` as active codes right after the active ones (between stages).

    Old rows and their statistics are copied bit-identically, as are inactive rows beyond the new
    ones. Each new row r gets `ema_count = c0`, `ema_weight = r·c0` (so W/N = r, and an EMA step
    that assigns it nothing leaves it ≈ r) and `unused_steps = -1` (fresh). c0 = `new_code_count`
    defaults to the mean `ema_count` of the active codes: a new code starts with the statistical
    weight of an average old code and, once chosen, moves as fast as one (c0 = 1 if the codebook
    was never trained and every count is 0). The reference's count-0 init would instead make the
    row explode to W/ε (norm ~1e2-1e3) at its first EMA step.

    The result has `capacity` rows, by default the current capacity or, if active + new rows
    exceed it, exactly active + new. A larger capacity reallocates every array once (old rows
    copied exactly, rows beyond the new codes inactive); the module must then be rebuilt with that
    `codebook_capacity`. Not jit-able: the result's shape depends on the value of `active_count`.

    Args:
        state: the `quantizer` collection of one `VectorQuantizer`.
        new_rows: [K_new, D] vectors of the new codes.
        new_code_count: c0 above.
        capacity: number of rows of the result (at least the current capacity and active + new).

    Returns:
        The grown state, with the same keys.
    """
    missing = sorted({*_PER_CODE_STATE, "active_count"} - set(state))
    if missing:
        raise ValueError(f"state lacks the quantizer entries {missing}.")
    embedding = state["embedding"]
    old_capacity, code_dim = embedding.shape
    new_rows = jnp.asarray(new_rows)
    if new_rows.ndim != 2 or new_rows.shape[1] != code_dim:
        raise ValueError(f"new_rows must be [K_new, {code_dim}] to match the codebook embedding "
                         f"{embedding.shape}, got {new_rows.shape}.")
    num_active = int(state["active_count"])
    needed = num_active + new_rows.shape[0]
    if capacity is None:
        capacity = max(needed, old_capacity)
    if capacity < max(needed, old_capacity):
        raise ValueError(f"capacity={capacity} cannot hold the {old_capacity} existing rows and "
                         f"{num_active} active + {new_rows.shape[0]} new codes.")
    if new_code_count is None:
        mean_count = float(jnp.mean(state["ema_count"][:num_active])) if num_active else 0.0
        new_code_count = mean_count if mean_count > 0 else 1.0

    grown = {name: state[name] for name in _PER_CODE_STATE}
    if capacity > old_capacity:
        extra = capacity - old_capacity
        grown = {
            name: jnp.concatenate([
                value,
                jnp.full((extra, *value.shape[1:]),
                         _FRESH_CODE if name == "unused_steps" else 0, value.dtype),
            ])
            for name, value in grown.items()
        }
    rows = slice(num_active, needed)
    new_rows = new_rows.astype(embedding.dtype)
    grown["embedding"] = grown["embedding"].at[rows].set(new_rows)
    grown["ema_weight"] = grown["ema_weight"].at[rows].set(new_rows * new_code_count)
    grown["ema_count"] = grown["ema_count"].at[rows].set(new_code_count)
    grown["unused_steps"] = grown["unused_steps"].at[rows].set(_FRESH_CODE)
    grown["active_count"] = jnp.asarray(needed, state["active_count"].dtype)
    return grown


@functools.partial(jax.jit, static_argnames=("num_rows", "lloyd_iterations"))
def init_codebook_rows_from_features(
    rng: jax.Array, features: jax.Array, num_rows: int, lloyd_iterations: int = 10
) -> jax.Array:
    """Data-driven rows for new codes: k-means++ seeding, then `lloyd_iterations` Lloyd steps.

    Meant for a new modality's semantic features [N, D] (a few batches at a stage boundary).
    k-means++ (D² sampling, Arthur & Vassilvitskii 2007) spreads the seeds over the data; each Lloyd
    step moves every row to the mean of the features nearest to it (a row whose cluster empties
    stays put). The rows are data means on the features' scale, so the EMA refines them instead of
    starting from noise.

    Args:
        rng: PRNG key.
        features: [N, D] with N >= num_rows.
        num_rows: number of rows to produce.
        lloyd_iterations: Lloyd steps after the seeding (0 = the seeds).

    Returns:
        float32 [num_rows, D].
    """
    features = jnp.asarray(features, jnp.float32)
    if features.ndim != 2 or not 0 < num_rows <= features.shape[0]:
        raise ValueError(f"need features [N, D] with N >= num_rows={num_rows} > 0, "
                         f"got {features.shape}.")
    first_rng, rng = jax.random.split(rng)
    first = features[jax.random.randint(first_rng, (), 0, features.shape[0])]
    centers = jnp.zeros((num_rows, features.shape[1]), jnp.float32).at[0].set(first)
    nearest_sq = jnp.sum(jnp.square(features - first), axis=-1)

    def add_seed(i, carry):
        centers, nearest_sq, rng = carry
        rng, pick_rng = jax.random.split(rng)
        # D² sampling; if every feature coincides with a seed already, pick uniformly.
        logits = jnp.where(jnp.any(nearest_sq > 0), jnp.log(nearest_sq), 0.0)
        seed = features[jax.random.categorical(pick_rng, logits)]
        nearest_sq = jnp.minimum(nearest_sq, jnp.sum(jnp.square(features - seed), axis=-1))
        return centers.at[i].set(seed), nearest_sq, rng

    centers, _, _ = jax.lax.fori_loop(1, num_rows, add_seed, (centers, nearest_sq, rng))

    def lloyd_step(_, centers):
        assignment = jnp.argmin(squared_distances_to_codes(features, centers), axis=-1)
        one_hot = jax.nn.one_hot(assignment, num_rows, dtype=features.dtype)
        counts = one_hot.sum(0)[:, None]
        sums = jnp.einsum("nk,nd->kd", one_hot, features, precision=_HIGHEST)
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), centers)

    return jax.lax.fori_loop(0, lloyd_iterations, lloyd_step, centers)


def pseudo_modality_sequence(
    features: jax.Array,
    teacher_embedding: jax.Array,
    teacher_active_count: jax.Array | int,
    current_embedding: jax.Array,
    new_code_start: jax.Array | int,
    new_code_stop: jax.Array | int,
) -> tuple[jax.Array, jax.Array]:
    """COMET Pseudo-Modality Replay (§3.3): a stand-in sequence for the absent old modality.

    Each step of the mediator's features [B, T, D] is replaced by its nearest code among the frozen
    teacher codebook's active codes [0, teacher_active_count) and the codes added in this stage,
    rows [new_code_start, new_code_stop) of the current codebook. Exact ties go to the teacher. No
    gradient flows into the result. COMET gives positions that fall on new codes an e^-8 weight in
    Cross-CPC; `on_new_code` marks them for the loss. Jit-able (counts and bounds may be traced).

    Returns:
        sequence: [B, T, D] chosen code vectors (stop-gradient).
        on_new_code: bool [B, T], True where the chosen code is one of the new codes.
    """
    teacher_rows, code_dim = teacher_embedding.shape
    if current_embedding.shape[1] != code_dim or features.shape[-1] != code_dim:
        raise ValueError(f"code dimensions differ: features {features.shape}, teacher "
                         f"{teacher_embedding.shape}, current {current_embedding.shape}.")
    current_index = jnp.arange(current_embedding.shape[0])
    allowed = jnp.concatenate([
        jnp.arange(teacher_rows) < teacher_active_count,
        (current_index >= new_code_start) & (current_index < new_code_stop),
    ])
    candidates = jax.lax.stop_gradient(jnp.concatenate([teacher_embedding, current_embedding]))
    features = jax.lax.stop_gradient(features).astype(candidates.dtype)
    chosen = _nearest_allowed(squared_distances_to_codes(features, candidates), allowed)
    return jnp.take(candidates, chosen, axis=0), chosen >= teacher_rows
