"""Tiny configs shared by the trainer, continual and sharding tests (compile in seconds on CPU)."""

from __future__ import annotations

from unialign_jax import configlib
from unialign_jax.methods.cmg import config as cmg_config

TINY_SHAPES = {"video": (6, 5, 5, 8), "audio": (6, 12), "text": (6, 16), "image": (6, 10)}


def tiny_cmg_config(data_dir: str, modalities=("audio", "text"), steps: int = 8, seed: int = 0):
    """A one-stage CMG config with a 16-dim model and a small synthetic world in `data_dir`."""
    config = cmg_config.cmg_config(size="small", modalities=modalities)
    config.batch_size = 16
    config.log_every = 4
    config.checkpoint.every = 4
    config.seed = seed
    model = config.model
    model.input_shapes = {m: TINY_SHAPES[m] for m in modalities}
    model.semantic_dim = 16
    model.ffn_dim = 32
    model.num_layers = 1
    model.specific_dims = {m: 16 for m in modalities}
    model.video_encoder_channels = (8, 8)
    model.video_club_dim = 8
    model.cpc_hidden = 16
    model.cpc_layers = 1
    model.club_hidden = 16
    config.quantizer.codebook_capacity = 32
    config.quantizer.initial_active_codes = 32
    config.club.steps = 2
    config.eval.head_steps = 50
    config.eval.max_examples = 200
    config.eval.batch_size = 100
    data = configlib.synthetic_data(tuple(modalities), TINY_SHAPES, num_train=200, num_test=100)
    data.data_dir = data_dir
    config.stages = [configlib.stage("pretrain", tuple(modalities), data, steps=steps, codebook_rows=32)]
    config.eval.data = data
    return config


def tiny_continual_config(data_dir: str, steps: int = 4, comet: bool = True):
    """Two COMET stages (audio-text, then image-text, text mediating) on the tiny model."""
    config = tiny_cmg_config(data_dir, modalities=("audio", "text", "image"), steps=steps)
    config.model.adapter_experts = 3 if comet else 0
    config.loss.weights.gate = 1.0 if comet else 0.0
    config.continual.pseudo_modality = comet
    config.continual.ewc = comet
    config.continual.fisher_batches = 2
    config.continual.growth_examples = 64
    config.quantizer.codebook_capacity = 24
    config.quantizer.initial_active_codes = 16
    first = configlib.synthetic_data(("audio", "text"), TINY_SHAPES, concepts=(0, 1, 2, 3, 4, 5),
                                     num_train=200, num_test=100)
    second = configlib.synthetic_data(("image", "text"), TINY_SHAPES, concepts=(3, 4, 5, 6, 7, 8),
                                      num_train=200, num_test=100)
    for data in (first, second, config.eval.data):
        data.data_dir = data_dir
    config.stages = [configlib.stage("audio_text", ("audio", "text"), first, steps=steps, codebook_rows=16),
                     configlib.stage("image_text", ("image", "text"), second, steps=steps, codebook_rows=8,
                                     mediator="text")]
    return config


def tiny_joint_config(data_dir: str, steps: int = 4):
    """ONE stage training audio-text and image-text together (mixed batches) on the tiny model."""
    config = tiny_cmg_config(data_dir, modalities=("audio", "text", "image"), steps=steps)
    groups = []
    for pair, concepts in ((("audio", "text"), (0, 1, 2, 3, 4, 5)), (("image", "text"), (3, 4, 5, 6, 7, 8))):
        data = configlib.synthetic_data(pair, TINY_SHAPES, concepts=concepts, num_train=200, num_test=100)
        data.data_dir = data_dir
        groups.append((pair, data))
    config.stages = [configlib.stage("joint", ("audio", "text", "image"), groups[0][1], steps=steps,
                                     codebook_rows=32, pairs=tuple(groups))]
    return config
