"""Workdir files on object stores (`gs://`, faked by fsspec's in-memory filesystem), process-0 writes and
the workdir lock."""

import importlib
import json
import logging
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from unialign_jax import files
from unialign_jax import report
from unialign_jax import train
from unialign_jax import loop

from tiny import tiny_cmg_config


@pytest.fixture
def fake_gcs(monkeypatch):
    """`gs://` served from memory through the same epath -> fsspec route gcsfs would take."""
    registry = importlib.import_module("fsspec.registry")._registry
    for protocol in ("gs", "gcs"):
        monkeypatch.setitem(registry, protocol, MemoryFileSystem)
    MemoryFileSystem.store.clear()
    MemoryFileSystem.pseudo_dirs[:] = [""]
    yield epath.Path("gs://bucket/run")
    MemoryFileSystem.store.clear()


def test_write_atomic_and_append_on_an_object_store(fake_gcs):
    path = files.write_atomic(fake_gcs / "results" / "summary.md", "# one")
    assert path.read_text() == "# one"
    files.write_atomic(path, b"\x89PNG")
    assert path.read_bytes() == b"\x89PNG"
    metrics = fake_gcs / "metrics.jsonl"
    files.append_text(metrics, "1\n")
    files.append_text(metrics, "2\n")
    assert metrics.read_text() == "1\n2\n"
    assert sorted(p.name for p in fake_gcs.iterdir()) == ["metrics.jsonl", "results"]  # no temporary files


def test_append_is_a_real_append_locally(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    files.append_text(path, "a\n")
    files.append_text(path, "b\n")
    assert path.read_text() == "a\nb\n"


def test_workdir_config_summary_plot_and_progress_on_gs(fake_gcs):
    config = tiny_cmg_config("/unused", steps=4)
    train.check_workdir_config(str(fake_gcs), config)
    assert files.read_json(fake_gcs / "config.json")["batch_size"] == 16
    train.check_workdir_config(str(fake_gcs), config)  # the same config resumes
    config.batch_size = 8
    train.check_workdir_config(str(fake_gcs), config)  # nothing trained yet: the new config replaces it
    assert files.read_json(fake_gcs / "config.json")["batch_size"] == 8
    (fake_gcs / "stage_1_pretrain" / "5").mkdir(parents=True)  # a checkpoint step: the run has started
    config.batch_size = 16
    with pytest.raises(ValueError, match=r"different config \(top-level fields differ: \['batch_size'\]\)"):
        train.check_workdir_config(str(fake_gcs), config)

    stages = [{"name": "s", "modalities": ["audio", "text"], "metrics": {"classification/audio->text": 0.5}}]
    json_path, _ = report.write_summary(fake_gcs / "results", stages)
    assert json.loads(json_path.read_text())["stages"][0]["metrics"] == {"classification/audio->text": 0.5}
    png = report.plot_code_usage(fake_gcs / "results" / "codes.png", np.ones((4, 2), int), ("audio", "text"))
    assert png.read_bytes()[:4] == b"\x89PNG"

    progress = loop.ProgressLog(str(fake_gcs), loop.stage_specs(config)[0])
    progress.write(2, {"loss/total": 1.5})
    progress.write(4, {"loss/total": 1.0})
    lines = [json.loads(line) for line in (fake_gcs / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["loss/total"]) for line in lines] == [(2, 1.5), (4, 1.0)]


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    files.write_json_atomic(tmp_path / "config.json", {"a": 1})
    files.append_text(tmp_path / "metrics.jsonl", "1\n")
    report.write_summary(tmp_path / "results", [{"name": "s", "modalities": ["audio"], "metrics": {}}])
    train.check_workdir_config(str(tmp_path / "run"), tiny_cmg_config("/unused"))
    assert list(tmp_path.iterdir()) == []


def _lock_json(path, **owner) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / ".lock").write_text(json.dumps(owner))


def test_workdir_lock_is_exclusive_and_released(tmp_path):
    workdir = tmp_path / "run"
    with files.WorkdirLock(workdir):
        owner = json.loads((workdir / ".lock").read_text())
        assert (owner["pid"], owner["host"]) == (os.getpid(), socket.gethostname()) and owner["started"]
        with pytest.raises(files.WorkdirLocked, match=rf"{workdir} is in use by pid {os.getpid()} on "
                                                      rf"{re.escape(socket.gethostname())} since "):
            with files.WorkdirLock(workdir):
                pass
    assert not (workdir / ".lock").exists()
    with files.WorkdirLock(workdir):  # free again
        assert (workdir / ".lock").exists()


def test_a_stale_lock_of_this_host_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock_json(tmp_path, pid=dead.pid, host=socket.gethostname(), started="yesterday")
    with caplog.at_level(logging.WARNING, logger="unialign_jax"), files.WorkdirLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"Taking over the stale lock {tmp_path / '.lock'}: pid {dead.pid}" in caplog.text
    assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("content, message", [
    (json.dumps({"pid": 1, "host": "other-host", "started": "yesterday"}),
     "in use by pid 1 on other-host since yesterday"),
    ("", "is locked .*unreadable"),
])
def test_a_lock_that_cannot_be_checked_is_kept(tmp_path, content, message):
    (tmp_path / ".lock").write_text(content)
    with pytest.raises(files.WorkdirLocked, match=message):
        with files.WorkdirLock(tmp_path):
            pass
    assert (tmp_path / ".lock").read_text() == content


def test_release_keeps_a_lock_another_run_has_taken(tmp_path):
    with files.WorkdirLock(tmp_path):
        _lock_json(tmp_path, pid=1, host="other-host", started="now")
    assert json.loads((tmp_path / ".lock").read_text())["host"] == "other-host"


def test_workdir_lock_on_an_object_store(fake_gcs):
    with files.WorkdirLock(fake_gcs):
        assert json.loads((fake_gcs / ".lock").read_text())["pid"] == os.getpid()
        with pytest.raises(files.WorkdirLocked, match=f"in use by pid {os.getpid()}"):
            with files.WorkdirLock(fake_gcs):
                pass
    assert not (fake_gcs / ".lock").exists()


def test_only_process_zero_locks(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with files.WorkdirLock(tmp_path / "run"):
        pass
    _lock_json(tmp_path, pid=1, host="other-host", started="now")
    with files.WorkdirLock(tmp_path):  # process 0's lock is not this process's concern
        pass
    assert not (tmp_path / "run").exists()
