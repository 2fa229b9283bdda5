"""Runs that never lose or poison data: one-line CLI errors, non-finite steps, damaged checkpoints,
a locked workdir, pinned data and SIGTERM preemption."""

import json
import os
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
import scipy.io.wavfile

from unialign_jax import checkpoint as ckpt_lib
from unialign_jax import configlib
from unialign_jax import files
from unialign_jax import loop
from unialign_jax import parallel
from unialign_jax import train
from unialign_jax.data import identity
from unialign_jax.errors import Interrupted
from unialign_jax.methods.cmg import model as cmg_model
from unialign_jax.methods.cmg import step as cmg_step

from tiny import tiny_cmg_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, **kwargs)


CLI_MISTAKES = {  # name: (train arguments after --config, the error line it must print)
    "misspelt override": (["configs/cmg_avt.py", "--config.optim.learning_rat=1"],
                          "error: 'learning_rat'; Did you mean \"learning_rate\" instead of \"learning_rat\"?"),
    "arg that is not an integer": (["configs/comet_vt_at_it.py:seed=abc"],
                                   "error: Config arg 'seed' must be an integer, got 'abc'."),
    "unknown optimizer": (["configs/cmg_avt.py", "--config.optim.name=sgd"],
                          "error: config.optim.name: unknown value 'sgd' (known: adam, adamw)."),
    "log_every=0": (["configs/cmg_avt.py", "--config.log_every=0"],
                    "error: config.log_every must be a positive integer, got 0."),
    "missing config file": (["configs/nope.py"], "error: [Errno 2] No such file or directory: 'configs/nope.py'"),
}


@pytest.mark.parametrize("mistake", CLI_MISTAKES)
def test_a_user_mistake_is_one_error_line_and_exit_2(tmp_path, mistake):
    args, line = CLI_MISTAKES[mistake]
    workdir = tmp_path / "run"
    result = _cli("unialign_jax.train", f"--config={args[0]}", f"--workdir={workdir}", *args[1:])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert line in result.stderr.splitlines()
    assert not workdir.exists()


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    workdir = tmp_path / "run"
    workdir.write_text("not a directory")
    result = _cli("unialign_jax.train", "--config=configs/cmg_avt.py", f"--workdir={workdir}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: --workdir {workdir} is a file, not a directory." in result.stderr.splitlines()


def test_an_unwritable_workdir_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(type(files.epath.Path(tmp_path)), "write_text", refuse)
    with pytest.raises(files.WorkdirError, match=r"cannot be written: Permission denied\."):
        train.run(tiny_cmg_config(str(tmp_path / "data")), str(tmp_path / "run"))
    assert not (tmp_path / "data").exists()  # refused before the data was built


def _stored_finite(stage_dir) -> dict[int, bool]:
    """{step: whether every float leaf of its stored state is finite} for the steps in `stage_dir`."""
    result = {}
    with ckpt_lib.StageCheckpointer(stage_dir) as checkpointer:
        for step in sorted(int(name) for name in os.listdir(stage_dir) if name.isdigit()):
            state, _ = checkpointer.restore_state(step)
            leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(state)
                      if jax.numpy.issubdtype(leaf.dtype, jax.numpy.inexact)]
            result[step] = all(np.isfinite(leaf).all() for leaf in leaves)
    return result


def test_a_diverging_run_stops_at_its_first_bad_step_and_saves_nothing_after_it(tmp_path):
    config = tiny_cmg_config(str(tmp_path / "data"), steps=12)
    config.optim.learning_rate = 1e6
    config.checkpoint.every = 1  # a save on every step: each must be checked before it is written
    config.log_every = 100
    workdir = str(tmp_path / "run")
    with pytest.raises(loop.NonFiniteError, match=r"Stage 'pretrain' step (\d+): ") as error:
        train.run(config, workdir)
    bad_step = int(error.value.args[0].split("step ")[1].split(":")[0])
    stored = _stored_finite(tmp_path / "run" / "stage_1_pretrain")
    assert stored and all(stored.values()) and max(stored) == bad_step - 1
    with pytest.raises(loop.NonFiniteError, match=f"step {bad_step}: "):  # the rerun resumes, fails alike
        train.run(config, workdir)


def _run_stage(config, workdir):
    stage = loop.stage_specs(config)[0]
    return loop.train_stage(config, stage, workdir, parallel.make_mesh(config.mesh),
                            lambda: cmg_model.fresh_state(config, stage, jax.random.key(config.seed)),
                            step_factory=cmg_step.CMGStep, iterator_factory=cmg_model.train_iterator)


def _params(state):
    return jax.tree.leaves(jax.device_get(state.params))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """(config, final state) of a tiny 8-step stage run without interruption (checkpoints at 4, 8)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    config = tiny_cmg_config(str(root / "data"), steps=8)
    return config, _run_stage(config, str(root / "run")), root / "run"


def test_resume_goes_past_a_damaged_latest_checkpoint_to_the_same_result(uninterrupted, tmp_path):
    config, final, workdir = uninterrupted
    shutil.copytree(workdir, tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "stage_1_pretrain" / "8" / "state")  # the final checkpoint loses its state
    resumed = _run_stage(config, str(tmp_path / "b"))
    assert int(resumed.step) == 8
    for a, b in zip(_params(resumed), _params(final)):
        np.testing.assert_array_equal(a, b)
    assert any(name.startswith("8.damaged-") for name in os.listdir(tmp_path / "b" / "stage_1_pretrain"))


def test_a_second_run_on_a_locked_workdir_is_refused(tmp_path):
    workdir = tmp_path / "run"
    with files.WorkdirLock(workdir):
        with pytest.raises(files.WorkdirLocked, match=f"in use by pid {os.getpid()}"):
            train.run(tiny_cmg_config(str(tmp_path / "data")), str(workdir))
    assert not (workdir / "config.json").exists()


def test_the_data_a_workdir_was_trained_on_is_pinned(tmp_path, monkeypatch):
    config = tiny_cmg_config(str(tmp_path / "data"))
    config.eval.data = configlib.digits_data()  # its audio source follows $UNIALIGN_FSDD_DIR
    monkeypatch.delenv("UNIALIGN_FSDD_DIR", raising=False)
    espeak = identity.identity(config)
    identity.pin(str(tmp_path), espeak, write=True)
    assert json.loads((tmp_path / "data.json").read_text()) == espeak
    identity.pin(str(tmp_path), identity.identity(config), write=False)  # the same data passes

    recordings = tmp_path / "fsdd"
    recordings.mkdir()
    scipy.io.wavfile.write(recordings / "0_jackson_0.wav", 8000,
                           (np.sin(np.arange(4000) / 5.0) * 8000).astype(np.int16))
    monkeypatch.setenv("UNIALIGN_FSDD_DIR", str(recordings))
    fsdd = identity.identity(config)
    with pytest.raises(identity.DataMismatchError, match=r"eval\.data: digits_\w+ -> digits_\w+ \(audio_source "
                                                         r"'espeak' -> 'fsdd'"):
        identity.pin(str(tmp_path), fsdd, write=False)
    assert identity.audio_sources(fsdd) == [f"FSDD recordings in {recordings} "
                                            f"(fingerprint {fsdd['eval.data']['parameters']['fsdd_fingerprint']})"]
    identity.pin(str(tmp_path), fsdd, write=True, replace=True)  # a start that trained nothing is replaced
    assert json.loads((tmp_path / "data.json").read_text()) == fsdd


def test_sigterm_saves_the_current_step_and_the_rerun_is_bit_identical(uninterrupted, tmp_path, monkeypatch):
    config, final, _ = uninterrupted
    config = config.copy_and_resolve_references()
    for data in (config.stages[0].data, config.eval.data):
        data.data_dir = str(tmp_path / "data")

    calls = []
    original = parallel.global_batch

    def preempt_at_step_3(batch, mesh):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # a real signal, handled by loop.StopSignals
        return original(batch, mesh)

    monkeypatch.setattr(parallel, "global_batch", preempt_at_step_3)
    with pytest.raises(Interrupted, match=r"stopped by SIGTERM at step 3 of stage 'pretrain' \(checkpoint 3 saved\)") \
            as stop:
        train.run(config, str(tmp_path / "b"))
    assert stop.value.exit_code == 0
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    assert sorted(os.listdir(tmp_path / "b" / "stage_1_pretrain")) == ["3"]  # the stop's save, not only step 4's
    monkeypatch.setattr(parallel, "global_batch", original)
    train.run(config, str(tmp_path / "b"))
    stage = loop.stage_specs(config)[0]
    resumed = loop.restore_finished(config, stage, str(tmp_path / "b"), parallel.make_mesh(config.mesh))
    for a, b in zip(_params(resumed), _params(final)):
        np.testing.assert_array_equal(a, b)


def test_sigterm_of_the_cli_exits_0_with_a_message(tmp_path):
    workdir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "unialign_jax.train", "--config=configs/cmg_avt.py:data=synthetic,modalities=audio+text",
         f"--workdir={workdir}", "--config.log_every=1", "--config.stages[0].steps=100000",
         f"--config.stages[0].data.data_dir={tmp_path / 'data'}", f"--config.eval.data.data_dir={tmp_path / 'data'}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = workdir / "metrics.jsonl"
    try:
        while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            assert process.poll() is None, process.communicate()
            subprocess.run(["sleep", "0.2"])
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr
    line = next(line for line in stderr.splitlines() if line.startswith("stopped by SIGTERM"))
    step = int(line.split("at step ")[1].split()[0])
    assert os.listdir(workdir / "stage_1_pretrain") == [str(step)]


def test_evaluate_refuses_other_data_unless_asked_and_then_writes_beside(tmp_path):
    from unialign_jax import evaluate

    config = tiny_cmg_config(str(tmp_path / "data"), steps=4)
    workdir = tmp_path / "run"
    train.run(config, str(workdir))
    summary = (workdir / "results" / "summary.json").read_text()
    pinned = json.loads((workdir / "data.json").read_text())
    pinned["eval.data"]["parameters"]["noise"] = 0.5  # as if trained on other data
    (workdir / "data.json").write_text(json.dumps(pinned))
    with pytest.raises(identity.DataMismatchError, match=r"eval\.data: .*\(noise 0\.5 -> 0\.3\)"):
        evaluate.evaluate_workdir(str(workdir))
    evaluate.evaluate_workdir(str(workdir), other_data=True)
    beside = workdir / "results" / "other_data" / identity.digest(identity.identity(config)) / "summary.json"
    assert json.loads(beside.read_text())["stages"][0]["name"] == "pretrain"
    assert (workdir / "results" / "summary.json").read_text() == summary  # the training results stay
