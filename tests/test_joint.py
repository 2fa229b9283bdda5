"""A stage of several bimodal groups trained together in mixed batches (the joint bound)."""

import json

import numpy as np
import pytest

from unialign_jax import loop, train
from unialign_jax.configlib import ConfigError
from unialign_jax.methods.cmg import config as cmg_config
from unialign_jax.methods.cmg import model as cmg_model

from tiny import tiny_joint_config


def test_joint_config_is_one_stage_of_three_pairs_that_never_pairs_video_and_audio():
    config = cmg_config.joint_config("data=synthetic", [("video", "text"), ("audio", "text"), ("image", "text")])
    (stage,) = loop.stage_specs(config)
    assert stage.pairs == (("video", "text"), ("audio", "text"), ("image", "text")) and stage.mediator is None
    assert set(stage.modalities) == {"video", "text", "audio", "image"}
    assert [tuple(d.concepts) for d in stage.pair_data] == [(0, 1, 2, 3, 4, 5), (2, 3, 4, 5, 6, 7), (4, 5, 6, 7, 8, 9)]
    assert config.quantizer.initial_active_codes == config.quantizer.codebook_capacity == 80


def test_joint_stage_trains_every_group_on_its_own_stream(tmp_path):
    config = tiny_joint_config(str(tmp_path / "data"), steps=4)
    (stage,) = loop.stage_specs(config)
    batch = next(cmg_model.train_iterator(config, stage))
    assert sorted(batch) == ["audio/inputs", "audio/label", "audio/text", "image/inputs", "image/label", "image/text"]
    # Own shuffles of their own class subsets: the groups' rows are different examples.
    assert set(batch["audio/label"]) <= set(range(6)) and set(batch["image/label"]) <= set(range(3, 9))
    assert not np.array_equal(batch["audio/text"], batch["image/text"])

    workdir = tmp_path / "run"
    results = train.run(config, str(workdir))
    logged = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in logged if "loss/total" in row]
    assert train_rows and all(f"{g}/commitment/{m}" in row for row in train_rows
                              for g, m in (("audio_text", "audio"), ("image_text", "image")))
    assert "classification/audio->image" in results[0]["metrics"]  # the never-paired pair is evaluated


def test_stage_pairs_are_validated():
    def joint():
        return cmg_config.joint_config("data=synthetic", [("video", "text"), ("audio", "text")])

    bad = joint()
    bad.stages[0].pairs[1].modalities = ("video", "audio")
    with pytest.raises(ConfigError, match="lead modality 'video' repeats"):
        cmg_config.validate(bad, dataset_modalities=lambda data: ("video", "audio", "text"))
    bad = joint()
    bad.stages[0].modalities = ("video", "text")
    with pytest.raises(ConfigError, match="union of its pairs"):
        cmg_config.validate(bad, dataset_modalities=lambda data: ("video", "audio", "text"))
    with pytest.raises(ConfigError, match=r"pairs\[1\].data: dataset 'synthetic' has no modality \['audio'\]"):
        cmg_config.validate(joint(), dataset_modalities=lambda data: ("video", "text"))
    cmg_config.validate(joint(), dataset_modalities=lambda data: tuple(data.modality_shapes))
