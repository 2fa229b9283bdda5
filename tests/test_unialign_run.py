"""`python -m unialign_jax.train` / `evaluate` on a tiny UniAlign config: refusal without teachers,
results files, re-evaluation from the workdir, exact resume."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from unialign_jax import checkpoint as ckpt_lib
from unialign_jax import evaluate
from unialign_jax import train
from unialign_jax import loop

from tiny_unialign import tiny_unialign_config


def test_train_and_evaluate_cli_on_a_tiny_run(tmp_path, capsys):
    config = tiny_unialign_config(str(tmp_path / "data"), steps=2)
    config.teachers.auto_train = False
    workdir = str(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="python -m unialign_jax.methods.unialign.teachers"):
        train.run(config, workdir)
    assert not os.path.exists(workdir)  # refused before anything was written
    config = tiny_unialign_config(str(tmp_path / "data"), steps=4, model_distil=False)
    (result,) = train.run(config, workdir)
    metrics = result["metrics"]
    for key in ("zero_shot/image/top1", "zero_shot/audio/top5", "retrieval/image->audio/R@1",
                "retrieval/text->image/R@5", "routing/audio/expert_1"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["zero_shot/image/chance_top1"] == pytest.approx(0.1)
    summary = json.load(open(os.path.join(workdir, "results", "summary.json")))
    assert summary["stages"][0]["metrics"] == pytest.approx(metrics)
    assert "never paired" in capsys.readouterr().out
    meta = ckpt_lib.StageCheckpointer(os.path.join(workdir, loop.stage_specs(config)[0].folder)).read_meta()
    assert meta["finished"] and "codebook_active" not in meta
    (again,) = evaluate.evaluate_workdir(workdir)
    assert again["metrics"] == pytest.approx(metrics)

    # Interrupted after step 2 (drop the final checkpoint): re-running resumes to the same parameters.
    stage_dir = os.path.join(workdir, loop.stage_specs(config)[0].folder)
    final, _ = ckpt_lib.StageCheckpointer(stage_dir).restore_state()
    shutil.rmtree(os.path.join(stage_dir, "4"))
    train.run(config, workdir)
    resumed, _ = ckpt_lib.StageCheckpointer(stage_dir).restore_state()
    for a, b in zip(jax.tree.leaves(final["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_array_equal(a, b)
