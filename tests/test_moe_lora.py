"""UniAlign modality-aware MoE-LoRA (unialign_jax.nn.moe.MoELoRA / LoRAExperts) and its encoder hook."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unialign_jax.nn.moe import LoRAExperts, MoELoRA
from unialign_jax.nn.transformer import Encoder, TransformerConfig

D_IN, FEATURES, MODALITIES = 8, 6, 3


INPUTS = np.random.default_rng(0).normal(size=(2, 5, D_IN)).astype(np.float32)


def _randomised(module, seed=1):
    """Params of `module` with every leaf random (so LoRA B is non-zero and the experts act)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), INPUTS, 0)["params"]
    leaves, tree = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(tree, [rng.normal(0.0, 0.5, leaf.shape).astype(np.float32) for leaf in leaves])


def _softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _top_k_renormalised(probs, k):
    if k == 0:
        return probs
    threshold = np.sort(probs, axis=-1)[..., -k][..., None]
    kept = np.where(probs >= threshold, probs, 0.0)
    return kept / kept.sum(-1, keepdims=True)


def _apply(module, params, modality_id):
    return module.apply({"params": params}, INPUTS, modality_id, mutable=["intermediates"])


@pytest.mark.parametrize("top_k", [0, 1])
def test_grouped_routing_equals_dense_masked_reference(top_k):
    module = MoELoRA(FEATURES, MODALITIES, num_experts=2, routing="grouped", top_k=top_k, rank=2, alpha=6.0)
    params = _randomised(module)
    a, b = params["experts"]["lora_a"], params["experts"]["lora_b"]  # [M, n, d, r], [M, n, r, f]
    # Dense reference: every expert of every modality computed, then masked to the active group.
    all_experts = np.einsum("...d,gedr,gerf->...gef", INPUTS, a, b) * (6.0 / 2)  # [B, L, M, n, f]
    outputs_per_modality = []
    for modality in range(MODALITIES):
        gates = np.zeros(INPUTS.shape[:-1] + (MODALITIES, 2))
        gates[..., modality, :] = _top_k_renormalised(_softmax(INPUTS @ params["router"][modality]), top_k)
        expected = np.einsum("...ge,...gef->...f", gates, all_experts)
        outputs, state = _apply(module, params, modality)
        np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            state["intermediates"]["router_gates"][0], gates[..., modality, :], rtol=1e-5
        )
        outputs_per_modality.append(np.asarray(outputs))
    # One modality per example gives each example its modality's output.
    outputs, _ = _apply(module, params, jnp.array([2, 0]))
    np.testing.assert_allclose(outputs[0], outputs_per_modality[2][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outputs[1], outputs_per_modality[0][1], rtol=1e-5, atol=1e-6)


def test_global_routing_uses_per_modality_routers_over_shared_experts():
    module = MoELoRA(FEATURES, MODALITIES, num_experts=4, routing="global", top_k=2)
    params = _randomised(module)
    assert params["experts"]["lora_a"].shape == (1, 4, D_IN, 4) and params["router"].shape == (
        MODALITIES,
        D_IN,
        4,
    )
    experts = np.einsum(
        "...d,edr,erf->...ef", INPUTS, params["experts"]["lora_a"][0], params["experts"]["lora_b"][0]
    )
    for modality in range(MODALITIES):
        gates = _top_k_renormalised(_softmax(INPUTS @ params["router"][modality]), 2)
        outputs, _ = _apply(module, params, modality)
        np.testing.assert_allclose(
            outputs, np.einsum("...e,...ef->...f", gates, experts) * 32 / 4, rtol=1e-5, atol=1e-5
        )


def test_top_k_gates_are_renormalised_and_routers_run_in_float32():
    module = MoELoRA(FEATURES, MODALITIES, num_experts=4, routing="global", top_k=2, dtype=jnp.bfloat16)
    params = _randomised(module)
    outputs, state = _apply(module, params, 1)
    probabilities = np.asarray(state["intermediates"]["router_probabilities"][0])
    gates = np.asarray(state["intermediates"]["router_gates"][0])
    assert outputs.dtype == jnp.bfloat16 and probabilities.dtype == gates.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
    assert np.all((gates > 0).sum(-1) == 2)
    top2 = np.sort(probabilities, -1)[..., -2:]
    np.testing.assert_allclose(np.sort(gates, -1)[..., -2:], top2 / top2.sum(-1, keepdims=True), rtol=1e-6)


def test_grouped_cost_per_token_does_not_grow_with_the_number_of_modalities():
    costs = []
    for num_modalities in (2, 8):
        module = MoELoRA(FEATURES, num_modalities, num_experts=2, routing="grouped")
        variables = jax.eval_shape(module.init, jax.random.key(0), INPUTS, 0)
        compiled = jax.jit(module.apply).lower(variables, INPUTS, jnp.int32(1)).compile()
        costs.append(compiled.cost_analysis()["flops"])
    assert costs[0] == costs[1] > 0


def test_lora_defaults_start_at_zero():
    experts = LoRAExperts(FEATURES, num_experts=3)
    assert (experts.rank, experts.alpha) == (4, 32.0)
    params = experts.init(jax.random.key(0), INPUTS, np.ones((2, 5, 3), np.float32))["params"]
    np.testing.assert_array_equal(params["lora_b"], 0.0)
    assert 0 < np.abs(params["lora_a"]).max() <= 1 / np.sqrt(D_IN)


@pytest.fixture(scope="module")
def encoder_setup():
    config = TransformerConfig(
        width=D_IN, depth=1, num_heads=2, mlp_dim=16, norm_position="pre", activation="quick_gelu"
    )
    frozen = Encoder(config)
    base = jax.jit(frozen.init)(jax.random.key(0), INPUTS)["params"]
    return config, frozen, base, jax.jit(frozen.apply)({"params": base}, INPUTS)


def _adapted_encoder(encoder_setup, placement, routing):
    """Encoder with MoE-LoRA adapters around the frozen base params (adapters freshly initialised)."""
    config, base = encoder_setup[0], encoder_setup[2]
    adapter = functools.partial(MoELoRA, num_experts=2, routing=routing, top_k=1)
    encoder = Encoder(
        config, adapter=adapter, adapter_placement=placement, modalities=("image", "audio", "points")
    )
    params = jax.jit(functools.partial(encoder.init, modality="points"))(jax.random.key(1), INPUTS)["params"]
    params["layer_0"] |= {k: v for k, v in base["layer_0"].items() if k != "mlp"}
    params["layer_0"]["mlp"] |= base["layer_0"]["mlp"]
    return encoder, params


@pytest.mark.parametrize("placement", ["ffn_linears", "parallel"])
@pytest.mark.parametrize("routing", ["grouped", "global"])
def test_zero_lora_b_gives_exactly_the_frozen_encoder(encoder_setup, placement, routing):
    encoder, params = _adapted_encoder(encoder_setup, placement, routing)
    apply = functools.partial(encoder.apply, modality="audio", mutable=["intermediates"])
    outputs, state = jax.jit(apply)({"params": params}, INPUTS)
    np.testing.assert_array_equal(outputs, encoder_setup[3])
    adapters = ["fc1_adapter", "fc2_adapter"] if placement == "ffn_linears" else ["adapter"]
    for name in adapters:
        assert state["intermediates"]["layer_0"]["mlp"][name]["router_probabilities"][0].shape == (2, 5, 2)


@pytest.mark.parametrize("routing", ["grouped", "global"])
def test_training_starts_on_lora_b_of_the_active_modality(encoder_setup, routing):
    encoder, params = _adapted_encoder(encoder_setup, "parallel", routing)
    loss = lambda p: jnp.sum(encoder.apply({"params": p}, INPUTS, modality="audio") ** 2)
    grads = jax.jit(jax.grad(loss))(params)["layer_0"]["mlp"]["adapter"]["experts"]
    np.testing.assert_array_equal(grads["lora_a"], 0.0)  # B = 0 blocks A's gradient at the start
    lora_b = np.asarray(grads["lora_b"])
    if routing == "grouped":  # only the active modality's (audio = 1) experts learn
        assert np.abs(lora_b[1]).max() > 0
        np.testing.assert_array_equal(lora_b[[0, 2]], 0.0)
    else:
        assert np.abs(lora_b).max() > 0
