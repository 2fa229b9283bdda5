"""Meshes, sharding rules, sharded train steps (8 fake CPU devices) and restoring onto another mesh."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from unialign_jax import checkpoint as ckpt_lib
from unialign_jax import parallel
from unialign_jax import loop
from unialign_jax import methods
from unialign_jax.nn import moe

from tiny import tiny_cmg_config
from tiny_unialign import tiny_unialign_config

STEPS = 2


def _comet_config():
    """The tiny CMG config with COMET's CMoE-Adapter (4 experts) on audio and text.

    Adam's epsilon is raised from 1e-8: some gradients are exactly zero in exact arithmetic (the
    CPC predictor bias and the attention key bias shift logits that a softmax ignores), and Adam
    turns their rounding noise (~1e-9, different for every sharding) into +-learning-rate updates.
    """
    config = tiny_cmg_config("", modalities=("audio", "text"))
    config.model.adapter_experts = 4
    config.optim.eps = 1e-3
    return config


def _numpy_leaves(state):
    """Host copies of every leaf (PRNG keys as their raw key data)."""
    as_data = lambda x: jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(jax.tree.map(as_data, state)))]


def _host_initial_state(config):
    """One fresh state of the config's method in host memory, shared by every mesh (initialised once:
    compiling it is slow).

    Its `rng` is raw key data (`_on_mesh` wraps it), so that no device buffer is shared between runs.
    RngBitGenerator keys compile much faster than threefry; the step keeps a threefry key, whose
    random bits do not depend on the sharding.
    """
    stage = loop.stage_specs(config)[0]
    with jax.default_device(jax.devices()[0]):
        state = methods.for_config(config).random_state(config, stage, jax.random.key(0, impl="rbg"))
        return jax.device_get(state.replace(rng=jax.random.key_data(jax.random.key(1))))


@pytest.fixture(scope="module")
def initial_state():
    return _host_initial_state(_comet_config())


def _on_mesh(host_state, mesh, rules):
    """(state placed by `rules` on `mesh`, its abstract state, its shardings)."""
    state = host_state.replace(rng=jax.random.wrap_key_data(host_state.rng))
    abstract = jax.eval_shape(lambda: state)
    shardings = loop.state_shardings(abstract, mesh, rules)
    return jax.device_put(state, shardings), abstract, shardings


def _train(config, mesh, host_state):
    """(final state, per-step total losses) of STEPS steps of the config's method on fixed random
    batches, on `mesh`."""
    stage = loop.stage_specs(config)[0]
    method = methods.for_config(config)
    state, abstract, shardings = _on_mesh(host_state, mesh, config.sharding_rules)
    step_fn = method.step(config, stage, mesh, abstract, shardings)
    losses = []
    for index in range(STEPS):
        batch = parallel.global_batch(method.random_batch(config, stage, index), mesh)
        state, metrics = step_fn(state, batch)
        losses.append(float(metrics["loss/total"]))
    return state, losses


@pytest.fixture(scope="module")
def one_device_run(initial_state):
    return _train(_comet_config(), parallel.make_mesh([("data", 1)], jax.devices()[:1]), initial_state)


def test_make_mesh_names_sizes_and_explicit_auto_axis_types():
    mesh = parallel.make_mesh([("data", 2), ("fsdp", -1)])
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4}
    assert mesh.axis_types == (AxisType.Auto, AxisType.Auto)
    assert parallel.batch_axes(mesh) == ("data", "fsdp")
    with pytest.raises(ValueError, match="distinct names"):
        parallel.make_mesh([("model", 8)])
    with pytest.raises(ValueError, match="needs 6 devices"):
        parallel.make_mesh([("data", 2), ("expert", 3)])
    with pytest.raises(ValueError, match="at most one -1"):
        parallel.make_mesh([("data", -1), ("fsdp", -1)])


def test_rule_table_first_match_fsdp_expert_and_errors():
    mesh = parallel.make_mesh([("data", 2), ("fsdp", 2), ("expert", 2)])
    tree = {
        "params": {"adapter": {"common": {"kernel": np.zeros((4, 16, 6)), "bias": np.zeros((4, 6))}},
                   "dense": {"kernel": np.zeros((6, 10)), "bias": np.zeros((3,))}},
        "quantizer": {"embedding": np.zeros((32, 16))},
    }
    rules = [*moe.EXPERT_RULES, *parallel.FSDP_RULES]
    specs = jax.tree.map(lambda s: s.spec, parallel.tree_shardings(tree, mesh, rules))
    assert specs["params"]["adapter"]["common"]["kernel"] == P("expert")  # first match wins over FSDP
    assert specs["params"]["adapter"]["common"]["bias"] == P("expert")
    assert specs["params"]["dense"]["kernel"] == P(None, "fsdp")  # the largest divisible dimension
    assert specs["params"]["dense"]["bias"] == P()  # nothing divisible: replicated
    assert specs["quantizer"]["embedding"] == P()  # no rule: replicated
    # A mesh without the `expert` axis drops it: the same table serves both meshes.
    data_only = parallel.make_mesh([("data", 8)])
    assert parallel.tree_shardings(tree, data_only, rules)["params"]["adapter"]["common"]["kernel"].spec == P()
    with pytest.raises(ValueError, match=r"params/adapter/common/bias.*not divisible by the .expert. axis size 8"):
        parallel.tree_shardings(tree, parallel.make_mesh([("expert", 8)]), rules)
    with pytest.raises(ValueError, match="unknown mesh axis"):
        parallel.tree_shardings(tree, mesh, [("kernel", ("tensor",))])


SHARDINGS = pytest.mark.parametrize(
    "mesh_axes, rules",
    [
        # Data parallel: the batch over 8 devices, every parameter replicated.
        ((("data", 8),), ()),
        # Experts over `expert`, everything else FSDP over `fsdp`, the batch over all three axes.
        ((("data", 2), ("fsdp", 2), ("expert", 2)), moe.EXPERT_RULES + parallel.FSDP_RULES),
    ],
    ids=["data", "data+fsdp+expert"],
)


def _sharded_run(config, host_state, one_device_run, mesh_axes, rules):
    """Trains `config` on `mesh_axes` with `rules`; asserts the losses and the whole final state match
    the one-device run to 1e-5. Returns the sharded final state and its mesh."""
    reference, reference_losses = one_device_run
    config.mesh, config.sharding_rules = mesh_axes, rules
    mesh = parallel.make_mesh(config.mesh)
    state, losses = _train(config, mesh, host_state)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5)
    for ours, theirs in zip(_numpy_leaves(state), _numpy_leaves(reference)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    return state, mesh


@SHARDINGS
def test_sharded_step_matches_one_device(initial_state, one_device_run, mesh_axes, rules):
    state, mesh = _sharded_run(_comet_config(), initial_state, one_device_run, mesh_axes, rules)
    # The rules were applied: parameters and Adam moments keep their shardings after the steps.
    kernel = state.params["adapter"]["common"]["kernel"]
    mu = state.opt_state[1][0].mu["adapter"]["common"]["kernel"]
    expected = parallel.tree_shardings({"params": {"adapter": {"common": {"kernel": kernel}}}}, mesh, rules)
    assert kernel.sharding.spec == mu.sharding.spec == expected["params"]["adapter"]["common"]["kernel"].spec
    if rules:
        assert kernel.addressable_shards[0].data.size < kernel.size


def test_restore_onto_a_different_mesh(initial_state, tmp_path):
    config = _comet_config()
    state, abstract, _ = _on_mesh(initial_state, parallel.make_mesh([("data", 8)]), [])
    checkpointer = ckpt_lib.StageCheckpointer(tmp_path / "ckpt")
    checkpointer.save(1, state, None, {"finished": False})
    checkpointer.wait()

    config.mesh = (("data", 2), ("fsdp", 2), ("expert", 2))
    config.sharding_rules = moe.EXPERT_RULES + parallel.FSDP_RULES
    new_mesh = parallel.make_mesh(config.mesh)
    shardings = loop.state_shardings(abstract, new_mesh, config.sharding_rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restored, meta = checkpointer.restore(1, target, None)
    checkpointer.close()
    assert meta == {"finished": False}
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert leaf.sharding == sharding
    for ours, theirs in zip(_numpy_leaves(restored), _numpy_leaves(state)):
        np.testing.assert_array_equal(ours, theirs)
    assert restored.params["adapter"]["common"]["kernel"].sharding.spec == P("expert")


def _unialign_config():
    """The tiny UniAlign config (2 MoE-LoRA experts per modality, every loss term on)."""
    return tiny_unialign_config("")


@pytest.fixture(scope="module")
def unialign_initial_state():
    return _host_initial_state(_unialign_config())


@pytest.fixture(scope="module")
def unialign_one_device_run(unialign_initial_state):
    return _train(_unialign_config(), parallel.make_mesh([("data", 1)], jax.devices()[:1]), unialign_initial_state)


@SHARDINGS
def test_sharded_unialign_step_matches_one_device(unialign_initial_state, unialign_one_device_run, mesh_axes, rules):
    state, _ = _sharded_run(_unialign_config(), unialign_initial_state, unialign_one_device_run, mesh_axes, rules)
    lora = state.params["backbone"]["encoder"]["layer_0"]["mlp"]["fc1_adapter"]["experts"]["lora_a"]
    assert lora.sharding.spec == (P(None, "expert") if rules else P())
