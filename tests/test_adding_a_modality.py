"""docs/adding_a_modality.md end to end: a toy modality (`tactile`) registered, rendered by the
synthetic world, trained with text by a tiny CMG config, evaluated, and embedded from a .npy file."""

import numpy as np
import pytest

import unialign_jax
from unialign_jax import methods
from unialign_jax import embed
from unialign_jax import train
from unialign_jax.configlib import ConfigError
from unialign_jax.data import pipeline
from unialign_jax.inputs import InputError

from test_embed import parse_flags
from tiny import TINY_SHAPES, tiny_cmg_config

TACTILE_SHAPE = (6, 9)


@pytest.fixture
def tactile(monkeypatch):
    """`tactile` registered for the test only (removed from MODALITIES afterwards)."""
    pipeline.register_modality("tactile")
    monkeypatch.setitem(TINY_SHAPES, "tactile", TACTILE_SHAPE)
    yield "tactile"
    pipeline.MODALITIES.remove("tactile")


def test_an_unregistered_modality_is_refused_naming_it(tmp_path, monkeypatch):
    monkeypatch.setitem(TINY_SHAPES, "tactile", TACTILE_SHAPE)
    config = tiny_cmg_config(str(tmp_path / "data"), modalities=("tactile", "text"))
    with pytest.raises(ConfigError, match="config.model.modalities: unknown modality 'tactile'"):
        methods.for_config(config).validate(config)
    with pytest.raises(ValueError, match="modality name 'Touch!'"):
        pipeline.register_modality("Touch!")


def test_a_new_modality_trains_evaluates_and_embeds(tactile, tmp_path, monkeypatch, capsys):
    config = tiny_cmg_config(str(tmp_path / "data"), modalities=(tactile, "text"), steps=4)
    assert pipeline.feature_shapes(config.stages[0].data) == {"text": (6, 16), tactile: TACTILE_SHAPE}
    workdir = str(tmp_path / "run")
    (result,) = train.run(config, workdir)
    for pair in (f"{tactile}->text", f"text->{tactile}"):
        assert 0.0 <= result["metrics"][f"classification/{pair}"] <= 1.0
    assert f"{tactile}->text" in (tmp_path / "run" / "results" / "summary.md").read_text()

    touches = np.random.default_rng(0).standard_normal((3, *TACTILE_SHAPE)).astype(np.float32)
    np.save(tmp_path / "touch.npy", touches)
    model = unialign_jax.load(workdir)
    assert model.embed(tactile, [str(tmp_path / "touch.npy")]).shape == (3, config.model.semantic_dim)
    files, options = parse_flags(embed.define_flags, ["embed", f"--workdir={workdir}", f"--modality={tactile}",
                                                 str(tmp_path / "touch.npy")])
    table = embed.run(files, options)
    assert table.count("touch.npy[") == 3 + 3  # three rows, three columns
    # Zero-shot would embed class names as MiniLM captions: refused, the world's text is not language.
    with pytest.raises(InputError, match=r"'text' inputs are \[6, 16\] from \['synthetic'\] data"):
        model.zero_shot(tactile, touches, ["0", "1"])
