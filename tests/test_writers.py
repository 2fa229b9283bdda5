"""Metric writers: jsonl and TensorBoard files read back, W&B through a fake `wandb` module."""

import glob
import io
import json
import os
import struct
import sys
import types

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2
from tensorboardX.proto import plugin_hparams_pb2

from unialign_jax import writers

STAGE = {"stage": "stage_1_video_text", "steps_per_second": 2.5}


def read_events(logdir):
    """Every `Event` in the event files under `logdir`, from the TFRecord framing (length, crc, data, crc)."""
    events = []
    for path in sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            offset += 12
            events.append(event_pb2.Event.FromString(data[offset:offset + length]))
            offset += length + 4
    return events


def scalar_series(events):
    series = {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("simple_value"):
                series.setdefault(value.tag, []).append((event.step, value.simple_value))
    return series


def test_jsonl_keeps_the_metrics_record_format(tmp_path):
    with writers.make_writers(["jsonl"], tmp_path) as writer:
        writer.write_scalars(10, {"loss/total": np.float32(1.5)}, context=STAGE)
        writer.write_scalars(20, {"loss/total": 0.75})
        writer.write_hparams({"lr": 0.1})
        writer.write_images(20, {"plot": np.zeros((2, 2, 3), np.uint8)})
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"stage": "stage_1_video_text", "step": 10, "steps_per_second": 2.5, "loss/total": 1.5},
        {"step": 20, "loss/total": 0.75},
    ]


def test_tensorboard_scalars_hparams_and_images_read_back(tmp_path):
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    config = {"seed": 3, "model": {"name": "cmg", "modalities": ("video", "text")}, "ewc": True}
    with writers.make_writers(["tensorboard"], tmp_path, config=config) as writer:
        for step in (5, 10):
            writer.write_scalars(step, {"loss/total": 1.0 / step}, context=STAGE)
        writer.write_scalars(10, {"accuracy": 0.5})
        writer.write_images(10, {"code_usage": image}, context={"stage": "stage_1_video_text"})
    events = read_events(tmp_path / "tensorboard")

    series = scalar_series(events)
    assert series["stage_1_video_text/loss/total"] == [(5, pytest.approx(0.2)), (10, pytest.approx(0.1))]
    assert series["stage_1_video_text/steps_per_second"] == [(5, 2.5), (10, 2.5)]
    assert series["accuracy"] == [(10, 0.5)]

    values = {value.tag: value for event in events for value in event.summary.value}
    start = plugin_hparams_pb2.HParamsPluginData.FromString(
        values["_hparams_/session_start_info"].metadata.plugin_data.content
    ).session_start_info
    assert start.hparams["seed"].number_value == 3
    assert start.hparams["model.name"].string_value == "cmg"
    assert start.hparams["model.modalities"].string_value == '["video", "text"]'
    assert start.hparams["ewc"].bool_value is True

    png = values["stage_1_video_text/code_usage"].image.encoded_image_string
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), image)


class FakeRun:
    def __init__(self, run_id):
        self.id = run_id
        self.hparams = {}
        self.config = types.SimpleNamespace(update=lambda values, allow_val_change: self.hparams.update(values))
        self.logged = []
        self.axes = {}
        self.finished = False

    def define_metric(self, name, step_metric=None):
        self.axes[name] = step_metric

    def log(self, data):
        self.logged.append(data)

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """An offline stand-in for `wandb`: `init` records its arguments and returns a `FakeRun`."""
    module = types.ModuleType("wandb")
    module.inits = []

    def init(**kwargs):
        module.inits.append(kwargs)
        return FakeRun(kwargs["id"] or f"run{len(module.inits)}")

    module.init = init
    module.Image = lambda array: ("image", array.shape)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_wandb_run_id_is_stored_and_resumed(tmp_path, fake_wandb):
    first = writers.make_writers(["wandb"], tmp_path, config={"lr": 0.1})
    (run,) = (w._run for w in first.writers)
    first.write_scalars(3, {"loss/total": 2.0}, context=STAGE)
    first.write_images(3, {"plot": np.zeros((2, 2, 1), np.uint8)}, context={"stage": "stage_1_video_text"})
    first.close()
    assert (tmp_path / "wandb_run_id").read_text() == "run1"
    assert fake_wandb.inits[0]["id"] is None and fake_wandb.inits[0]["resume"] == "allow"
    assert run.hparams == {"lr": 0.1}
    assert run.axes == {"stage_1_video_text/step": None, "stage_1_video_text/*": "stage_1_video_text/step"}
    assert run.logged == [
        {"stage_1_video_text/step": 3, "stage_1_video_text/steps_per_second": 2.5,
         "stage_1_video_text/loss/total": 2.0},
        {"stage_1_video_text/step": 3, "stage_1_video_text/plot": ("image", (2, 2))},
    ]
    assert run.finished

    writers.make_writers("wandb, jsonl", tmp_path).close()
    assert fake_wandb.inits[1]["id"] == "run1" and fake_wandb.inits[1]["resume"] == "allow"
    assert (tmp_path / "wandb_run_id").read_text() == "run1"


def test_wandb_not_installed_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ValueError, match="pip install wandb"):
        writers.check_writers(["jsonl", "wandb"])


def test_unknown_writer_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="'tb'.*known: jsonl, tensorboard, wandb"):
        writers.make_writers(["jsonl", "tb"], tmp_path)
    assert not list(tmp_path.iterdir())


def test_other_processes_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(writers.files, "is_primary", lambda: False)
    writer = writers.make_writers(["jsonl", "tensorboard"], tmp_path, config={"lr": 0.1})
    assert isinstance(writer, writers.NullWriter)
    writer.write_scalars(1, {"loss": 1.0})
    writer.close()
    assert not list(tmp_path.iterdir())


def test_bad_inputs_are_named(tmp_path):
    with writers.make_writers(["jsonl", "tensorboard"], tmp_path) as writer:
        with pytest.raises(ValueError, match="step given twice"):
            writer.write_scalars(1, {"step": 1.0})
        with pytest.raises(ValueError, match="loss given twice"):
            writer.write_scalars(1, {"loss": 1.0}, context={"loss": 2.0})
        with pytest.raises(TypeError, match="'loss' must be a number"):
            writer.write_scalars(1, {"loss": None})
        with pytest.raises(ValueError, match=r"'plot' must be a uint8 array.*float32 \(2, 2\)"):
            writer.write_images(1, {"plot": np.zeros((2, 2), np.float32)})
        with pytest.raises(ValueError, match="string fields only"):
            writer.write_images(1, {"plot": np.zeros((2, 2, 3), np.uint8)}, context={"rate": 1.0})
