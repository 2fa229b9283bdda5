"""Benchmark the compiled train step of a config: compile time, step time, throughput, FLOPs, memory.

    python -m unialign_jax.bench --config=configs/cmg_avt.py --steps=10
    python -m unialign_jax.bench --config=configs/cmg_avt.py:size=reference --steps=3 --output=bench.jsonl

Prints one JSON line (and appends it to --output): compile seconds, median and spread of the step
time over --steps timed steps after --warmup untimed ones, examples and tokens per second, model
FLOPs per step from XLA's cost analysis, utilisation against the device peak (measured matmul peak
on CPU, datasheet peak on GPU/TPU), and peak memory (XLA's buffer assignment, and the allocator's
peak where the device reports one). Inputs are random arrays of the config's shapes, so the number
measures the step, not the input pipeline.
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from unialign_jax import parallel
from unialign_jax import trainer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py[:args]).", lock_config=True
)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_STAGE = flags.DEFINE_integer("stage", 0, "Which stage of the config to benchmark.")
_OUTPUT = flags.DEFINE_string("output", "", "Append the JSON line to this file.")

# Dense bf16/fp32 peak FLOP/s per chip from vendor datasheets (no sparsity).
DATASHEET_PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
}


def measured_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a float32 n x n matmul on the default device (the practical peak on CPU)."""
    x = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def device_peak_flops() -> tuple[float, str]:
    kind = jax.devices()[0].device_kind
    for name, peak in DATASHEET_PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak * jax.device_count(), f"datasheet ({kind})"
    return measured_matmul_peak() * jax.device_count(), f"measured fp32 matmul ({kind})"


def random_batch(config, modalities, batch_size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    batch = {
        m: rng.standard_normal((batch_size, *config.model.input_shapes[m])).astype(np.float32)
        for m in modalities
    }
    seq_len = config.model.input_shapes[modalities[0]][0]
    batch["label"] = rng.integers(0, 10, (batch_size,)).astype(np.int32)
    batch["step_labels"] = rng.integers(0, 10, (batch_size, seq_len)).astype(np.int32)
    return batch


def benchmark(config, stage_index: int = 0, steps: int = 10, warmup: int = 2) -> dict:
    """Compiles and times one stage's train step; returns the measurements."""
    stage = trainer.stage_specs(config)[stage_index]
    mesh = parallel.make_mesh(config.mesh)
    init = lambda: trainer.fresh_state(config, stage, jax.random.key(config.seed))
    abstract = jax.eval_shape(init)
    shardings = trainer.state_shardings(abstract, mesh, config.sharding_rules)
    state = jax.jit(init, out_shardings=shardings)()
    step_fn = trainer.StepFunction(config, stage, mesh, abstract, shardings)
    batch = parallel.global_batch(random_batch(config, stage.modalities, config.batch_size), mesh)

    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_seconds = time.perf_counter() - start
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", float("nan")))
    memory = compiled.memory_analysis()
    buffer_bytes = None
    if memory is not None:
        buffer_bytes = int(
            memory.temp_size_in_bytes
            + memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            - memory.alias_size_in_bytes
        )

    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - begin)
    median = statistics.median(times)
    peak, peak_source = device_peak_flops()
    stats = jax.devices()[0].memory_stats() or {}
    seq_len = config.model.input_shapes[stage.modalities[0]][0]
    return {
        "config": config.get("name", ""),
        "size": config.get("size", ""),
        "stage": stage.name,
        "modalities": list(stage.modalities),
        "batch_size": config.batch_size,
        "device": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "compile_seconds": round(compile_seconds, 3),
        "step_seconds_median": median,
        "step_seconds_min": min(times),
        "step_seconds_max": max(times),
        "examples_per_second": config.batch_size / median,
        "tokens_per_second": config.batch_size * seq_len * len(stage.modalities) / median,
        "flops_per_step": flops,
        "flops_per_second": flops / median,
        "peak_flops_per_second": peak,
        "peak_source": peak_source,
        "utilisation": flops / median / peak,
        "xla_buffer_bytes": buffer_bytes,
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "timed_steps": steps,
    }


def main(argv):
    del argv
    result = benchmark(_CONFIG.value, _STAGE.value, _STEPS.value, _WARMUP.value)
    line = json.dumps(result)
    print(line)
    if _OUTPUT.value:
        with open(_OUTPUT.value, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    app.run(main)
