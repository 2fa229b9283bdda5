"""StageCheckpointer on damaged folders, failed saves and exceptions during a pending save."""

import errno
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from unialign_jax import checkpoint as ckpt_lib


def _state(step: int) -> dict:
    return {"w": jnp.arange(1024.0) + step, "b": jnp.full((2, 3), float(step)), "step": jnp.int32(step)}


def _target() -> dict:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), _state(0))


def _saved(directory, steps=(10, 20), **kwargs) -> ckpt_lib.StageCheckpointer:
    checkpointer = ckpt_lib.StageCheckpointer(directory, **kwargs)
    for step in steps:
        checkpointer.save(step, _state(step), None, {"step": step, "finished": False})
    checkpointer.wait()
    return checkpointer


def _truncate(path) -> None:
    os.truncate(path, os.path.getsize(path) // 2)


def _largest_array_file(step_dir) -> str:
    files = [os.path.join(root, name) for root, _, names in os.walk(step_dir / "state" / "ocdbt.process_0")
             for name in names]
    return max(files, key=os.path.getsize)


DAMAGE = {  # name: (damage step 20, whether its meta still reads)
    "truncated array file": (lambda d: _truncate(_largest_array_file(d)), True),
    "truncated array metadata": (lambda d: _truncate(d / "state" / "_METADATA"), True),
    "deleted array files": (lambda d: shutil.rmtree(d / "state" / "ocdbt.process_0"), True),
    "deleted state item": (lambda d: shutil.rmtree(d / "state"), True),
    "deleted meta item": (lambda d: shutil.rmtree(d / "meta"), False),
    "truncated meta": (lambda d: _truncate(d / "meta" / "metadata"), False),
}


def test_max_to_keep_below_two_is_refused(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep must be at least 2 \\(got 1\\)"):
        ckpt_lib.StageCheckpointer(tmp_path, max_to_keep=1)


def test_empty_folder_has_nothing_to_resume(tmp_path):
    with ckpt_lib.StageCheckpointer(tmp_path / "stage") as checkpointer:
        assert checkpointer.restore_latest_intact(_target(), None) is None
        assert checkpointer.read_meta() is None


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_falls_back_past_a_damaged_latest_step(tmp_path, caplog, damage):
    _saved(tmp_path).close()
    damage_fn, meta_intact = DAMAGE[damage]
    damage_fn(tmp_path / "20")

    with ckpt_lib.StageCheckpointer(tmp_path) as checkpointer:
        assert checkpointer.read_meta() == {"step": 20 if meta_intact else 10, "finished": False}
        with pytest.raises(ckpt_lib.CheckpointError, match=f"Cannot read step 20 of {tmp_path}: "):
            checkpointer.restore(20, _target(), None)
        with caplog.at_level(logging.WARNING, logger="unialign_jax"):
            step, state, meta = checkpointer.restore_latest_intact(_target(), None)
        assert (step, int(state["step"]), meta["step"]) == (10, 10, 10)
        np.testing.assert_array_equal(state["w"], np.arange(1024.0) + 10)
        assert f"Skipping unreadable checkpoint step 20 in {tmp_path}: " in caplog.text
        set_aside = [name for name in os.listdir(tmp_path) if name.startswith("20.damaged-")]
        assert len(set_aside) == 1  # kept, not deleted
        assert checkpointer.latest_step() == 10

        checkpointer.save(20, _state(20), None, {"step": 20, "finished": True})  # the resumed run redoes step 20
    with ckpt_lib.StageCheckpointer(tmp_path) as checkpointer:
        step, state, meta = checkpointer.restore_latest_intact(_target(), None)
        assert (step, int(state["step"]), meta["finished"]) == (20, 20, True)


def test_damaged_latest_step_is_an_error_for_restore_state(tmp_path):
    _saved(tmp_path).close()
    _truncate(_largest_array_file(tmp_path / "20"))
    with ckpt_lib.StageCheckpointer(tmp_path) as checkpointer:
        with pytest.raises(ckpt_lib.CheckpointError, match=f"Cannot read step 20 of {tmp_path}: ValueError: "):
            checkpointer.restore_state()
        state, meta = checkpointer.restore_state(10)
    assert int(state["step"]) == meta["step"] == 10


def test_no_intact_step_is_one_clear_error_and_renames_nothing(tmp_path):
    _saved(tmp_path).close()
    for step in ("10", "20"):
        shutil.rmtree(tmp_path / step / "meta")
    with ckpt_lib.StageCheckpointer(tmp_path) as checkpointer:
        with pytest.raises(ckpt_lib.CheckpointError,
                           match=f"No readable checkpoint in {tmp_path}: step 20: KeyError: .*; step 10: KeyError: "):
            checkpointer.restore_latest_intact(_target(), None)
        with pytest.raises(ckpt_lib.CheckpointError, match=f"No readable checkpoint in {tmp_path}"):
            checkpointer.read_meta()
    assert sorted(os.listdir(tmp_path)) == ["10", "20"]


def test_a_wrong_target_is_not_taken_for_damage(tmp_path):
    _saved(tmp_path).close()
    wrong = {**_target(), "extra": jax.ShapeDtypeStruct((1,), jnp.float32)}
    with ckpt_lib.StageCheckpointer(tmp_path) as checkpointer:
        with pytest.raises(ckpt_lib.CheckpointError, match="No readable checkpoint"):
            checkpointer.restore_latest_intact(wrong, None)
    assert sorted(os.listdir(tmp_path)) == ["10", "20"]


def test_a_damaged_iterator_position_falls_back_with_its_step(tmp_path):
    iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    with ckpt_lib.StageCheckpointer(tmp_path) as checkpointer:
        for step in (10, 20):
            while iterator.get_state()["next_index"] < step:
                next(iterator)
            checkpointer.save(step, _state(step), iterator, {"step": step})
    _truncate(tmp_path / "20" / "data" / "process_0-of-1.json")

    resumed = iter(grain.MapDataset.range(100).to_iter_dataset())
    with ckpt_lib.StageCheckpointer(tmp_path) as checkpointer:
        step, _, _ = checkpointer.restore_latest_intact(_target(), resumed)
    assert step == 10 and next(resumed) == 10


def _disk_full(monkeypatch, where: str) -> None:
    """ENOSPC for the meta file (`where="file"`, a background write) or a folder named `where...`."""
    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", os.fspath(path))

    if where == "file":
        async def save_fn(self, item, directory):
            full(directory / "metadata")
        monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", save_fn)
    else:
        makedirs = os.makedirs
        monkeypatch.setattr(os, "makedirs", lambda p, *a, **k: full(p) if os.path.basename(p).startswith(where)
                            else makedirs(p, *a, **k))


@pytest.mark.parametrize("where", ["file", "30."])  # a meta file, the step folder
def test_a_full_disk_is_a_checkpoint_error_and_deletes_nothing(tmp_path, monkeypatch, where):
    checkpointer = _saved(tmp_path, max_to_keep=2)
    with monkeypatch.context() as patch:
        _disk_full(patch, where)
        with pytest.raises(ckpt_lib.CheckpointError,
                           match=f"Saving step 30 to {tmp_path} failed: OSError: .*No space left on device"):
            checkpointer.save(30, _state(30), None, {"step": 30})
            checkpointer.wait()
    assert checkpointer.latest_step() == 20
    assert sorted(name for name in os.listdir(tmp_path) if name.isdigit()) == ["10", "20"]  # retention waited

    checkpointer.save(30, _state(30), None, {"step": 30})  # the disk has room again
    checkpointer.close()
    assert sorted(name for name in os.listdir(tmp_path) if name.isdigit()) == ["20", "30"]
    with ckpt_lib.StageCheckpointer(tmp_path) as resumed:
        assert resumed.restore_latest_intact(_target(), None)[0] == 30


def test_a_full_disk_fails_save_tree_clearly(tmp_path, monkeypatch):
    _disk_full(monkeypatch, "tree.")
    with pytest.raises(ckpt_lib.CheckpointError, match=f"Saving {tmp_path / 'tree'} failed: OSError: .*No space left"):
        ckpt_lib.save_tree(tmp_path / "tree", _state(1))
    monkeypatch.undo()
    ckpt_lib.save_tree(tmp_path / "tree", _state(1))
    assert int(ckpt_lib.load_tree(tmp_path / "tree")["step"]) == 1


def test_an_exception_during_a_pending_save_commits_it(tmp_path, caplog, monkeypatch):
    with pytest.raises(FloatingPointError):
        with ckpt_lib.StageCheckpointer(tmp_path) as checkpointer:
            checkpointer.save(10, _state(10), None, {"step": 10})
            raise FloatingPointError("NaN loss")
    with ckpt_lib.StageCheckpointer(tmp_path) as checkpointer:
        assert checkpointer.restore_latest_intact(_target(), None)[0] == 10

    _disk_full(monkeypatch, "file")
    with pytest.raises(FloatingPointError), caplog.at_level(logging.ERROR, logger="unialign_jax"):
        with ckpt_lib.StageCheckpointer(tmp_path) as checkpointer:
            checkpointer.save(20, _state(20), None, {"step": 20})
            raise FloatingPointError("NaN loss")  # not hidden by the failed save, which is logged
    assert f"Saving step 20 to {tmp_path} failed: OSError: [Errno 28] No space left on device" in caplog.text
    assert "while stopping on FloatingPointError" in caplog.text


EXIT_DURING_SAVE = """
import errno, sys
import jax.numpy as jnp
import orbax.checkpoint as ocp
from unialign_jax import checkpoint as ckpt_lib

if sys.argv[2] == "disk full":
    async def full(self, item, directory):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    ocp.JsonCheckpointHandler._save_fn = full
with ckpt_lib.StageCheckpointer(sys.argv[1]) as checkpointer:
    checkpointer.save(10, {"w": jnp.arange(1e6)}, None, {"step": 10})
    raise FloatingPointError("NaN loss at step 11")
"""


@pytest.mark.parametrize("case", ["pending save", "disk full"])
def test_exit_on_an_exception_during_a_save_is_clean(tmp_path, case):
    """In a fresh interpreter: the pending save ends before the interpreter shuts its thread pools down."""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(EXIT_DURING_SAVE), str(tmp_path), case],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 1
    assert result.stderr.rstrip().endswith("FloatingPointError: NaN loss at step 11")
    for noise in ("cannot schedule new futures", "sys.meta_path is None", "Event loop is closed"):
        assert noise not in result.stderr
    assert os.listdir(tmp_path) == (["10"] if case == "pending save" else ["10.orbax-checkpoint-tmp"])
