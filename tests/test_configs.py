"""Every shipped config builds and validates; `data=features` trains on a converted feature set."""

import importlib.util
import pathlib

import numpy as np
import pytest

from unialign_jax import report
from unialign_jax import train
from unialign_jax.configlib import ConfigError
from unialign_jax.data import features, pipeline
from unialign_jax.methods.cmg import config as cmg_config
from unialign_jax.methods.unialign import config as ua_config

from tiny import TINY_SHAPES, tiny_cmg_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.mark.parametrize("name, arg", [
    ("cmg_avt", None), ("cmg_avt", "modalities=audio+text"), ("cmg_avt", "size=reference,data=synthetic"),
    ("comet_vt_at_it", None), ("comet_vt_at_it", "pm=false,moe=false,seed=2"), ("comet_at_vt_it", None),
    ("comet_vt_st_at", None), ("dcid_vt_at_it", None), ("comet_vt_at_it", "data=numbers"),
    ("dcid_vt_at_it", "data=numbers"), ("comet_at_vt_it", "data=numbers"),
])
def test_config_builds_and_validates(name, arg):
    config = load(name, arg)
    cmg_config.validate(config, pipeline.dataset_modalities)
    assert config.stages and all(s.steps > 0 for s in config.stages)


def test_speech_falls_back_to_the_synthetic_world_and_digits_is_the_default():
    assert load("comet_vt_st_at").stages[1].data.name == "synthetic"
    assert {s.data.name for s in load("comet_vt_at_it").stages} == {"digits"}
    assert load("dcid_vt_at_it").model.adapter_experts == 0


def test_numbers_stages_bring_new_concept_windows_from_each_modality_dataset():
    config = load("comet_vt_at_it", "data=numbers")
    assert [(s.data.dataset, s.data.concepts[0], s.data.concepts[-1], len(s.data.concepts)) for s in config.stages] == [
        ("handwritten", 0, 39, 40), ("spoken", 30, 69, 40), ("handwritten", 60, 99, 40)]
    assert {m: d.dataset for m, d in config.eval.data.items()} == {
        "video": "handwritten", "text": "handwritten", "audio": "spoken", "image": "handwritten"}
    assert all(d.concepts == tuple(range(100)) for d in config.eval.data.values()) and not config.eval.paired
    assert load("comet_vt_st_at", "data=numbers").stages[1].data.name == "synthetic"  # numbers has no speech


def test_unialign_numbers_config_holds_out_concepts_and_trains_teachers_elsewhere():
    config = load("unialign_numbers")
    ua_config.validate(config)
    data = config.stages[0].data
    assert {m: data[m].dataset for m in ("image", "video", "audio", "printed")} == {
        "image": "handwritten", "video": "handwritten", "audio": "spoken", "printed": "printed"}
    assert data["audio"].concepts["test"] == tuple(range(20, 80))
    assert data["audio"].concepts["train"] == tuple(n for n in range(20, 80) if n % 10 != 8)
    assert set(config.teachers.dims.values()) == {256} != {config.model.embed_dim}
    for modality, teacher_data in config.teachers.data.items():
        assert teacher_data.concepts == tuple(range(100)) and teacher_data.seed != data[modality].seed


def test_bad_arg_strings_name_the_problem():
    with pytest.raises(ValueError, match="Unknown config arg 'sizes'"):
        load("cmg_avt", "sizes=small")
    with pytest.raises(ValueError, match="Unknown modality 'smell'"):
        load("cmg_avt", "modalities=audio+smell")
    with pytest.raises(ValueError, match="datasets=NAME1"):
        load("comet_vt_at_it", "data=features,eval_dataset=x")


@pytest.mark.parametrize("field, value, message", [
    ("log_every", 0, "config.log_every must be a positive integer, got 0"),
    ("batch_size", 0, "config.batch_size must be a positive integer, got 0"),
    ("checkpoint.every", 0, "config.checkpoint.every must be a positive integer, got 0"),
    ("optim.learning_rate", -1e-3, "config.optim.learning_rate must be a positive number, got -0.001"),
])
def test_loop_fields_are_checked_before_anything_compiles(field, value, message):
    for config in (load("comet_vt_at_it"), load("unialign_digits", "data=synthetic")):
        *parents, leaf = field.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
        method_config = cmg_config if config.method == "cmg" else ua_config
        with pytest.raises(ConfigError, match=message):
            method_config.validate(config, lambda data: tuple(config.model.modalities))


def test_report_help_prints_usage_and_exits_zero(capsys):
    report.main(["--help"])
    assert "usage: python -m unialign_jax.report" in capsys.readouterr().out


def test_cmg_config_trains_on_converted_features(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 64)
    arrays = {m: (labels[:, None, None] + rng.normal(size=(64, *TINY_SHAPES[m]))).astype(np.float32)
              for m in ("audio", "text")}
    np.savez(tmp_path / "train.npz", **arrays, label=labels, id=np.arange(64))
    np.savez(tmp_path / "test.npz", **{m: a[:32] for m, a in arrays.items()}, label=labels[:32],
             id=np.arange(100, 132))
    features.convert("tinyfeat", {"train": tmp_path / "train.npz", "test": tmp_path / "test.npz"},
                     data_dir=tmp_path / "data")

    config = load("cmg_avt", "data=features,dataset=tinyfeat,modalities=audio+text")
    assert config.stages[0].data.name == "features" and config.eval.paired
    tiny = tiny_cmg_config(str(tmp_path / "data"), steps=2)
    for field in ("model", "quantizer", "eval"):
        config[field] = tiny[field]
    config.batch_size = 16
    config.stages[0].steps = 2
    config.stages[0].codebook_rows = tiny.quantizer.initial_active_codes
    for data in (config.stages[0].data, config.eval.data):
        data.data_dir = str(tmp_path / "data")
    config.eval.data = config.stages[0].data
    results = train.run(config, str(tmp_path / "run"))
    assert "retrieval/audio->text/R@1" in results[0]["metrics"]
