"""Tiny training runs on TINY numbers builds: COMET over two stages with per-modality evaluation datasets,
and UniAlign with each dataset's own label words and teachers of another width (their anchor features)."""

import io

import numpy as np
import pytest
from etils import epath
from tiny import tiny_continual_config
from tiny_unialign import tiny_unialign_config

from unialign_jax import configlib, train
from unialign_jax.configlib import ConfigError
from unialign_jax.data import pipeline
from unialign_jax.methods.cmg import config as cmg_config
from unialign_jax.methods.unialign import teachers

STEPS = 4  # seq_len of the tiny builds
CONCEPTS = (3, 7, 47, 90)


def tiny_numbers(data_dir, dataset, concepts=CONCEPTS, seed=0):
    config = configlib.numbers_data(dataset, concepts=concepts, seed=seed)
    config.update({"data_dir": str(data_dir), "seq_len": STEPS, "train_per_concept": 4, "test_per_concept": 2})
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


def test_comet_trains_and_evaluates_over_unpaired_numbers_datasets(data_dir, tmp_path):
    config = tiny_continual_config(str(data_dir), steps=2)
    config.model.input_shapes = {"audio": (STEPS, 40), "text": (STEPS, 384), "image": (STEPS, 16)}
    spoken = tiny_numbers(data_dir, "spoken", concepts=(3, 7, 47))
    handwritten = tiny_numbers(data_dir, "handwritten", concepts=(7, 47, 90))
    config.stages[0].data, config.stages[1].data = spoken, handwritten
    config.eval.data = {"audio": spoken, "text": spoken, "image": handwritten}  # few builds: the stages' own
    config.eval.paired = False
    config.eval.head_steps = 5
    first, second = train.run(config, str(tmp_path / "run"))
    assert first["modalities"] == ["audio", "text"] and second["modalities"] == ["image", "text"]
    metrics = second["metrics"]
    for pair in ("image->audio", "audio->image", "image->text"):  # image and audio read different datasets
        assert 0.0 <= metrics[f"classification/{pair}"] <= 1.0
        assert 0.0 <= metrics[f"retrieval/{pair}/R@1"] <= 1.0
    assert "forgetting/classification/audio->text" in metrics

    config.eval.paired = True  # rows of different datasets are not instance pairs: refused before training
    with pytest.raises(ConfigError, match="paired"):
        cmg_config.validate(config)


def test_unialign_trains_with_own_label_words_and_teachers_of_another_width(data_dir, tmp_path):
    config = tiny_unialign_config(str(data_dir), steps=2)
    config.model.input_shapes = {"image": (STEPS, 16), "audio": (STEPS, 40), "text": (STEPS, 384)}
    config.model.transformer.width = 384
    config.model.embed_dim = 384
    config.anchors.source = "minilm_prompts"
    config.anchors.templates = {"image": "{name}", "audio": "{name}"}
    config.anchors.cache_dir = str(tmp_path / "anchors")
    datasets = {"image": tiny_numbers(data_dir, "handwritten", concepts={"train": (3, 7), "test": (3, 7, 47)}),
                "audio": tiny_numbers(data_dir, "spoken", concepts={"train": (7, 47), "test": (3, 7, 47)})}
    config.stages[0].data = dict(datasets)
    config.eval.data = dict(datasets)
    config.teachers.modalities = ("image", "audio")
    config.teachers.dims = {"image": 8, "audio": 8}  # not the anchor's 384: the teachers cache anchor features
    config.teachers.data = {m: tiny_numbers(data_dir, d, seed=5) for m, d in (("image", "handwritten"),
                                                                             ("audio", "spoken"))}
    workdir = str(tmp_path / "run")
    (result,) = train.run(config, workdir)
    for modality in ("image", "audio"):
        assert 0.0 <= result["metrics"][f"zero_shot/{modality}/top1"] <= 1.0
        assert result["metrics"][f"zero_shot/{modality}/chance_top1"] == pytest.approx(1 / 100)  # 100 label words
        stored = np.load(io.BytesIO((epath.Path(teachers.teacher_dir(config, workdir)) / f"{modality}.npz").read_bytes()))
        num_train = len(pipeline.build_source(datasets[modality], "train"))  # the student's split, not the teacher's
        assert stored["features"].shape == stored["anchor_features"].shape == (num_train, 8)
        np.testing.assert_allclose(np.linalg.norm(stored["anchor_features"], axis=-1), 1.0, rtol=1e-5)
