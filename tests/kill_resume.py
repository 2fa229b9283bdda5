"""Exact resume under SIGKILL: kills a training run at random moments, reruns it to the end, and
compares the final parameters and results with an uninterrupted run (bit for bit).

    python tests/kill_resume.py --kills=10 [--config=configs/comet_vt_at_it.py:data=synthetic] \
        [--steps=60] [--seed=0] [--out=/tmp/kill_resume]

Not a pytest test (it trains the three-stage COMET config 1 + kills times); its output is quoted in
the README. Each kill lands at a uniform random time within the uninterrupted run's wall time, so
kills fall in compilation, training, checkpoint writes, the Fisher pass and evaluation alike.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent


def train_command(config: str, steps: int, workdir: pathlib.Path) -> list[str]:
    overrides = [f"--config.stages[{i}].steps={steps}" for i in range(3)]
    return [sys.executable, "-m", "unialign_jax.train", f"--config={config}", f"--workdir={workdir}",
            "--config.checkpoint.every=10", *overrides]


def run_to_end(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def final_arrays(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    """The last stage's final stored state, flattened to {path: array}."""
    import jax

    from unialign_jax import checkpoint as ckpt_lib

    stage_dir = sorted(p for p in workdir.iterdir() if p.name.startswith("stage_"))[-1]
    with ckpt_lib.StageCheckpointer(stage_dir) as checkpointer:
        state, meta = checkpointer.restore_state()
    assert meta["finished"], stage_dir
    leaves = jax.tree_util.tree_leaves_with_path(state)
    return {jax.tree_util.keystr(path): np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(
        leaf.dtype, jax.dtypes.prng_key) else leaf) for path, leaf in leaves}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/comet_vt_at_it.py:data=synthetic")
    parser.add_argument("--steps", type=int, default=60, help="steps per stage")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument("--out", default="/tmp/kill_resume")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    reference = out / "uninterrupted"
    duration = run_to_end(train_command(args.config, args.steps, reference))
    expected = final_arrays(reference)
    expected_results = json.loads((reference / "results" / "summary.json").read_text())
    print(f"uninterrupted run: {duration:.1f} s, {len(expected)} arrays in the final state", flush=True)

    rng = random.Random(args.seed)
    failures = 0
    for kill in range(args.kills):
        workdir = out / f"kill_{kill}"
        delay = rng.uniform(0.0, duration)
        command = train_command(args.config, args.steps, workdir)
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            process.wait(timeout=delay)
            killed = "finished before the kill"
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            killed = "killed"
        steps = sorted(p.name for p in workdir.glob("stage_*/*") if p.name.isdigit() or "damaged" in p.name)
        run_to_end(command)
        actual = final_arrays(workdir)
        results = json.loads((workdir / "results" / "summary.json").read_text())
        same = (actual.keys() == expected.keys()
                and all(np.array_equal(actual[k], expected[k]) for k in expected)
                and results == expected_results)
        failures += not same
        print(f"kill {kill}: at {delay:5.1f} s ({killed}; checkpoints then: {steps or 'none'}) -> "
              f"{'identical' if same else 'DIFFERENT'} final state and results", flush=True)
    print(f"{args.kills - failures}/{args.kills} resumed runs identical to the uninterrupted one")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
