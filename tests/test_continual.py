"""COMET stage transitions: growth, frozen modules, Fisher/EWC carry, PMR teacher, resume across stages;
the continual-learning evaluation (aligned classes, code sharing, ACC/BWT/FWT, re-evaluation).

One uninterrupted two-stage run (module fixture) serves every test; the resume test copies its
workdir, removes the last checkpoint of stage 2 and re-runs from there.
"""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import traverse_util

from unialign_jax import checkpoint as ckpt_lib
from unialign_jax import evaluate
from unialign_jax import optim
from unialign_jax import parallel
from unialign_jax import report
from unialign_jax import train
from unialign_jax import loop
from unialign_jax.data import pipeline
from unialign_jax.methods.cmg import config as cmg_config
from unialign_jax.losses import continual as continual_losses
from unialign_jax.methods.cmg import continual
from unialign_jax.methods.cmg import evaluate as cmg_evaluate
from unialign_jax.methods.cmg import model as cmg_model
from unialign_jax.methods.cmg import step as cmg_step
from unialign_jax.nn import cmg as cmg_nn

from tiny import tiny_continual_config


def _flat(tree):
    return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def _final(workdir, stage):
    checkpointer = ckpt_lib.StageCheckpointer(os.path.join(workdir, stage.folder))
    state, meta = checkpointer.restore_state()
    checkpointer.close()
    return state, meta


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    config = tiny_continual_config(str(root / "data"), steps=8)
    workdir = str(root / "run")
    results = train.run(config, workdir)
    return config, workdir, results


def test_two_stage_run_grows_freezes_protects_and_replays(finished_run):
    config, workdir, results = finished_run
    first, second = loop.stage_specs(config)
    stage1, meta1 = _final(workdir, first)
    stage2, meta2 = _final(workdir, second)
    assert (meta1["codebook_active"], meta2["codebook_active"]) == (16, 24)
    assert meta2["modalities"] == ["image", "text"] and meta2["known_modalities"] == ["audio", "text", "image"]

    # The next stage's starting state: old codes and their EMA statistics copied bit-identically.
    start = continual.next_stage_state(config, second, workdir)
    old, grown = stage1["quantizer"]["quantizer"], jax.device_get(start.quantizer["quantizer"])
    for name in ("embedding", "ema_weight", "ema_count", "unused_steps"):
        np.testing.assert_array_equal(grown[name][:16], np.asarray(old[name])[:16])
    assert np.all(np.isfinite(grown["embedding"][16:24])) and not np.allclose(grown["embedding"][16:24], 0)

    # The image modules are new at stage 2; the audio modules are frozen there and never move.
    start_params = _flat(optim.merge_params(start.params, start.frozen))
    assert any(p.startswith("semantic_encoder_image/") for p in start_params)
    assert not any("image" in p for p in _flat(stage1["params"]))
    frozen = _flat(stage2["frozen"])
    assert frozen and all("audio" in path for path in frozen)
    stage1_all = _flat(optim.merge_params(stage1["params"], stage1["frozen"]))
    for path, value in frozen.items():
        np.testing.assert_array_equal(value, stage1_all[path])

    # Carry: the teacher is stage 1's codebook, unchanged through stage 2; EWC Fisher >= 0 and non-trivial.
    np.testing.assert_array_equal(stage2["carry"]["teacher"]["embedding"], old["embedding"])
    fisher = _flat(stage2["carry"]["ewc"]["fisher"])
    assert fisher and all(path.startswith("adapter/") for path in fisher)
    assert all(np.all(v >= 0) for v in fisher.values()) and any(np.any(v > 0) for v in fisher.values())
    anchor = _flat(stage2["carry"]["ewc"]["anchor"])
    for path, value in anchor.items():
        np.testing.assert_array_equal(value, stage1_all[path])

    # Evaluation covers the unseen pair audio<->image after stage 2, and forgetting for stage-1 pairs.
    metrics = results[1]["metrics"]
    assert "classification/audio->image" in metrics and "forgetting/classification/audio->text" in metrics


def test_resume_across_a_stage_boundary_matches_an_uninterrupted_run(finished_run, tmp_path):
    config, workdir, _ = finished_run
    second = loop.stage_specs(config)[1]
    # Interrupted during stage 2: its last checkpoint is step 4, and stage 1 is finished.
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, second.folder, "8"))
    train.run(config, resumed)
    a, _ = _final(workdir, second)
    b, meta = _final(resumed, second)
    assert meta["finished"]
    for (path, x), y in zip(_flat(a["params"]).items(), _flat(b["params"]).values()):
        np.testing.assert_array_equal(x, y, err_msg=path)


def test_ewc_protects_the_adapter_and_optionally_the_mediator_encoder():
    params = {"adapter": {"common": {"kernel": 1}, "specific_text": {"kernel": 2}, "specific_image": {"kernel": 3}},
              "semantic_encoder_text": {"dense": {"kernel": 4}}, "semantic_encoder_image": {"dense": {"kernel": 5}}}
    pairs = [("video", "text"), ("image", "text")]
    params["adapter"]["router"] = {"kernel": 6}
    for arg, extra in (("", []), ("ewc_mediator=true,ewc_lambda=1e4", ["semantic_encoder_text/dense/kernel"]),
                       ("ewc_router=true", ["adapter/router/kernel"])):
        config = cmg_config.continual_config(arg, pairs, comet=True)
        stage = loop.stage_specs(config)[0]  # video-text: the image layers are not activated
        protected = _flat(optim.split_params(params, continual.ewc_patterns(config, stage))[0])
        assert sorted(protected) == sorted(["adapter/common/kernel", "adapter/specific_text/kernel", *extra])
        if arg.startswith("ewc_mediator"):
            assert config.continual.ewc_strength == 1e4


def test_fisher_measures_this_stage_loss_without_the_earlier_ewc_penalty(finished_run):
    config, workdir, _ = finished_run
    second = loop.stage_specs(config)[1]
    mesh = parallel.make_mesh(config.mesh)
    state = loop.train_stage(config, second, workdir, mesh, lambda: continual.initial_state(config, second, workdir),
                             step_factory=cmg_step.CMGStep, iterator_factory=cmg_model.train_iterator)
    ewc = state.carry["ewc"]
    penalty = continual_losses.ewc_penalty(state.params, ewc["anchor"], ewc["fisher"], config.continual.ewc_strength)
    assert float(penalty) > 0  # stage 2 moved the protected parameters: the penalty has a gradient
    patterns = continual.ewc_patterns(config, second)
    with_carry = cmg_step.estimate_fisher(config, second, state, mesh, patterns)
    without = cmg_step.estimate_fisher(config, second, state.replace(carry={**state.carry, "ewc": None}), mesh,
                                       patterns)
    for a, b in zip(jax.tree.leaves(with_carry), jax.tree.leaves(without)):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------------
# The continual-learning evaluation of the finished run.


def test_trained_classes_are_the_labels_of_each_modalitys_training_splits(finished_run):
    config, _, _ = finished_run
    first, second = loop.stage_specs(config)
    assert cmg_evaluate.trained_classes([first]) == {"audio": (0, 1, 2, 3, 4, 5), "text": (0, 1, 2, 3, 4, 5)}
    assert cmg_evaluate.trained_classes([first, second]) == {
        "audio": (0, 1, 2, 3, 4, 5), "text": tuple(range(9)), "image": (3, 4, 5, 6, 7, 8)}


def test_each_stage_reports_aligned_scores_sharing_flags_and_continual_scores(finished_run):
    _, workdir, results = finished_run
    first, second = (result["metrics"] for result in results)
    assert first["chance/classification"] == pytest.approx(0.1)  # the evaluation data has 10 classes
    pairs_1 = ["audio->text", "text->audio"]
    pairs_2 = [f"{x}->{y}" for x in ("audio", "text", "image") for y in ("audio", "text", "image") if x != y]
    for metrics, pairs in ((first, pairs_1), (second, pairs_2)):
        for pair in pairs:
            assert 0 <= metrics[f"aligned/classification/{pair}"] <= 1
            assert 0 <= metrics[f"code_sharing/{pair}"] <= 1
            assert metrics[f"below_chance/{pair}"] == int(metrics[f"classification/{pair}"] < 0.1)
    # The unseen pairs after stage 2 (audio<->image) are scored at stage 2, their aligned classes 3-5.
    assert {"classification/audio->image", "classification/image->audio"} <= set(second)
    assert second["continual/ACC"] == pytest.approx(np.mean([second[f"classification/{p}"] for p in pairs_2]))
    assert second["continual/BWT"] == pytest.approx(
        np.mean([second[f"forgetting/classification/{p}"] for p in pairs_1]))
    assert second["continual/FWT"] == pytest.approx(
        np.mean([second[f"classification/{p}"] for p in ("audio->image", "image->audio")]) - 0.1)
    assert "continual/BWT" not in first and "continual/FWT" not in first  # nothing earlier, nothing unseen

    results_dir = pathlib.Path(workdir) / "results"
    summary = json.loads((results_dir / "summary.json").read_text())
    matrix = summary["accuracy_matrix"]["all_classes"]
    assert matrix["pairs"][:2] == pairs_1 and len(matrix["pairs"]) == 6
    assert matrix["rows"][0][2:] == [None] * 4
    assert matrix["rows"][1] == [second[f"classification/{p}"] for p in matrix["pairs"]]
    assert report.read_png(results_dir / "accuracy_matrix.png").ndim == 3
    markdown = (results_dir / "summary.md").read_text()
    assert "## Accuracy matrix" in markdown and "Continual (classification): ACC" in markdown


def test_reevaluation_from_checkpoints_reproduces_the_results(finished_run, tmp_path):
    _, workdir, results = finished_run
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    os.remove(os.path.join(copy, "results", "accuracy_matrix.png"))
    again = evaluate.evaluate_workdir(copy)
    for before, after in zip(results, again):
        assert after["metrics"] == pytest.approx(before["metrics"])
    assert os.path.exists(os.path.join(copy, "results", "accuracy_matrix.png"))


def test_fisher_magnitude_is_saved_with_the_stage_fisher(finished_run):
    config, workdir, _ = finished_run
    first = loop.stage_specs(config)[0]
    saved = ckpt_lib.load_tree(os.path.join(workdir, first.folder, continual.ARTIFACTS_FOLDER))
    values = np.concatenate([np.ravel(v) for v in jax.tree.leaves(saved["fisher"])])
    np.testing.assert_allclose(saved["fisher_magnitude"]["mean"], values.mean(), rtol=1e-6)
    np.testing.assert_allclose(saved["fisher_magnitude"]["max"], values.max(), rtol=1e-6)


def _mediator_paths(flat_params):
    return sorted(p for p in flat_params if p.startswith(("semantic_encoder_text/", "adapter/router/",
                                                          "adapter/common/", "adapter/specific_text/")))


def _step_and_batch(config, stage, state):
    """The jitted train step of `stage` and one of its training batches."""
    mesh = parallel.make_mesh(config.mesh)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    step = cmg_step.CMGStep(config, stage, mesh, abstract, loop.state_shardings(abstract, mesh, ()))
    batch = next(cmg_model.train_iterator(config, stage))
    return step, {m: jax.numpy.asarray(batch[m]) for m in stage.modalities}


def test_frozen_pmr_teacher_and_distillation_read_the_stage_start_mediator(finished_run):
    config, workdir, _ = finished_run
    config = config.copy_and_resolve_references()
    config.continual.pmr_teacher = "frozen"
    config.continual.mediator_distillation = 1.0
    first, second = loop.stage_specs(config)
    stage1, _ = _final(workdir, first)
    start = continual.next_stage_state(config, second, workdir)
    snapshot = _flat(start.carry["mediator_teacher"])
    stage1_all = _flat(optim.merge_params(stage1["params"], stage1["frozen"]))
    assert sorted(snapshot) == _mediator_paths(stage1_all)
    for path, value in snapshot.items():
        np.testing.assert_array_equal(value, stage1_all[path])

    step, batch = _step_and_batch(config, second, start)

    def mediator_features(state, live):
        if not live:
            return step._mediator_teacher_features(state, batch)
        return step.model.apply({"params": optim.merge_params(state.params, state.frozen)}, batch["text"], "text",
                                method=cmg_nn.CMGModel.semantic_features)

    def replay(state, live):  # on the stage-start codebook, so only the mediator features differ
        state = state.replace(quantizer=start_quantizer)
        all_params = optim.merge_params(state.params, state.frozen)
        return step._pseudo_modality(state, all_params, mediator_features(state, live))["semantic"]

    # Training moves the mediator; the snapshot (the teacher) does not move, the distillation is active.
    start_quantizer = jax.device_get(start.quantizer)
    state = jax.tree.map(jax.numpy.array, start)  # a copy: the step donates its input state
    for _ in range(3):
        state, metrics = step(state, batch)
    assert float(metrics["loss/distill"]) > 0
    for path, value in _flat(state.carry["mediator_teacher"]).items():
        np.testing.assert_array_equal(value, snapshot[path])
    moved = _flat(state.params)
    assert any(not np.array_equal(moved[p], snapshot[p]) for p in snapshot if p in moved)
    # The frozen teacher's features and replay sequence ignore the drift; the live ones follow it.
    np.testing.assert_array_equal(mediator_features(state, live=False), mediator_features(start, live=False))
    assert not np.allclose(mediator_features(state, live=True), mediator_features(start, live=True))
    np.testing.assert_array_equal(replay(state, live=False), replay(start, live=False))
    assert not np.array_equal(replay(state, live=True), replay(start, live=True))


def test_codes_owned_by_share_counts_each_modality_separately():
    codes = {"video": np.asarray([[0, 0, 0, 1], [0, 0, 0, 0]]),  # shares 7/8, 1/8
             "audio": np.asarray([3, 3, 4, 4, 4, 4, 4, 4, 4, 4])}  # shares 2/10, 8/10
    np.testing.assert_array_equal(continual.codes_owned_by_share(codes, 6, 0.15),
                                  [True, False, False, True, True, False])
    np.testing.assert_array_equal(continual.codes_owned_by_share(codes, 6, 0.1),
                                  [True, True, False, True, True, False])
    assert not continual.codes_owned_by_share({}, 4, 0.1).any()


def test_codes_the_absent_modality_still_uses_are_owned_and_left_alone(finished_run):
    config, workdir, _ = finished_run
    config = config.copy_and_resolve_references()
    config.continual.own_codes = True
    first, second = loop.stage_specs(config)
    start = continual.next_stage_state(config, second, workdir)
    owned = np.asarray(start.quantizer["quantizer"]["owned"])
    # Audio (absent from stage 2) on its stage-1 data, encoded at the boundary: the codes it owns.
    stage1, _ = _final(workdir, first)
    model, _ = cmg_model.build_models(config, second)
    audio = pipeline.load_split(first.data, "train", modalities=("audio",),
                                          max_examples=config.continual.growth_examples)["audio"]
    codes = model.apply({"params": optim.merge_params(stage1["params"], stage1["frozen"]),
                         "quantizer": stage1["quantizer"]}, {"audio": audio}, method=cmg_nn.CMGModel.encode)
    shares = np.bincount(np.ravel(codes["audio"][0]), minlength=owned.size) / np.size(codes["audio"][0])
    np.testing.assert_array_equal(owned, shares >= config.continual.code_owner_min_share)
    assert 0 < owned.sum() and not owned[16:].any()  # some old codes; never the new ones

    step, batch = _step_and_batch(config, second, start)
    before = jax.device_get(start.quantizer["quantizer"])
    state = jax.tree.map(jax.numpy.array, start)
    for _ in range(3):
        state, _ = step(state, batch)
    after = jax.device_get(state.quantizer["quantizer"])
    for name in ("embedding", "ema_weight", "ema_count"):
        np.testing.assert_array_equal(after[name][owned], before[name][owned])
    active = np.arange(owned.size) < int(after["active_count"])
    assert not np.allclose(after["embedding"][active & ~owned], before["embedding"][active & ~owned])
