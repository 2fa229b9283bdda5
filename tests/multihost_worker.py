"""One process of the two-process test (`test_multihost.py`); run as `python multihost_worker.py WORKDIR DATA_DIR`.

The environment gives the coordinator (`UNIALIGN_COORDINATOR`, `UNIALIGN_NUM_PROCESSES`,
`UNIALIGN_PROCESS_ID`) and 2 CPU devices per process. The process trains the tiny CMG stage of
`multihost_config` on a (data 2, fsdp 2) mesh spanning both processes, each reading its own shard
of the data, with Orbax checkpoints written collectively; then restores the final checkpoint
collectively onto a different mesh (data 4, everything replicated) and checks it equals the state
in memory. Prints `OK <process index>` at the end.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from unialign_jax import checkpoint as ckpt_lib  # noqa: E402
from unialign_jax import parallel  # noqa: E402
from unialign_jax import loop  # noqa: E402
from unialign_jax.methods.cmg import model as cmg_model
from unialign_jax.methods.cmg import step as cmg_step

from tiny import tiny_cmg_config  # noqa: E402


def multihost_config(data_dir: str):
    """The tiny audio-text CMG stage (3 steps, checkpoint at the end) on a mesh of both processes."""
    config = tiny_cmg_config(data_dir, steps=3)
    config.checkpoint.every = 3
    config.log_every = 3
    config.mesh = (("data", 2), ("fsdp", 2))
    config.sharding_rules = parallel.FSDP_RULES
    # Adam would turn the rounding noise of exactly-zero gradients (CPC predictor bias, attention
    # key bias), which differs between shardings, into +-learning-rate steps (test_parallel.py).
    config.optim.eps = 1e-3
    return config


def initial_state(config, stage):
    """The fresh state, initialised with an RngBitGenerator key (compiles much faster than threefry).

    The state's own key stays threefry, whose random bits do not depend on the sharding.
    """
    state = cmg_model.fresh_state(config, stage, jax.random.key(config.seed, impl="rbg"))
    return state.replace(rng=jax.random.key(config.seed))


def main(workdir: str, data_dir: str) -> None:
    if not parallel.maybe_initialize_distributed():
        raise RuntimeError("multihost_worker.py needs UNIALIGN_COORDINATOR and friends in the environment.")
    config = multihost_config(data_dir)
    stage = loop.stage_specs(config)[0]
    mesh = parallel.make_mesh(config.mesh)
    state = loop.train_stage(config, stage, workdir, mesh, lambda: initial_state(config, stage),
                             step_factory=cmg_step.CMGStep, iterator_factory=cmg_model.train_iterator)

    other_mesh = parallel.make_mesh([("data", 4)])
    abstract = jax.eval_shape(lambda: state)
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=parallel.replicated(other_mesh)), abstract
    )
    checkpointer = ckpt_lib.StageCheckpointer(os.path.join(workdir, stage.folder))
    restored, meta = checkpointer.restore(stage.steps, target, None)
    checkpointer.close()
    assert meta["finished"], meta
    trained = multihost_utils.process_allgather(state.params, tiled=True)
    for ours, theirs in zip(jax.tree.leaves(restored.params), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(np.asarray(ours), theirs)
    print(f"OK {jax.process_index()}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
