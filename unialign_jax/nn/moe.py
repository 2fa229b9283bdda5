"""Mixture-of-experts building blocks: a generic router, COMET's CMoE-Adapter and UniAlign's MoE-LoRA.

COMET (`papers/comet.txt` §3.2, Eq. 3):

    MoE(x) = Σ_{j=1..U} G_j(x) · E_j(x),     G(x) = SoftMax(W_g x),
    E_j(x) = common_j(x) + specific_{j,m}(x)   (one linear shared by all modalities + one per modality m).

The load-balancing loss of Eq. 4 (L_gate) is a pure function in `unialign_jax.losses`; the modules
here only return the router probabilities it needs.

Choices the paper leaves open (reference_implementations.md §2.3, §5.3 trap 14), made here:
* Routing is per token (each [.., D] vector is routed on its own) and dense by default (all U experts
  weighted by the softmax); `top_k` keeps the k largest gates and renormalises them to sum to 1.
* One router is shared by all modalities (COMET describes a single gate W_g); modality information
  enters only through the modality-specific layers.
* The adapter has no residual connection: its output is Eq. 3 exactly.
"""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from unialign_jax.nn.layers import Dense, Dtype, torch_uniform_init

Array = jax.Array

# PyTorch nn.Linear weight init (U(±1/√fan_in)) for a stack of experts [U, in, out].
_expert_weight_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", batch_axis=0)

# Sharding rules (`parallel.tree_shardings`) of the stacked experts, on the mesh's expert axis: the
# COMET CMoE-Adapter's ([U, D, F] kernels, [U, F] biases) and UniAlign's MoE-LoRA banks ([G, n, ..]
# LoRA factors; [L, G, n, ..] under `scan_layers`).
EXPERT_RULES = (
    (r"adapter/(common|specific_[a-z]+)/(kernel|bias)$", ("expert",)),
    (r"/layers/.*/experts/lora_[ab]$", (None, None, "expert")),
    (r"/experts/lora_[ab]$", (None, "expert")),
)


class Routing(NamedTuple):
    """Router outputs over the last axis (experts).

    gates: combination weights G(x) [.., U]; equal to `probabilities` for dense routing, otherwise
      the top-k probabilities renormalised to sum to 1 and zero elsewhere.
    probabilities: the full softmax [.., U] (what load-balancing losses use; differentiable).
    """

    gates: Array
    probabilities: Array


def route(logits: Array, top_k: int = 0) -> Routing:
    """Router logits [.., U] -> softmax in float32, optional top-k with renormalisation (the Router's gating).

    `top_k` of 0 (or >= U) means dense routing.
    """
    if top_k < 0:
        raise ValueError(f"Router top_k must be >= 0 (0 = dense routing), got {top_k}")
    num_experts = logits.shape[-1]
    probabilities = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if top_k == 0 or top_k >= num_experts:
        return Routing(probabilities, probabilities)
    _, chosen = jax.lax.top_k(probabilities, top_k)
    keep = jax.nn.one_hot(chosen, num_experts, dtype=probabilities.dtype).sum(axis=-2)
    kept = probabilities * keep
    return Routing(kept / kept.sum(axis=-1, keepdims=True), probabilities)


class Router(nn.Module):
    """Linear -> softmax over `num_experts` (softmax in float32), optional top-k with renormalisation.

    `top_k` of 0 (or >= num_experts) means dense routing.
    """

    num_experts: int
    top_k: int = 0
    use_bias: bool = True
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: Array) -> Routing:
        logits = Dense(self.num_experts, use_bias=self.use_bias, dtype=self.dtype, name="gate")(inputs)
        return route(logits, self.top_k)


class ExpertDense(nn.Module):
    """`num_experts` independent linears applied to the same input: [.., D] -> [.., U, F].

    Each expert is initialised like a PyTorch `nn.Linear(D, F)`; params `kernel` [U, D, F], `bias` [U, F].
    """

    num_experts: int
    features: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        fan_in = inputs.shape[-1]
        kernel = self.param("kernel", _expert_weight_init, (self.num_experts, fan_in, self.features))
        bias = self.param("bias", torch_uniform_init(fan_in), (self.num_experts, self.features))
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        return jnp.einsum("...d,udf->...uf", inputs, kernel) + bias


class CMoEAdapter(nn.Module):
    """COMET CMoE-Adapter (Eq. 3): per-token MoE of (common + modality-specific) linear experts.

    Params: `router` (shared by modalities), `common` (U linears shared by modalities) and, when
    `modality_specific_layers`, `specific_{modality}` (U linears per modality). A modality's specific
    layers are created by name the first time the adapter is initialised with that modality, so a
    modality that first appears in a later continual stage gets fresh params at that stage's init
    while the router and the common layers keep their shapes.

    Call: `(inputs [.., D], modality) -> (outputs [.., features], router_probabilities [.., U])`.
    """

    num_experts: int
    features: int
    modality_specific_layers: bool = True
    top_k: int = 0
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: Array, modality: str) -> tuple[Array, Array]:
        routing = Router(self.num_experts, self.top_k, dtype=self.dtype, name="router")(inputs)
        experts = ExpertDense(self.num_experts, self.features, self.dtype, name="common")(inputs)
        if self.modality_specific_layers:
            experts = experts + ExpertDense(
                self.num_experts, self.features, self.dtype, name=f"specific_{modality}"
            )(inputs)
        outputs = jnp.einsum("...u,...uf->...f", routing.gates.astype(experts.dtype), experts)
        return outputs, routing.probabilities


# ------------------------------------------------------------------------------------------------
# UniAlign modality-aware MoE-LoRA (`papers/unialign.txt` §3.1, Eq. 5-9).

# LoRAMoE initialises A like a PyTorch nn.Linear(d_in, r): U(±1/√d_in); the same for the routers.
_lora_a_init = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1, batch_axis=(0, 1)
)
_modality_router_init = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1, batch_axis=(0,)
)


def select_group(stacked: Array, group_id: Array) -> Array:
    """stacked [G, ..] at `group_id`: int32 scalar -> [..], int32[B] -> [B, ..].

    A dynamic gather, so only the selected group is read; an out-of-range id gives NaN.
    """
    return jnp.take(stacked, group_id, axis=0, mode="fill", fill_value=jnp.nan)


class LoRAExperts(nn.Module):
    """A bank of LoRA experts F_i(x) = (α/r)·B_i A_i x (Eq. 9), one bank per group (e.g. modality).

    Params: `lora_a` [G, n, d_in, r] (U(±1/√d_in)), `lora_b` [G, n, r, features] (zeros, so the adapter
    starts at exactly zero and the frozen model is unchanged).

    Call: `(inputs [B, .., d_in], gates [B, .., n], group_id) -> Σ_i gates_i·F_i(x) [B, .., features]`
    with `group_id` an int32 scalar (whole batch) or int32[B] (per example); only that group's experts
    are gathered and computed, so the cost per token does not depend on the number of groups.
    """

    features: int
    num_experts: int
    rank: int = 4
    alpha: float = 32.0
    num_groups: int = 1
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: Array, gates: Array, group_id: Array | int = 0) -> Array:
        shape_a = (self.num_groups, self.num_experts, inputs.shape[-1], self.rank)
        lora_a = select_group(self.param("lora_a", _lora_a_init, shape_a), jnp.asarray(group_id))
        shape_b = (self.num_groups, self.num_experts, self.rank, self.features)
        lora_b = select_group(self.param("lora_b", nn.initializers.zeros, shape_b), jnp.asarray(group_id))
        inputs, lora_a, lora_b, gates = nn.dtypes.promote_dtype(
            inputs, lora_a, lora_b, gates, dtype=self.dtype
        )
        if lora_a.ndim == 3:  # one group for the whole batch
            hidden = jnp.einsum("...d,edr->...er", inputs, lora_a) * gates[..., None]
            outputs = jnp.einsum("...er,erf->...f", hidden, lora_b)
        else:  # one group per example
            hidden = jnp.einsum("b...d,bedr->b...er", inputs, lora_a) * gates[..., None]
            outputs = jnp.einsum("b...er,berf->b...f", hidden, lora_b)
        return outputs * (self.alpha / self.rank)


class MoELoRA(nn.Module):
    """Modality-aware mixture of LoRA experts: the adapter hook of `unialign_jax.nn.transformer.Encoder`.

    Per token x (Eq. 8): Δ(x) = Σ_i G_M(x)_i · (α/r)·B_i A_i x, with G_M = `route(x W_M, top_k)` the
    softmax (float32) of modality M's router W_M, optionally top-k renormalised.

    routing="grouped" (modality-aware expert grouping, Eq. 5): modality M owns its own `num_experts`
      experts and router; only M's router and experts are gathered and computed.
    routing="global" (modality-aware global routing, Eq. 6): `num_experts` experts shared by all
      modalities, one router per modality over all of them.

    Params: `router` [M, d_in, num_experts] (float32, no bias, U(±1/√d_in) as LoRAMoE) and `experts`
    (`LoRAExperts` with M groups for "grouped", 1 for "global").
    Call: `(inputs [B, .., d_in], modality_id int32 scalar or [B]) -> delta [B, .., features]`.
    Sows to 'intermediates': `router_probabilities` (full softmax, for balance losses) and
    `router_gates` (the combination weights after top-k), both float32 [B, .., num_experts].

    As the encoder's FFN hook: `Encoder(config, adapter=functools.partial(MoELoRA, num_experts=2),
    modalities=(...))`; the encoder passes `features`, `num_modalities` and `name`.

    Choices the paper leaves open (reference_implementations.md §3.2, §5.3 trap 15): routing is per
    token (LoRAMoE), not per sample; placement (on the FFN linears or parallel to the FFN) is the
    encoder's `adapter_placement`; defaults r=4, α=32 (paper §3.3, = LoRAMoE) and 2 dense experts per
    modality (top-2 of 2). Deviation from LoRAMoE: no dropout on the LoRA input (0.05 there).
    """

    features: int
    num_modalities: int
    num_experts: int = 2
    routing: str = "grouped"
    top_k: int = 0
    rank: int = 4
    alpha: float = 32.0
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: Array, modality_id: Array | int) -> Array:
        if self.routing not in ("grouped", "global"):
            raise ValueError(f"MoELoRA routing must be 'grouped' or 'global', got {self.routing!r}")
        modality_id = jnp.asarray(modality_id, jnp.int32)
        if modality_id.ndim > 1:
            raise ValueError(f"modality_id must be a scalar or [B], got shape {modality_id.shape}")
        router_shape = (self.num_modalities, inputs.shape[-1], self.num_experts)
        routers = self.param("router", _modality_router_init, router_shape, jnp.float32)
        router = select_group(routers, modality_id)
        features = inputs.astype(jnp.float32)
        if router.ndim == 2:
            logits = jnp.einsum("...d,de->...e", features, router)
        else:
            logits = jnp.einsum("b...d,bde->b...e", features, router)
        routing = route(logits, self.top_k)
        self.sow("intermediates", "router_probabilities", routing.probabilities)
        self.sow("intermediates", "router_gates", routing.gates)
        grouped = self.routing == "grouped"
        experts = LoRAExperts(
            self.features,
            self.num_experts,
            self.rank,
            self.alpha,
            num_groups=self.num_modalities if grouped else 1,
            dtype=self.dtype,
            name="experts",
        )
        return experts(inputs, routing.gates, modality_id if grouped else 0)
