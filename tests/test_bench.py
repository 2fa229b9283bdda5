"""bench.py (FLOP counting, timing, ahead-of-time compile) and the speed/scale options of the model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unialign_jax import bench
from unialign_jax import parallel
from unialign_jax.nn.cmg import CMGModel, CMGModelConfig
from unialign_jax.nn.layers import conv_as_matmul, conv_transpose_as_matmul

from tiny import tiny_cmg_config
from tiny_unialign import tiny_unialign_config


def test_hlo_flops_counts_matmuls_and_convolutions_once_per_loop_iteration():
    def f(x, w, image, kernel):
        y = jax.lax.fori_loop(0, 5, lambda _, y: jnp.tanh(y @ w), x)  # 5 x [8,16]@[16,16]
        conv = jax.lax.conv_general_dilated(image, kernel, (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y, conv  # [2, 5, 5, 3] outputs of 3x3x4 taps

    args = (jnp.ones((8, 16)), jnp.ones((16, 16)), jnp.ones((2, 7, 7, 4)), jnp.ones((3, 3, 4, 3)))
    compiled = jax.jit(f).lower(*args).compile()
    expected = 5 * 2 * 8 * 16 * 16 + 2 * (2 * 5 * 5 * 3) * (3 * 3 * 4)
    assert bench.hlo_flops(compiled.as_text()) == expected


def test_convolutions_as_matmuls_equal_xla_convolutions():
    image = jax.random.normal(jax.random.key(0), (2, 5, 6, 3))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    dimensions = ("NHWC", "HWIO", "NHWC")
    for padding in (0, 1):
        expected = jax.lax.conv_general_dilated(image, kernel, (1, 1), [(padding, padding)] * 2,
                                                dimension_numbers=dimensions)
        np.testing.assert_allclose(conv_as_matmul(image, kernel, padding), expected, rtol=1e-5, atol=1e-5)
    transposed = functools.partial(jax.lax.conv_transpose, strides=(1, 1), padding="VALID",
                                   dimension_numbers=dimensions)
    np.testing.assert_allclose(conv_transpose_as_matmul(image, kernel), transposed(image, kernel), rtol=1e-5,
                               atol=1e-5)
    # Its hand-written backward pass (the gather of `_place_taps`) gives the same gradients.
    loss = lambda f: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(image, kernel)
    for ours, theirs in zip(loss(conv_transpose_as_matmul), loss(transposed)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_component_of_reads_module_and_direction_from_op_names():
    forward = "jit(_step)/jvp(CMGModel)/decoder_video/deconv_1/dot_general"
    backward = "jit(_step)/transpose(jvp(CMGModel))/specific_encoder_video/conv_2/dot_general"
    club = "jit(_step)/while/body/jvp(CLUBEstimators)/logvar_audio/dense_1/dot_general"
    assert bench.component_of(forward) == "decoder_video forward"
    assert bench.component_of(backward) == "specific_encoder_video backward"
    assert bench.component_of(club) == "club_audio forward"
    assert bench.component_of("jit(_step)/add") == "other forward"


def test_benchmark_and_ahead_of_time_compile_report_time_flops_and_memory(monkeypatch):
    monkeypatch.setattr(bench, "measured_matmul_peak", functools.partial(bench.measured_matmul_peak, n=256))
    config = tiny_cmg_config("")
    config.mesh = (("data", 1),)
    result, _, _ = bench.benchmark(config, steps=2, warmup=1, devices=jax.devices()[:1])
    assert result["compile_seconds"] > 0 and result["step_seconds_median"] > 0
    assert result["flops_per_step"] > 0 and 0 < result["utilisation"] < 1
    assert result["memory_bytes_per_device"] >= result["argument_bytes_per_device"] > 0
    assert result["tokens_per_second"] == pytest.approx(result["examples_per_second"] * 6 * 2)

    # Compiled ahead of time for 8 devices with FSDP, each device holds a fraction of the state.
    config.mesh = (("fsdp", 8),)
    config.sharding_rules = parallel.FSDP_RULES
    sharded = bench.compile_for_topology(config, "cpu:8")
    assert sharded["num_devices"] == 8 and sharded["mesh"] == {"fsdp": 8}
    assert sharded["argument_bytes_per_device"] < 0.5 * result["argument_bytes_per_device"]
    with pytest.raises(ValueError, match="expected 'cpu:N' or 'tpu:"):
        bench.compile_for_topology(config, "gpu:8")


def test_benchmark_times_the_unialign_step_and_counts_its_tokens(monkeypatch):
    monkeypatch.setattr(bench, "measured_matmul_peak", functools.partial(bench.measured_matmul_peak, n=256))
    config = tiny_unialign_config("")
    config.mesh = (("data", 1),)
    result, _, _ = bench.benchmark(config, steps=1, warmup=1, devices=jax.devices()[:1])
    assert result["modalities"] == ["image", "audio", "text"] and result["flops_per_step"] > 0
    # 16 image and 16 audio rows of 4 tokens each (feature tokenizers: one token per time step).
    assert result["tokens_per_second"] == pytest.approx(128 / result["step_seconds_median"])
    assert result["examples_per_second"] == pytest.approx(32 / result["step_seconds_median"])


def _tiny_model_config(**options):
    return CMGModelConfig(
        modalities=("video", "audio"), input_shapes={"video": (4, 5, 5, 8), "audio": (4, 6)}, semantic_dim=16,
        num_heads=2, ffn_dim=32, num_layers=2, specific_dims={"audio": 10}, video_encoder_channels=(8, 8),
        video_club_dim=8, cpc_hidden=16, cpc_layers=1, club_hidden=8, codebook_capacity=12,
        initial_active_codes=12, **options)


def _loss_and_grads(config, variables, batch):
    def loss(params):
        outputs = CMGModel(config).apply({**variables, "params": params}, batch, train=False, update_codebook=False)
        return sum(jnp.sum(jnp.square(outputs[key][m])) for key in ("reconstruction", "semantic", "cpc_predictions")
                   for m in batch)

    return jax.jit(jax.value_and_grad(loss))(variables["params"])


def test_remat_scan_layers_and_bfloat16_keep_the_function():
    batch = {"video": jax.random.normal(jax.random.key(0), (2, 4, 5, 5, 8)),
             "audio": jax.random.normal(jax.random.key(1), (2, 4, 6))}
    config = _tiny_model_config()
    variables = jax.jit(lambda b: CMGModel(config).init(jax.random.key(2), b, train=False, update_codebook=False))(batch)
    loss, grads = _loss_and_grads(config, variables, batch)

    # remat + scan_layers: the same layers, stacked on a leading axis under `layers`, and the same
    # gradients although the activations are recomputed in the backward pass.
    def stack_layers(params):
        params = dict(params)
        for m in ("video", "audio"):
            encoder = dict(params[f"semantic_encoder_{m}"])
            layers = [encoder.pop(f"layer_{i}") for i in range(2)]
            params[f"semantic_encoder_{m}"] = {**encoder, "layers": jax.tree.map(lambda *x: jnp.stack(x), *layers)}
        return params

    scan_loss, scan_grads = _loss_and_grads(_tiny_model_config(scan_layers=True, remat=True),
                                            {**variables, "params": stack_layers(variables["params"])}, batch)
    np.testing.assert_allclose(scan_loss, loss, rtol=1e-5)
    for ours, theirs in zip(jax.tree.leaves(scan_grads), jax.tree.leaves(stack_layers(grads))):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)

    # bfloat16 compute keeps float32 parameters and returns float32 outputs close to float32's.
    bf16_loss, bf16_grads = _loss_and_grads(_tiny_model_config(dtype="bfloat16"), variables, batch)
    assert bf16_loss.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in jax.tree.leaves(bf16_grads))
    np.testing.assert_allclose(bf16_loss, loss, rtol=5e-2)
