"""Router and COMET CMoE-Adapter (unialign_jax.nn.moe)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unialign_jax.nn.moe import CMoEAdapter, Router

NUM_EXPERTS, DIM = 4, 8


@pytest.fixture(scope="module")
def tokens():
    return jax.random.normal(jax.random.key(0), (2, 5, DIM))


def test_router_dense_is_a_softmax_over_experts(tokens):
    router = Router(NUM_EXPERTS)
    params = router.init(jax.random.key(1), tokens)
    routing = router.apply(params, tokens)
    assert routing.gates.shape == routing.probabilities.shape == (2, 5, NUM_EXPERTS)
    np.testing.assert_allclose(routing.probabilities.sum(-1), 1.0, rtol=1e-6)
    logits = tokens @ params["params"]["gate"]["kernel"] + params["params"]["gate"]["bias"]
    np.testing.assert_allclose(routing.gates, jax.nn.softmax(logits), rtol=1e-5, atol=1e-7)


def test_router_top_k_keeps_k_largest_and_renormalises(tokens):
    router = Router(NUM_EXPERTS, top_k=2)
    params = router.init(jax.random.key(1), tokens)
    routing = router.apply(params, tokens)
    gates, probabilities = np.asarray(routing.gates), np.asarray(routing.probabilities)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
    assert ((gates > 0).sum(-1) == 2).all()
    top_two = np.sort(probabilities, axis=-1)[..., -2:]
    chosen = np.where(gates > 0, probabilities, 0.0)
    np.testing.assert_allclose(np.sort(chosen, axis=-1)[..., -2:], top_two, rtol=1e-6)
    np.testing.assert_allclose(gates, chosen / top_two.sum(-1, keepdims=True), rtol=1e-5)


def _manual_adapter(params, inputs, modality, *, with_specific):
    """Eq. 3 by hand: Σ_j G_j(x) (common_j(x) + specific_{j,m}(x))."""
    gate = params["router"]["gate"]
    probabilities = jax.nn.softmax(inputs @ gate["kernel"] + gate["bias"])
    layers = [params["common"]] + ([params[f"specific_{modality}"]] if with_specific else [])
    experts = sum(jnp.einsum("btd,udf->btuf", inputs, layer["kernel"]) + layer["bias"]
                  for layer in layers)
    return jnp.einsum("btu,btuf->btf", probabilities, experts), probabilities


def test_adapter_matches_equation_and_probabilities_sum_to_one(tokens):
    adapter = CMoEAdapter(NUM_EXPERTS, features=6)
    params = adapter.init(jax.random.key(2), tokens, "text")
    outputs, probabilities = adapter.apply(params, tokens, "text")
    assert outputs.shape == (2, 5, 6) and probabilities.shape == (2, 5, NUM_EXPERTS)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-6)
    expected, expected_probabilities = _manual_adapter(
        params["params"], tokens, "text", with_specific=True)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probabilities, expected_probabilities, rtol=1e-5, atol=1e-7)


def test_adapter_without_specific_layers_equals_common_only(tokens):
    with_specific = CMoEAdapter(NUM_EXPERTS, features=6)
    common_only = CMoEAdapter(NUM_EXPERTS, features=6, modality_specific_layers=False)
    params = with_specific.init(jax.random.key(3), tokens, "audio")["params"]
    shared = {name: value for name, value in params.items() if name in ("router", "common")}
    assert set(common_only.init(jax.random.key(3), tokens, "audio")["params"]) == set(shared)

    outputs, _ = common_only.apply({"params": shared}, tokens, "audio")
    expected, _ = _manual_adapter(params, tokens, "audio", with_specific=False)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-6)
    # Without specific layers the modality name makes no difference ...
    np.testing.assert_allclose(common_only.apply({"params": shared}, tokens, "video")[0], outputs)
    # ... and equals the full adapter whose specific layers are zero.
    zeroed = {**params, "specific_audio": jax.tree.map(jnp.zeros_like, params["specific_audio"])}
    zeroed_outputs, _ = with_specific.apply({"params": zeroed}, tokens, "audio")
    np.testing.assert_allclose(zeroed_outputs, outputs, rtol=1e-6)
    # Non-zero specific layers do change the output.
    full_outputs, _ = with_specific.apply({"params": params}, tokens, "audio")
    assert not np.allclose(full_outputs, outputs, atol=1e-4)


def test_new_modality_adds_only_its_specific_layers(tokens):
    adapter = CMoEAdapter(NUM_EXPERTS, features=6, top_k=2)
    stage_one = adapter.init(jax.random.key(4), tokens, "text")["params"]
    with pytest.raises(flax.errors.ScopeParamNotFoundError, match="specific_audio"):
        adapter.apply({"params": stage_one}, tokens, "audio")

    def mediator_and_new_modality(module, x):  # What a later stage's init sees.
        module(x, "text")
        return module(x, "audio")

    stage_two = adapter.init(jax.random.key(5), tokens, method=mediator_and_new_modality)["params"]
    assert set(stage_two) - set(stage_one) == {"specific_audio"}
    kept = {name: stage_two[name] for name in stage_one}
    assert jax.tree.map(jnp.shape, kept) == jax.tree.map(jnp.shape, stage_one)
    carried = {**stage_one, "specific_audio": stage_two["specific_audio"]}
    outputs, probabilities = adapter.apply({"params": carried}, tokens, "audio")
    assert outputs.shape == (2, 5, 6)
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-6)
