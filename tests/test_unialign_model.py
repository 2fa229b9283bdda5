"""The UniAlign model (nn.unialign) and its configs: pretrained overlay, heads, freezing table, ViT-B size."""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from unialign_jax import optim
from unialign_jax.nn.transformer import BertTextEncoder, Encoder, TransformerConfig, mean_pool
from unialign_jax.nn.unialign import (
    TokenizerSpec,
    UniAlignConfig,
    UniAlignModel,
    modality_router_probabilities,
    pretrained_bert_params,
)
from unialign_jax.nn import weights as weights_lib
from unialign_jax.methods.unialign import config as ua_config
from unialign_jax.methods.unialign import model as ua_model

from tiny_unialign import tiny_unialign_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
BERT = TransformerConfig(width=16, depth=2, num_heads=2, mlp_dim=32, norm_position="post", layer_norm_epsilon=1e-12)
INPUTS = {"image": np.random.default_rng(0).normal(size=(3, 5, 6)).astype(np.float32),
          "audio": np.random.default_rng(1).normal(size=(3, 5, 4)).astype(np.float32)}


def _load_config(name):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _model(**overrides):
    tokenizers = (("image", TokenizerSpec("features")), ("audio", TokenizerSpec("features")))
    config = UniAlignConfig("bert", BERT, tokenizers, embed_dim=16, top_k=2, bert_max_positions=8, **overrides)
    return UniAlignModel(config)


def test_untrained_model_is_the_pretrained_bert_on_the_tokens():
    """LoRA B = 0 and zero-initialised heads: the embedding is exactly MiniLM-style pooling of the frozen BERT."""
    bert = BertTextEncoder(Encoder(BERT), vocab_size=11, max_positions=8)
    bert_params = bert.init(jax.random.key(0), jnp.zeros((1, 5), jnp.int32), jnp.ones((1, 5)))["params"]
    bert_params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), bert_params)
    model = _model()
    params = model.init(jax.random.key(1), INPUTS, method=UniAlignModel.init_all)["params"]
    params = weights_lib.overlay_pretrained(params, {"backbone": pretrained_bert_params(bert_params)})
    outputs = model.apply({"params": params}, INPUTS["audio"], "audio")

    tokens = model.apply({"params": params}, INPUTS["audio"], method=lambda m, x: m.tokenizers["audio"](x))
    embeddings = bert_params["embeddings"]
    x = tokens + embeddings["position_embeddings"]["embedding"][:5] + embeddings["token_type_embeddings"]["embedding"][0]
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    x = (x - mean) / jnp.sqrt(var + 1e-12) * embeddings["norm"]["scale"] + embeddings["norm"]["bias"]
    expected = mean_pool(Encoder(BERT).apply({"params": bert_params["encoder"]}, x))
    np.testing.assert_allclose(outputs["embedding"], expected, rtol=1e-5, atol=1e-6)
    assert float(outputs["log_logit_scale"]) == pytest.approx(np.log(1 / 0.07))


def test_routing_is_per_modality_and_sown_for_every_adapter():
    model = _model(routing="grouped", num_experts=2)
    params = model.init(jax.random.key(1), INPUTS, method=UniAlignModel.init_all)["params"]
    _, state = model.apply({"params": params}, INPUTS["image"], "image", mutable=["intermediates"])
    probabilities = modality_router_probabilities(state["intermediates"])
    assert probabilities.shape == (2 * BERT.depth, 3, 5, 2)  # fc1 + fc2 adapter per layer
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-6)
    router = params["backbone"]["encoder"]["layer_0"]["mlp"]["fc1_adapter"]["router"]
    assert router.shape == (2, 16, 2)  # one router per modality


def test_freezing_table_and_groups_cover_every_parameter(tmp_path):
    config = tiny_unialign_config(str(tmp_path))
    params = jax.eval_shape(functools.partial(ua_model.init_params, config), jax.random.key(0))
    frozen, trainable = optim.split_params(params, config.frozen_patterns)
    frozen_paths = set(traverse_util.flatten_dict(frozen, sep="/"))
    assert frozen_paths and all(p.startswith("backbone/") and "adapter" not in p for p in frozen_paths)
    backbone = [p for p in traverse_util.flatten_dict(params, sep="/") if p.startswith("backbone/")]
    assert {p for p in backbone if "_adapter/" not in p} == frozen_paths  # every non-adapter backbone weight
    labels = traverse_util.flatten_dict(optim.group_labels(trainable, config.optim.groups), sep="/")
    assert set(labels.values()) == {"adapters", "tokenizers", "heads", "logit_scale"}


def test_validation_names_the_field(tmp_path):
    config = tiny_unialign_config(str(tmp_path))
    config.batch_size = 30
    with pytest.raises(ua_config.ConfigError, match="batch_size=30"):
        ua_config.validate(config, lambda data: ("image", "audio", "text"))
    config = tiny_unialign_config(str(tmp_path))
    with pytest.raises(ua_config.ConfigError, match=r"stages\[0\].data.image.*\['text'\]"):
        ua_config.validate(config, lambda data: ("image", "audio"))


def test_vitb_config_builds_abstractly_and_reports_its_parameter_count():
    vitb = _load_config("unialign_vitb")
    config = vitb.get_config()
    counts = ua_model.parameter_counts(config)  # jax.eval_shape: no weights needed
    width, layers, mlp = 768, 12, 3072
    groups, experts, rank = 5, 2, 4  # image, video, audio, depth, points
    lora = rank * (width + mlp) * 2  # one expert on fc1 (768 -> 3072) and one on fc2 (3072 -> 768)
    routers = (width + mlp) * experts * groups
    assert counts["adapters"] == layers * (groups * experts * lora + routers) == 4_147_200
    # CLIP ViT-B/16 vision tower incl. its patch embedding (frozen, image tokenizer) and projection.
    assert counts["frozen"] == 86_191_872
    trainable = sum(v for k, v in counts.items() if k != "frozen")
    assert 5e6 < trainable < 12e6
    table = ua_model.parameter_table(config)
    assert "trainable total" in table and f"{trainable:,d}" in table
    parallel = ua_model.parameter_counts(vitb.get_config("placement=parallel"))
    assert parallel["adapters"] == layers * (groups * experts * rank * width * 2 + width * experts * groups)
