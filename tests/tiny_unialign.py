"""A tiny UniAlign config (random 1-layer BERT backbone, synthetic world) shared by the UniAlign tests."""

from __future__ import annotations

from unialign_jax import configlib
from unialign_jax.methods.unialign import config as ua_config

SHAPES = {"image": (4, 6), "audio": (4, 5), "text": (4, 16)}


def tiny_unialign_config(data_dir: str, *, steps: int = 3, accumulation_steps: int = 2, micro_batch: int = 8, **switches):
    """image + audio encoded, text the anchor; `switches` as the arg string (e.g. soft_bind=False)."""
    arg = ua_config.parse_ablation_arg(",".join(f"{k}={v}" for k, v in switches.items()))
    config = ua_config.base_config(arg)
    config.model.modalities = ("image", "audio", "text")
    config.model.input_shapes = dict(SHAPES)
    config.model.backbone = "bert"
    config.model.backbone_weights = ""
    config.model.transformer = dict(width=16, depth=1, num_heads=2, mlp_dim=32, norm_position="post",
                                    activation="gelu", layer_norm_epsilon=1e-12)
    config.model.bert_max_positions = 8
    config.model.embed_dim = 16
    config.model.tokenizers = {"image": dict(kind="features"), "audio": dict(kind="features")}
    config.accumulation = dict(steps=accumulation_steps, micro_batch_sizes={"image": micro_batch, "audio": micro_batch})
    config.batch_size = accumulation_steps * 2 * micro_batch
    config.optim.learning_rate = 1e-2
    config.log_every = 2
    config.checkpoint.every = 2
    config.anchors.source = "text_centroids"
    config.teachers.modalities = ("image",)
    config.teachers.dims = {"image": 16}
    config.teachers.auto_train = True
    config.teachers.steps = 20
    config.teachers.hidden_dim = 16
    config.teachers.batch_size = 32
    data = configlib.synthetic_data(("image", "audio", "text"), SHAPES, num_train=64, num_test=32)
    data.data_dir = data_dir
    datasets = {"image": data, "audio": data}
    config.stages = [ua_config.unialign_stage("unialign", config.model.modalities, datasets, steps=steps)]
    config.eval.data = dict(datasets)
    config.eval.batch_size = 16
    return config
