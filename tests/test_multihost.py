"""Two local processes with a coordinator on localhost run the multi-host path end to end.

Each worker (`multihost_worker.py`) has 2 CPU devices; together they train a tiny CMG stage on a
mesh spanning both, each reading its own shard of the data, checkpointing collectively, and restore
onto another mesh. Meanwhile this process trains the same stage on one device on the same global
batches (process 0's shard, then process 1's); the final parameters must agree.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from unialign_jax import checkpoint as ckpt_lib
from unialign_jax import parallel
from unialign_jax import loop
from unialign_jax.data import pipeline
from unialign_jax.methods.cmg import step as cmg_step

from multihost_worker import initial_state, multihost_config

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(workdir: str, data_dir: str) -> list[subprocess.Popen]:
    port = _free_port()
    processes = []
    for index in range(2):
        env = dict(
            os.environ,
            XLA_FLAGS="--xla_force_host_platform_device_count=2",  # (conftest's other settings are inherited)
            JAX_PLATFORMS="cpu",
            UNIALIGN_COORDINATOR=f"localhost:{port}",
            UNIALIGN_NUM_PROCESSES="2",
            UNIALIGN_PROCESS_ID=str(index),
        )
        processes.append(subprocess.Popen([sys.executable, WORKER, workdir, data_dir], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return processes


def _one_device_reference(config):
    """The stage's final params on one device, fed the two processes' shards concatenated."""
    stage = loop.stage_specs(config)[0]
    mesh = parallel.make_mesh([("data", 1)], jax.devices()[:1])
    shards = [pipeline.make_train_iterator(stage.data, modalities=stage.modalities, batch_size=config.batch_size,
                                           seed=config.seed + stage.index, process_index=i, process_count=2)
              for i in range(2)]
    with jax.default_device(jax.devices()[0]):
        state = initial_state(config, stage)
    abstract = jax.eval_shape(lambda: state)
    shardings = loop.state_shardings(abstract, mesh, [])
    step_fn = cmg_step.CMGStep(config, stage, mesh, abstract, shardings)
    state = jax.device_put(state, shardings)
    for _ in range(stage.steps):
        pieces = [next(shard) for shard in shards]
        batch = {key: np.concatenate([piece[key] for piece in pieces]) for key in pieces[0]}
        state, _ = step_fn(state, parallel.global_batch(batch, mesh))
    return jax.device_get(state.params)


def test_two_processes_train_checkpoint_and_restore(tmp_path):
    config = multihost_config(str(tmp_path / "data"))
    pipeline.build_source(config.stages[0].data, "train")  # once, before the processes read it
    workdir = str(tmp_path / "run")
    processes = _launch(workdir, str(tmp_path / "data"))
    try:
        reference = _one_device_reference(config)
        outputs = [process.communicate(timeout=240)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for index, (process, output) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0 and f"OK {index}" in output, output[-3000:]

    stage = loop.stage_specs(config)[0]
    checkpointer = ckpt_lib.StageCheckpointer(os.path.join(workdir, stage.folder))
    assert checkpointer.latest_step() == stage.steps
    stored, meta = checkpointer.restore_state()
    checkpointer.close()
    assert meta["finished"]
    for ours, theirs in zip(jax.tree.leaves(stored["params"]), jax.tree.leaves(reference)):
        np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-5, atol=1e-5)
    # Each process saved its own data position: the iterator state of both shards is in the checkpoint.
    data_dir = os.path.join(workdir, stage.folder, str(stage.steps), "data")
    data_files = sorted(name for name in os.listdir(data_dir) if name.startswith("process_"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"], data_files

