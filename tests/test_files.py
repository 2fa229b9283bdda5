"""Workdir files on object stores (`gs://`, faked by fsspec's in-memory filesystem) and process-0 writes."""

import importlib
import json

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
    with pytest.raises(ValueError, match=r"different config \(top-level fields differ: \['batch_size'\]\)"):
        train.check_workdir_config(str(fake_gcs), config)

    stages = [{"name": "s", "modalities": ["audio", "text"], "metrics": {"classification/audio->text": 0.5}}]
    json_path, _ = report.write_summary(fake_gcs / "results", stages)
    assert json.loads(json_path.read_text())["stages"][0]["metrics"] == {"classification/audio->text": 0.5}
    png = report.plot_code_usage(fake_gcs / "results" / "codes.png", np.ones((4, 2), int), ("audio", "text"))
    assert png.read_bytes()[:4] == b"\x89PNG"

    progress = loop.ProgressLog(str(fake_gcs), loop.stage_specs(config)[0], first_step=0)
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
