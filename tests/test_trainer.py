"""The train step and the stage loop: compile once, exact resume, checkpoints, progress output."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from unialign_jax import checkpoint as ckpt_lib
from unialign_jax import parallel
from unialign_jax import train
from unialign_jax import loop
from unialign_jax.data import pipeline
from unialign_jax.methods.cmg import model as cmg_model
from unialign_jax.methods.cmg import step as cmg_step

from tiny import tiny_cmg_config


def _run_stage(config, workdir):
    stage = loop.stage_specs(config)[0]
    mesh = parallel.make_mesh(config.mesh)
    return loop.train_stage(config, stage, workdir, mesh,
                            lambda: cmg_model.fresh_state(config, stage, jax.random.key(config.seed)),
                            step_factory=cmg_step.CMGStep, iterator_factory=cmg_model.train_iterator)


def _params(state):
    return jax.tree.leaves(jax.device_get(state.params))


def test_step_compiles_once_and_changes_params_codebook_and_club(tmp_path):
    config = tiny_cmg_config(str(tmp_path / "data"))
    stage = loop.stage_specs(config)[0]
    mesh = parallel.make_mesh(config.mesh)
    state = cmg_model.fresh_state(config, stage, jax.random.key(0))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    shardings = loop.state_shardings(abstract, mesh, config.sharding_rules)
    state = jax.device_put(state, shardings)
    step_fn = cmg_step.CMGStep(config, stage, mesh, abstract, shardings)
    iterator = pipeline.make_train_iterator(stage.data, modalities=stage.modalities, batch_size=16, seed=0)
    before = jax.device_get(state)
    for _ in range(3):
        state, metrics = step_fn(state, parallel.global_batch(next(iterator), mesh))
    assert step_fn.trace_count == 1
    assert int(state.step) == 3
    after = jax.device_get(state)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params)))
    assert not np.allclose(before.quantizer["quantizer"]["embedding"], after.quantizer["quantizer"]["embedding"])
    assert not np.allclose(jax.tree.leaves(before.aux["club_params"])[0], jax.tree.leaves(after.aux["club_params"])[0])
    for name in ("loss/reconstruction", "loss/commitment", "loss/cmcm", "loss/cpc", "loss/club", "loss/total"):
        assert np.isfinite(float(metrics[name])), name


def test_resume_after_interruption_gives_the_same_final_state(tmp_path):
    config = tiny_cmg_config(str(tmp_path / "data"), steps=8)
    uninterrupted = _run_stage(config, str(tmp_path / "a"))
    # Interrupt: a copy of the run without its final checkpoint (only step 4 remains), re-run.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    stage_dir = tmp_path / "b" / loop.stage_specs(config)[0].folder
    shutil.rmtree(stage_dir / "8")
    resumed = _run_stage(config, str(tmp_path / "b"))
    assert int(resumed.step) == 8
    for a, b in zip(_params(resumed), _params(uninterrupted)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(jax.device_get(resumed.quantizer["quantizer"]["embedding"]),
                                  jax.device_get(uninterrupted.quantizer["quantizer"]["embedding"]))
    meta = ckpt_lib.StageCheckpointer(str(stage_dir)).read_meta()
    assert meta["finished"] and meta["codebook_active"] == 32 and meta["modalities"] == ["audio", "text"]


def test_train_run_writes_metrics_results_and_refuses_a_changed_config(tmp_path, capsys):
    config = tiny_cmg_config(str(tmp_path / "data"), steps=4)
    workdir = str(tmp_path / "run")
    results = train.run(config, workdir)
    assert results[0]["metrics"]["classification/audio->text"] >= 0
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [line["step"] for line in lines] == [4]
    summary = json.load(open(os.path.join(workdir, "results", "summary.json")))
    assert summary["stages"][0]["name"] == "pretrain"
    assert "audio->text" in capsys.readouterr().out
    config.loss.weights.cmcm = 0.5
    with pytest.raises(ValueError, match="different config"):
        train.run(config, workdir)


def test_invalid_config_is_rejected_before_compiling(tmp_path):
    config = tiny_cmg_config(str(tmp_path / "data"))
    config.stages[0].modalities = ("audio", "depth")
    with pytest.raises(ValueError, match=r"stages\[0\].modalities.*depth"):
        train.run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_train_writes_tensorboard_events_and_a_profile_window(tmp_path):
    config = tiny_cmg_config(str(tmp_path / "data"), steps=4)
    config.writers = "jsonl,tensorboard"
    config.profile = dict(start_step=2, num_steps=1)
    workdir = tmp_path / "run"
    train.run(config, str(workdir))
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records if "loss/total" in r] == [("pretrain", 4)]
    events = b"".join(path.read_bytes() for path in (workdir / "tensorboard").glob("events.out.tfevents.*"))
    # TensorBoard tags: training scalars, evaluation scalars ('>' becomes '_') and the stage's plot.
    for tag in (b"pretrain/loss/total", b"pretrain/eval/classification/audio-_text",
                b"pretrain/eval/code_usage_stage_1_pretrain"):
        assert tag in events, tag
    assert list((workdir / "profile").rglob("*.xplane.pb"))
    config.writers = "jsonl"  # a tooling field: the rerun resumes (everything is done) instead of refusing
    assert train.run(config, str(workdir))[0]["name"] == "pretrain"
