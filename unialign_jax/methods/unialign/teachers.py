"""Model-distillation teachers of UniAlign (Eq. 13-15): small per-modality models, features cached.

The paper distils from partial-modal foundation models (ULIP for points, ViT-Lens for depth,
ONE-PEACE for audio and video), with their features cached offline. Here each teacher is a small
modality<->text model trained on its own modality only, on `teachers.data[m]` (a dataset the student
never reads, e.g. more concepts or other instances; default: the student's own training data), against the
same frozen text anchors the student uses (`config.loss.nce_anchor`: captions or class labels):

    teacher_m(x) = normalize(MLP(flatten(x)))          (LayerNorm, two GELU layers of `hidden_dim`)
    text_m(a)    = a                                   if D = teachers.dims[m] is the anchor's width,
                   normalize(MLP(a))                   else (the teacher's own text tower, trained with it)
    loss         = symmetric InfoNCE(teacher_m(x), text_m(anchor(x))), fixed logit scale 1 / temperature,
                   `teachers.steps` Adam steps on batches of `teachers.batch_size`.

Its features of every example of the STUDENT's training split, in stored order, are cached in
`<workdir>/<teachers.dir>/<modality>.npz` (`features` float32[N_train, D]; `data_config`, the JSON of
the dataset they belong to; `test_top1`, the teacher's own zero-shot accuracy on the test split;
`anchor_features` float32[N_train, D], text_m of each example's anchor view, x̂^a of Eq. 14, when D
differs from the anchor's width. An external teacher of another width must provide them too):

    python -m unialign_jax.methods.unialign.teachers --config=configs/unialign_digits.py --workdir=workdirs/unialign_digits

`python -m unialign_jax.train` with the same config and workdir then reads them. If they are
missing, the run trains them first when `teachers.auto_train` is set, and otherwise stops with the
command above (a teacher of a real run is an external model whose features you cache yourself, in
the same file layout).
"""

from __future__ import annotations

import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags
from etils import epath
from jax.experimental import multihost_utils
from ml_collections import config_flags

from unialign_jax import cli
from unialign_jax import files
from unialign_jax.data import pipeline
from unialign_jax.eval import zero_shot
from unialign_jax.logs import logger
from unialign_jax.losses.contrastive import info_nce, l2_normalize
from unialign_jax.methods.unialign import config as config_lib
from unialign_jax.methods.unialign import label_embeddings as label_lib

COMMAND = "python -m unialign_jax.methods.unialign.teachers --config=<the run's config> --workdir=<the run's workdir>"


class TeacherNet(nn.Module):
    """flatten -> LayerNorm -> Dense(hidden) -> GELU -> Dense(hidden) -> GELU -> Dense(dim) -> L2 norm."""

    dim: int
    hidden_dim: int = 256

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.LayerNorm()(x.reshape(x.shape[0], -1))
        x = nn.gelu(nn.Dense(self.hidden_dim)(x))
        x = nn.gelu(nn.Dense(self.hidden_dim)(x))
        return l2_normalize(nn.Dense(self.dim)(x))


def teacher_dir(config: ml_collections.ConfigDict, workdir: str) -> epath.Path:
    """`teachers.dir`, relative to the workdir unless absolute (local or `gs://`)."""
    return epath.Path(workdir) / config.teachers.dir


def _anchors(config, data: dict, label_embeddings: np.ndarray) -> np.ndarray:
    if config.loss.nce_anchor == "caption":
        return np.asarray(label_lib.pool_text(data[config.model.anchor]))
    return label_embeddings[data["label"]]


def teacher_data(config: ml_collections.ConfigDict, modality: str) -> ml_collections.ConfigDict:
    """The dataset a modality's teacher trains on: `teachers.data[modality]` (an optional field, absent
    from `base_config` so that earlier workdirs' configs still match), else the student's."""
    return (config.teachers.get("data") or {}).get(modality) or config.stages[0].data[modality]


def train_teacher(config: ml_collections.ConfigDict, modality: str, label_embeddings: np.ndarray) -> dict:
    """Trains modality's teacher on `teacher_data`; returns {features [N_train, D], test_top1} and, for a
    width D other than the anchor's, anchor_features [N_train, D], for the student's train split."""
    fields = (modality, config.model.anchor) if config.loss.nce_anchor == "caption" else (modality,)
    train = pipeline.load_split(teacher_data(config, modality), "train", modalities=fields)
    student = pipeline.load_split(config.stages[0].data[modality], "train", modalities=fields)
    test = pipeline.load_split(config.eval.data[modality], "test", modalities=(modality,))
    if train[modality].shape[1:] != student[modality].shape[1:]:
        raise ValueError(f"config.teachers.data.{modality}: {modality} of shape {train[modality].shape[1:]}, the "
                         f"student's is {student[modality].shape[1:]}; the teacher must read the student's inputs.")
    targets = _anchors(config, train, label_embeddings)
    teachers = config.teachers
    dim = int(teachers.dims[modality])
    own_text = dim != targets.shape[-1]
    nets = {"x": TeacherNet(dim, teachers.hidden_dim), "text": TeacherNet(dim, teachers.hidden_dim)}
    rng = jax.random.fold_in(jax.random.key(config.seed), pipeline.MODALITIES.index(modality))
    params = {"x": nets["x"].init(rng, jnp.asarray(train[modality][:1]))["params"]}
    if own_text:
        params["text"] = nets["text"].init(jax.random.fold_in(rng, 1), jnp.asarray(targets[:1]))["params"]

    def embed(params, name, inputs):
        return nets[name].apply({"params": params[name]}, inputs) if name in params else inputs

    tx = optax.adam(teachers.learning_rate)
    log_scale = -np.log(config.loss.temperature)

    @jax.jit
    def step(params, opt_state, x, anchors):
        def loss_fn(p):
            return info_nce(embed(p, "x", x), embed(p, "text", anchors), log_scale)[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = tx.init(params)
    sampler = np.random.default_rng([config.seed, pipeline.MODALITIES.index(modality)])
    batch_size = min(teachers.batch_size, len(targets))
    for _ in range(teachers.steps):
        rows = sampler.choice(len(targets), batch_size, replace=False)
        params, opt_state, loss = step(params, opt_state, train[modality][rows], targets[rows])
    encode = jax.jit(embed, static_argnums=1)
    test_top1 = zero_shot.top_k_accuracy(np.asarray(encode(params, "x", test[modality])), test["label"],
                                         np.asarray(encode(params, "text", label_embeddings)), (1,))["top1"]
    logger.info("[teacher %s] %d steps on %d examples, final InfoNCE %.3f, zero-shot test top-1 %.1f%%.", modality,
                teachers.steps, len(targets), float(loss), 100 * test_top1)
    trained = {"features": np.asarray(encode(params, "x", student[modality]), np.float32), "test_top1": test_top1}
    if own_text:
        student_anchors = _anchors(config, student, label_embeddings)
        trained["anchor_features"] = np.asarray(encode(params, "text", student_anchors), np.float32)
    return trained


def write_teachers(config: ml_collections.ConfigDict, workdir: str) -> dict[str, np.ndarray]:
    """Trains every teacher of the config and caches its features (module docstring)."""
    modalities = config_lib.teacher_modalities(config)
    if not modalities:
        raise ValueError("this config has no teachers (config.teachers.modalities, config.loss.terms.model_distil).")
    label_embeddings = label_lib.label_embeddings(config, modalities)
    directory = teacher_dir(config, workdir)
    features = {}
    for modality in modalities:
        trained = train_teacher(config, modality, label_embeddings[modality])
        stored = io.BytesIO()
        np.savez(stored, **trained, data_config=config.stages[0].data[modality].to_json(sort_keys=True))
        files.write_atomic(directory / f"{modality}.npz", stored.getvalue())
        features[modality] = trained["features"]
    logger.info("Teacher features cached in %s.", directory)
    return features


def check_available(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """The teacher modalities without cached features; FileNotFoundError (with the command to run)
    if there are any and `teachers.auto_train` is off. Call it before a run writes anything."""
    directory = teacher_dir(config, workdir)
    missing = [m for m in config_lib.teacher_modalities(config) if not (directory / f"{m}.npz").is_file()]
    if missing and not config.teachers.auto_train:
        raise FileNotFoundError(
            f"no cached teacher features for {missing} in {directory}: run `{COMMAND}` first, or switch the "
            "model-distillation term off (arg model_distil=false)."
        )
    return missing


def prepare(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Trains and caches the missing teachers when `teachers.auto_train` (else `check_available`'s
    FileNotFoundError, before anything is written)."""
    missing = check_available(config, workdir)
    if missing:
        logger.info("No cached teacher features for %s in %s: training them now (as `%s`).", missing,
                    teacher_dir(config, workdir), COMMAND)
        write_teachers(config, workdir)
    multihost_utils.sync_global_devices("teacher features ready")


def load_teachers(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict[str, np.ndarray]]:
    """{modality: {"teacher": float32[N_train, D], "teacher_anchor": float32[N_train, D] if cached}} of
    the config's teacher modalities (module docstring), as `prepare` left them.

    Missing files raise FileNotFoundError with the command. A file made for another dataset, of the
    wrong feature size, or lacking the anchor features that a width other than the anchor's needs
    raises ValueError.
    """
    modalities = config_lib.teacher_modalities(config)
    directory = teacher_dir(config, workdir)
    if missing := [m for m in modalities if not (directory / f"{m}.npz").is_file()]:
        raise FileNotFoundError(f"no cached teacher features for {missing} in {directory}: run `{COMMAND}` first.")
    anchor_dim = config.model.input_shapes[config.model.anchor][-1]
    loaded = {}
    for modality in modalities:
        path = directory / f"{modality}.npz"
        with np.load(io.BytesIO(path.read_bytes())) as stored:
            if str(stored["data_config"]) != config.stages[0].data[modality].to_json(sort_keys=True):
                raise ValueError(f"teacher features {path} were made for another dataset; delete them and run `{COMMAND}`.")
            loaded[modality] = {"teacher": stored["features"]}
            if "anchor_features" in stored.files:
                loaded[modality]["teacher_anchor"] = stored["anchor_features"]
        dim = config.teachers.dims[modality]
        for name, values in loaded[modality].items():
            if values.shape != (len(loaded[modality]["teacher"]), dim):
                raise ValueError(f"teacher {name} in {path} have shape {values.shape}; config.teachers.dims says "
                                 f"[N, {dim}] for every array of the file.")
        if dim != anchor_dim and "teacher_anchor" not in loaded[modality]:
            raise ValueError(f"teacher features {path} are {dim}-d but the anchor is {anchor_dim}-d: the file must "
                             "also hold `anchor_features` (the teacher's embedding of each example's anchor view).")
    return loaded


def main(argv):
    del argv
    config = flags.FLAGS.config
    config_lib.validate(config)
    write_teachers(config, flags.FLAGS.workdir)


if __name__ == "__main__":
    # Defined here, not at import: the trainer imports this module and train.py has its own flags.
    config_flags.DEFINE_config_file("config", None, "UniAlign config file (configs/unialign_*.py[:args]).")
    flags.DEFINE_string("workdir", None, "The workdir of the UniAlign run that will read the features.")
    flags.mark_flags_as_required(["config", "workdir"])
    cli.run(main)
