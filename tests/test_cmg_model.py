"""CMG/COMET model (unialign_jax.nn.cmg) and its building blocks (unialign_jax.nn.layers)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unialign_jax.nn.cmg import (
    CLUBEstimators,
    CMGModel,
    CMGModelConfig,
    CPCHead,
    ResidualStack,
    VideoSpatialPooler,
    reference_config,
)
from unialign_jax.nn.layers import ConvTranspose, Dense, LSTMLayer

BATCH = 2
OUTPUT_KEYS = {"semantic", "quantized", "code_vectors", "codes", "squared_distances", "active_mask",
               "specific", "reconstruction", "cpc_predictions"}


def tiny_config(modalities, **overrides):
    shapes = {"video": (4, 7, 7, 8), "audio": (4, 6), "text": (4, 12)}
    settings = dict(
        modalities=modalities, input_shapes={m: shapes[m] for m in modalities}, semantic_dim=16,
        num_heads=2, ffn_dim=32, num_layers=1, specific_dims={"audio": 10, "text": 12},
        video_encoder_channels=(8, 16), video_club_dim=8, cpc_hidden=16, cpc_layers=1,
        cpc_prediction_steps=2, club_hidden=8, codebook_capacity=12, initial_active_codes=10)
    return CMGModelConfig(**{**settings, **overrides})


def make_batch(config):
    batch = {m: jax.random.normal(jax.random.key(i), (BATCH, *config.input_shape(m)))
             for i, m in enumerate(config.modalities)}
    return {**batch, "label": jnp.zeros((BATCH,), jnp.int32)}


def run_model(config, batch):
    """Init + one training forward (jitted); returns (variables, outputs, new quantizer state)."""
    model = CMGModel(config)
    # RngBitGenerator keys compile much faster than threefry on CPU (init draws ~100 tensors).
    rngs = {name: jax.random.key(seed, impl="rbg")
            for seed, name in enumerate(("params", "dropout", "quantizer"))}
    variables = jax.jit(lambda b: model.init(rngs, b, train=False, update_codebook=False))(batch)

    @jax.jit
    def train_forward(variables, batch):
        return model.apply(variables, batch, train=True, update_codebook=True,
                           rngs={"dropout": rngs["dropout"], "quantizer": rngs["quantizer"]},
                           mutable=["quantizer"])

    outputs, state = train_forward(variables, batch)
    return variables, outputs, state


def abstract_variables(config):
    """Variable shapes of `CMGModel(config)` without computing anything."""
    batch = {m: jax.ShapeDtypeStruct((1, *config.input_shape(m)), jnp.float32)
             for m in config.modalities}
    model = CMGModel(config)
    return jax.eval_shape(
        lambda b: model.init(jax.random.key(0), b, train=False, update_codebook=False), batch)


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def linear_size(d_in: int, d_out: int) -> int:
    """Parameters of a Linear(d_in, d_out) with bias."""
    return d_in * d_out + d_out


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def check_output_shapes(config, batch, outputs, modalities):
    semantic, capacity = config.semantic_dim, config.codebook_capacity
    time, steps = config.input_shape(modalities[0])[0], config.cpc_prediction_steps
    for key in OUTPUT_KEYS - {"active_mask"}:
        assert set(outputs[key]) == set(modalities), key
    assert outputs["active_mask"].shape == (capacity,)
    assert int(outputs["active_mask"].sum()) == config.initial_active_codes
    for m in modalities:
        for key in ("semantic", "quantized", "code_vectors"):
            assert outputs[key][m].shape == (BATCH, time, semantic), (key, m)
        assert outputs["codes"][m].shape == (BATCH, time)
        assert outputs["codes"][m].dtype == jnp.int32
        assert outputs["squared_distances"][m].shape == (BATCH, time, capacity)
        assert outputs["specific"][m].shape == (BATCH, time, config.specific_dim(m))
        assert outputs["reconstruction"][m].shape == batch[m].shape
        assert outputs["cpc_predictions"][m].shape == (BATCH, time, steps, semantic)
        # The straight-through vectors have the value of the chosen code.
        np.testing.assert_allclose(outputs["quantized"][m], outputs["code_vectors"][m], atol=1e-5)


def test_bimodal_shapes_codebook_update_and_straight_through_gradients():
    config = tiny_config(("audio", "text"))
    batch = make_batch(config)
    variables, outputs, state = run_model(config, batch)
    assert set(outputs) == OUTPUT_KEYS  # No adapter -> no router_probs.
    check_output_shapes(config, batch, outputs, ("audio", "text"))
    assert set(variables) == {"params", "quantizer"}
    assert set(variables["params"]) == {
        "semantic_encoder_audio", "semantic_encoder_text", "specific_encoder_audio",
        "specific_encoder_text", "decoder_audio", "decoder_text", "cpc_audio", "cpc_text"}
    # The training forward (update_codebook=True) moved the codebook.
    assert not np.allclose(state["quantizer"]["quantizer"]["embedding"],
                           variables["quantizer"]["quantizer"]["embedding"])

    # The decoders get the straight-through vectors: reconstruction trains the semantic encoders.
    def reconstruction_error(params):
        outputs = CMGModel(config).apply({**variables, "params": params}, batch, train=False,
                                         update_codebook=False)
        errors = [outputs["reconstruction"][m] - batch[m] for m in ("audio", "text")]
        return sum(jnp.mean(jnp.square(error)) for error in errors)

    grads = jax.jit(jax.grad(reconstruction_error))(variables["params"])
    for m in ("audio", "text"):
        assert np.abs(grads[f"semantic_encoder_{m}"]["input_projection"]["kernel"]).max() > 0
        assert np.abs(grads[f"specific_encoder_{m}"]["linear"]["kernel"]).max() > 0


@pytest.fixture(scope="module")
def trimodal():
    """Tiny video-audio-text model with the CMoE-Adapter: (config, batch, variables, outputs)."""
    config = tiny_config(("video", "audio", "text"), adapter_experts=3)
    batch = make_batch(config)
    variables, outputs, _ = run_model(config, batch)
    return config, batch, variables, outputs


def test_trimodal_with_video_and_adapter_shapes(trimodal):
    config, batch, variables, outputs = trimodal
    assert set(outputs) == OUTPUT_KEYS | {"router_probs"}
    check_output_shapes(config, batch, outputs, config.modalities)
    for m in config.modalities:
        assert outputs["router_probs"][m].shape == (BATCH, 4, 3)
        np.testing.assert_allclose(outputs["router_probs"][m].sum(-1), 1.0, rtol=1e-5)
    assert set(variables["params"]["adapter"]) == {
        "router", "common", "specific_video", "specific_audio", "specific_text"}
    assert {name.rsplit("_", 1)[0] for name in variables["params"]} == {
        "video_pooler", "semantic_encoder", "specific_encoder", "decoder", "cpc", "adapter"}


def test_subset_of_modalities_and_encode(trimodal):
    config, batch, variables, _ = trimodal
    model = CMGModel(config)
    subset = {m: batch[m] for m in ("video", "text")}
    evaluate = jax.jit(lambda v, b: model.apply(v, b, train=False, update_codebook=False))
    outputs = evaluate(variables, subset)
    check_output_shapes(config, subset, outputs, ("video", "text"))
    assert set(outputs["router_probs"]) == {"video", "text"}
    # encode() on the full batch agrees with the subset run: a modality's codes do not depend on
    # the other modalities in the batch, and encode is the deterministic evaluation path.
    encoded = jax.jit(lambda v, b: model.apply(v, b, method=CMGModel.encode))(variables, batch)
    assert set(encoded) == set(config.modalities)
    embedding = variables["quantizer"]["quantizer"]["embedding"]
    for m in subset:
        codes, vectors = encoded[m]
        np.testing.assert_array_equal(codes, outputs["codes"][m])
        np.testing.assert_array_equal(vectors, embedding[codes])


def test_reference_parameter_counts():
    """Reference §1.4 figures, corrected by exactly what our deviations change (cmg docstring)."""
    config = reference_config()
    variables = abstract_variables(config)
    groups = {name: count(tree) for name, tree in variables["params"].items()}
    club = CLUBEstimators.for_model(config)
    code_vectors = {m: jnp.zeros((1, 10, 256)) for m in config.modalities}
    groups["club"] = count(jax.eval_shape(lambda: club.init(jax.random.key(0), code_vectors)))
    for name, value in sorted(groups.items()):
        print(f"{name:26s} {value / 1e6:8.3f}M")

    def total(prefixes):
        return sum(v for k, v in groups.items() if k.startswith(prefixes))

    # Raw 768-d text instead of the 256-d BiLSTM output: text ITRM input, specific, decoder.
    text_encoder_extra = 2 * (linear_size(768, 256) - linear_size(256, 256))
    text_decoder_extra = linear_size(512, 768) - linear_size(512, 256)
    unused_class_heads = 3 * (linear_size(256, 256) + linear_size(256, 141))
    encoder = total(("video_pooler", "semantic_encoder", "specific_encoder"))
    decoders = total(("decoder",))
    assert abs(groups["specific_encoder_video"] - 72.4e6) <= 0.01 * 72.4e6
    assert abs(encoder - text_encoder_extra - 77.8e6) <= 0.05e6
    assert abs(decoders - text_decoder_extra + unused_class_heads - 37.4e6) <= 0.05e6
    assert abs(groups["decoder_video"] - 36.8e6) <= 0.05e6
    assert abs(total(("cpc",)) - 3.36e6) <= 0.005e6
    assert abs(groups["club"] - 0.66e6) <= 0.005e6
    assert variables["quantizer"]["quantizer"]["embedding"].shape == (400, 256)


def test_new_modality_at_a_later_stage_adds_only_its_own_params():
    def param_shapes(config):
        params = abstract_variables(config)["params"]
        return {jax.tree_util.keystr(path): leaf.shape
                for path, leaf in jax.tree_util.tree_leaves_with_path(params)}

    stage_one = param_shapes(tiny_config(("video", "text"), adapter_experts=3))
    stage_two = param_shapes(tiny_config(("video", "text", "audio"), adapter_experts=3))
    assert {path: stage_two[path] for path in stage_one} == stage_one
    added = set(stage_two) - set(stage_one)
    assert added and all("_audio'" in path for path in added)
    assert any(path.startswith("['adapter']['specific_audio']") for path in added)


def test_cpc_predictions_are_causal():
    head = CPCHead(hidden=8, num_layers=2, prediction_steps=2)
    sequence = jax.random.normal(jax.random.key(0), (2, 6, 5))
    params = jax.jit(head.init)(jax.random.key(1), sequence)
    apply = jax.jit(head.apply)
    predictions = apply(params, sequence)
    assert predictions.shape == (2, 6, 2, 5)
    cut = 3
    changed = sequence.at[:, cut + 1:].set(jax.random.normal(jax.random.key(2), (2, 2, 5)))
    changed_predictions = apply(params, changed)
    np.testing.assert_allclose(changed_predictions[:, :cut + 1], predictions[:, :cut + 1],
                               rtol=1e-6)
    assert not np.allclose(changed_predictions[:, cut + 1:], predictions[:, cut + 1:])
    # A truncated run (what the reference computes at step `cut`) gives the same prediction.
    truncated = apply(params, sequence[:, :cut + 1])
    np.testing.assert_allclose(truncated[:, cut], predictions[:, cut], rtol=1e-6)


def test_lstm_layer_follows_pytorch_gate_order():
    layer = LSTMLayer(hidden=3)
    inputs = jax.random.normal(jax.random.key(0), (1, 2, 4))
    params = layer.init(jax.random.key(1), inputs)["params"]
    assert all(np.abs(v).max() <= 1 / math.sqrt(3) for v in params.values())
    hidden, cell = np.zeros(3), np.zeros(3)
    for t in range(2):
        gates = inputs[0, t] @ params["w_ih"] + hidden @ params["w_hh"]
        gates = np.asarray(gates + params["b_ih"] + params["b_hh"])
        i, f, g, o = np.split(gates, 4)  # PyTorch order: input, forget, cell, output.
        cell = sigmoid(f) * cell + sigmoid(i) * np.tanh(g)
        hidden = sigmoid(o) * np.tanh(cell)
    outputs = layer.apply({"params": params}, inputs)
    np.testing.assert_allclose(outputs[0, -1], hidden, rtol=1e-5, atol=1e-6)


def test_pytorch_default_initialisation_bounds():
    linear = Dense(64).init(jax.random.key(0), jnp.zeros((1, 100)))["params"]
    assert 0.09 < np.abs(linear["kernel"]).max() <= 0.1
    assert np.abs(linear["bias"]).max() <= 0.1
    # ConvTranspose2d: PyTorch's fan_in is out_channels x kernel area.
    deconv = ConvTranspose(16, 3).init(jax.random.key(0), jnp.zeros((1, 3, 3, 400)))["params"]
    bound = 1 / math.sqrt(16 * 9)
    assert bound * 0.9 < np.abs(deconv["kernel"]).max() <= bound
    assert np.abs(deconv["bias"]).max() <= bound


def test_video_pooler_sum_reproduces_reference_and_attention_is_convex():
    # Every position holds the same vector: attention (weights sum to 1) returns that position's
    # channel-attended vector, the reference's singleton-axis softmax returns H*W times it.
    pixel = jax.random.normal(jax.random.key(0), (8,))
    frame = jnp.broadcast_to(pixel, (1, 1, 5, 5, 8))
    params = jax.jit(VideoSpatialPooler("sum").init)(jax.random.key(1), frame)
    summed = jax.jit(VideoSpatialPooler("sum").apply)(params, frame)
    attended = jax.jit(VideoSpatialPooler("attention").apply)(params, frame)
    np.testing.assert_allclose(summed, 25 * attended, rtol=1e-5)
    se = params["params"]
    gate = jax.nn.sigmoid(jax.nn.relu(pixel @ se["se_reduce"]["kernel"]) @ se["se_expand"]["kernel"])
    np.testing.assert_allclose(attended[0, 0], pixel * (1 + gate), rtol=1e-5)


def numpy_reference_residual_stack(x, kernel_3x3, kernel_1x1):
    """The reference's one-layer ResidualStack (main_model_2.py `ResidualLayer` + `ResidualStack`)
    on one NHWC map in float64, its in-place ReLU written out as a write into x.

    Reference: res_block = Sequential(ReLU(inplace=True), Conv3x3(pad 1, no bias),
    ReLU(inplace=True), Conv1x1(no bias)); layer(x) = x + res_block(x); stack: F.relu(layer(x)).
    The first ReLU modifies x itself, so the sum sees the rectified x.
    """
    x = np.array(x, np.float64)
    np.maximum(x, 0.0, out=x)  # nn.ReLU(inplace=True) on the block input.
    height, width, _ = x.shape
    padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
    hidden = np.zeros((height, width, kernel_3x3.shape[-1]))
    for h in range(height):
        for w in range(width):
            for i in range(3):
                for j in range(3):
                    hidden[h, w] += padded[h + i, w + j] @ kernel_3x3[i, j]  # cross-correlation
    np.maximum(hidden, 0.0, out=hidden)  # the second in-place ReLU
    residual = hidden @ kernel_1x1[0, 0]
    return np.maximum(x + residual, 0.0), residual


def test_residual_stack_skip_path_is_rectified_as_in_the_reference(precision):
    dtype, rtol = precision
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 4, 5, 3)).astype(dtype)
    assert (x < 0).any()
    params = {"conv_3x3": {"kernel": rng.normal(size=(3, 3, 3, 6)).astype(dtype)},
              "conv_1x1": {"kernel": rng.normal(size=(1, 1, 6, 3)).astype(dtype)}}
    result = jax.jit(ResidualStack(6).apply)({"params": params}, x)
    kernels = [np.asarray(params[name]["kernel"], np.float64) for name in ("conv_3x3", "conv_1x1")]
    expected, residual = numpy_reference_residual_stack(x[0], *kernels)
    np.testing.assert_allclose(result[0], expected, rtol=rtol, atol=rtol)
    # relu(x + residual), with the un-rectified skip path, differs where x < 0.
    unrectified_skip = np.maximum(np.asarray(x[0], np.float64) + residual, 0.0)
    assert np.abs(unrectified_skip - expected).max() > 0.1


def test_club_estimators():
    config = tiny_config(("video", "text"))
    club = CLUBEstimators.for_model(config)
    x = {"text": jnp.ones((2, 4, 16))}
    params = club.init(jax.random.key(0), x)["params"]
    assert set(params) == {"mu_text", "logvar_text"}
    (mu, logvar), = club.apply({"params": params}, x).values()
    assert mu.shape == logvar.shape == (2, 4, 12)
    assert np.abs(logvar).max() < 1.0


def test_config_from_config_dict_and_errors():
    cfg = ml_collections.ConfigDict({
        "model": {"modalities": ("audio", "text"),
                  "input_shapes": {"audio": (10, 128), "text": (10, 768)}, "adapter_experts": 6},
        "quantizer": {"codebook_capacity": 512, "initial_active_codes": 400, "beta": 0.25},
    })
    config = CMGModelConfig.from_config(cfg)
    assert config.input_shapes == (("audio", (10, 128)), ("text", (10, 768)))
    assert (config.codebook_capacity, config.initial_active_codes) == (512, 400)
    assert config.adapter_experts == 6
    assert config.ema_order == ("audio", "video", "text")  # the reference's MM-EMA order
    assert hash(config) == hash(CMGModelConfig.from_config(cfg))
    cfg.quantizer.ema_order = ["text", "audio"]
    assert CMGModelConfig.from_config(cfg).ema_order == ("text", "audio")
    bound = CMGModel(CMGModelConfig.from_config(cfg)).bind({})
    assert bound.quantizer.ema_order == ("text", "audio")
    cfg.quantizer.ema_order = ("text", "text")
    with pytest.raises(ValueError, match="ema_order"):
        CMGModelConfig.from_config(cfg)
    del cfg.quantizer["ema_order"]

    cfg.model.num_layer = 3
    with pytest.raises(ValueError, match="num_layer"):
        CMGModelConfig.from_config(cfg)
    with pytest.raises(ValueError, match="H, W >= 5"):
        tiny_config(("video",), input_shapes={"video": (4, 3, 3, 8)})
    with pytest.raises(ValueError, match="specific_dims.image"):
        CMGModelConfig(modalities=("image",), input_shapes={"image": (1, 64)})
    model = CMGModel(tiny_config(("audio", "text")))
    with pytest.raises(ValueError, match=r"batch\['audio'\] has shape"):
        model.init(jax.random.key(0), {"audio": jnp.zeros((2, 4, 7))}, train=False,
                   update_codebook=False)
