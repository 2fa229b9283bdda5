"""Benchmark the compiled train step of a config: compile time, step time, throughput, FLOPs, memory.

    python -m unialign_jax.bench --config=configs/cmg_avt.py --steps=10
    python -m unialign_jax.bench --config=configs/cmg_avt.py:size=reference --steps=3 --output=bench.jsonl
    python -m unialign_jax.bench --config=configs/cmg_avt.py:size=reference --config.model.remat=true
    python -m unialign_jax.bench --config=configs/cmg_avt.py:size=reference --profile_top=15
    python -m unialign_jax.bench --config=configs/comet_vt_at_it.py:size=reference --aot_topology=tpu:v5e:4x4

Prints one JSON line (and appends it to --output) with:
- `compile_seconds`; `step_seconds_median`, `_min`, `_max` over --steps timed steps after --warmup
  untimed ones; `examples_per_second`, `tokens_per_second` (examples x time steps x modalities);
- `flops_per_step`: matmul and convolution FLOPs of the optimised HLO, all devices, with every
  while-loop body counted as often as it runs (LSTM time steps, CLUB inner steps). XLA's own
  `cost_analysis()` counts a loop body once; its number is kept as `xla_cost_analysis_flops`.
- `utilisation`: flops_per_step / step time / peak. The peak is the datasheet dense peak on GPU/TPU
  (bf16, per chip, times the chips) and on CPU a float32 2048x2048 matmul measured before and
  after the timing, the better of the two (fake CPU devices share the host's cores, so the host's
  peak is the peak of all of them together);
- memory per device from XLA's buffer assignment (`memory_bytes_per_device`: arguments + outputs
  + temporaries - donated aliases), the allocator's peak where the device reports one
  (`device_peak_bytes`, GPU/TPU), and the process's peak resident memory (`host_peak_rss_bytes`);
- `load_average`: the host's 1-minute load when the timing ended (a busy host slows CPU timings).

Inputs are random arrays of the config's shapes, so the numbers measure the step, not the input
pipeline. Options that matter at scale are config fields, measured by overriding them:
`--config.model.dtype=bfloat16` (bf16 compute, float32 master weights), `--config.model.remat=true`
(activation rematerialisation), `--config.model.scan_layers=true` (transformer layers under
`nn.scan`).

`--profile_top=N` also traces --steps steps with the JAX profiler and prints where the time goes:
the time of XLA's executed ops (summed over threads), per model component, split into forward and
backward.

`--aot_topology` compiles the step ahead of time for another machine and reports its memory per
device without running it, so a config that does not fit is caught before paying for the machine:
`cpu:N` (N CPU devices, e.g. to check a mesh and its shardings) or `tpu:<name>` with a TPU
topology name such as `v5e:4x4` or `v4:2x2x2` (needs the TPU compiler: `pip install libtpu`; no
TPU is needed). The config's `mesh` is laid over the topology's devices.
"""

from __future__ import annotations

import collections
import glob
import json
import math
import os
import re
import resource
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from unialign_jax import cli
from unialign_jax import configlib
from unialign_jax import loop
from unialign_jax import methods
from unialign_jax import parallel

# Dense bf16 peak FLOP/s per chip from vendor datasheets (no sparsity).
DATASHEET_PEAK_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def measured_matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the fastest of `repeats` float32 n x n matmuls (the practical peak on CPU)."""
    x = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times)


def peak_flops(devices: list) -> tuple[float, str]:
    """Peak FLOP/s of `devices` together, and where the number comes from."""
    device = devices[0]
    for name, peak in DATASHEET_PEAK_FLOPS.items():
        if name.lower() in device.device_kind.lower():
            return peak * len(devices), f"datasheet bf16 ({device.device_kind})"
    if device.platform == "cpu":
        return measured_matmul_peak(), "measured fp32 2048x2048 matmul (host)"
    raise ValueError(f"No peak FLOP/s known for {device.device_kind!r}; add it to DATASHEET_PEAK_FLOPS.")


# -- FLOPs from the optimised HLO -----------------------------------------------------------------

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY_OP = re.compile(r"^[a-z]\w*\[([\d,]*)\]\S*\s+([a-z][\w\-]*)\((.*)$")
_CALLEE = re.compile(r"\b(?:calls|body|to_apply)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def _operands(text: str) -> list[str]:
    return [name.strip().lstrip("%") for name in text.split(")")[0].split(",")]


def _instruction_flops(op: str, out_dims: list[int], args: str, shapes: dict[str, list[int]]) -> float:
    if op == "dot":
        lhs = shapes[_operands(args)[0]]
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", args)
        size = math.prod(lhs[d] for d in _dims(contracting.group(1))) if contracting else 1
        return 2.0 * math.prod(out_dims) * size
    if op == "convolution":
        rhs = shapes[_operands(args)[1]]
        labels = re.search(r"dim_labels=\w+_(\w+)->", args).group(1)
        window = re.search(r"size=([\dx]+)", args)
        taps = math.prod(int(s) for s in window.group(1).split("x")) if window else 1
        return 2.0 * math.prod(out_dims) * taps * rhs[labels.index("i")]
    return 0.0


def hlo_flops(hlo_text: str) -> float:
    """Matmul + convolution FLOPs of an optimised HLO module, loop bodies times their trip counts.

    A loop without a known trip count is counted once (as XLA's cost analysis does).
    """
    shapes: dict[str, list[int]] = {}
    own: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    pending: list[tuple[str, str, list[int], str]] = []
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _COMPUTATION.match(line)
        if header and not line.startswith(" "):
            current = header.group(1)
            if line.startswith("ENTRY"):
                entry = current
            continue
        instruction = _INSTRUCTION.match(line)
        if not instruction or current is None:
            continue
        name, rest = instruction.groups()
        array = _ARRAY_OP.match(rest)
        if array:
            dims, op, args = _dims(array.group(1)), array.group(2), array.group(3)
            shapes[name] = dims
            if op in ("dot", "convolution"):
                pending.append((current, op, dims, args))
        trips = _TRIP_COUNT.search(rest)
        for callee in _CALLEE.findall(rest):
            body = re.search(r"\bbody=%?([\w.\-]+)", rest)
            repeat = int(trips.group(1)) if trips and body and body.group(1) == callee else 1
            calls[current].append((callee, repeat))
        branches = _BRANCHES.search(rest)
        if branches:
            calls[current].extend((b.strip().lstrip("%"), 1) for b in branches.group(1).split(","))
    for computation, op, dims, args in pending:
        own[computation] += _instruction_flops(op, dims, args, shapes)

    memo: dict[str, float] = {}

    def total(computation: str) -> float:
        if computation not in memo:
            memo[computation] = own[computation] + sum(n * total(c) for c, n in calls[computation])
        return memo[computation]

    return total(entry) if entry else 0.0


# -- the step ---------------------------------------------------------------------------------------


def build_step(config, stage_index: int, mesh) -> tuple[loop.JittedStep, Any, Any, Any]:
    """(step function, abstract state with shardings, abstract batch with sharding, stage)."""
    method = methods.for_config(config)
    stage = loop.stage_specs(config)[stage_index]
    abstract = jax.eval_shape(lambda: method.random_state(config, stage, jax.random.key(config.seed)))
    shardings = loop.state_shardings(abstract, mesh, config.sharding_rules)
    step_fn = method.step(config, stage, mesh, abstract, shardings)
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    batch_sharding = parallel.batch_sharding(mesh)
    abstract_batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
        for k, v in method.random_batch(config, stage, 0).items()
    }
    return step_fn, abstract_state, abstract_batch, stage


def memory_summary(compiled) -> dict:
    """Per-device bytes from XLA's buffer assignment of a compiled executable."""
    memory = compiled.memory_analysis()
    if memory is None:
        return {}
    return {
        "memory_bytes_per_device": int(
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes
        ),
        "argument_bytes_per_device": int(memory.argument_size_in_bytes),
        "temp_bytes_per_device": int(memory.temp_size_in_bytes),
    }


def flop_counts(compiled) -> dict:
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {
        "flops_per_device": hlo_flops(compiled.as_text()),
        "xla_cost_analysis_flops": float(cost.get("flops", float("nan"))),
    }


def _describe(config, stage, mesh, label: str) -> dict:
    model = config.model
    return {
        "config": config.get("name", ""),  # main() puts the --config argument here
        "size": config.get("size", ""),
        "stage": stage.name,
        "modalities": list(stage.modalities),
        "batch_size": config.batch_size,
        "dtype": model.get("dtype", "float32"),
        "remat": bool(model.get("remat", False)),
        "scan_layers": bool(model.get("scan_layers", False)),
        "mesh": dict(mesh.shape),
        "label": label,
    }


def benchmark(config, stage_index: int = 0, steps: int = 10, warmup: int = 2,
              devices: list | None = None, label: str = "") -> tuple[dict, Any, Any]:
    """Compiles and times one stage's train step on `devices` (default: all).

    Returns (measurements, `run(count)` that runs `count` more steps, the compiled step).
    """
    mesh = parallel.make_mesh(config.mesh, devices)
    devices = list(mesh.devices.flat)
    peak_before, _ = peak_flops(devices)
    method = methods.for_config(config)
    step_fn, abstract_state, abstract_batch, stage = build_step(config, stage_index, mesh)
    out_shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
    state = jax.jit(lambda: method.random_state(config, stage, jax.random.key(config.seed)),
                    out_shardings=out_shardings)()
    batch = parallel.global_batch(method.random_batch(config, stage, 0), mesh)

    start = time.perf_counter()
    compiled = step_fn.lower(abstract_state, abstract_batch).compile()
    compile_seconds = time.perf_counter() - start
    flops = flop_counts(compiled)

    def run(state, count):
        times = []
        for _ in range(count):
            begin = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - begin)
        return state, times

    state, _ = run(state, warmup)
    state, times = run(state, steps)
    load = os.getloadavg()[0]
    median = statistics.median(times)
    peak, peak_source = peak_flops(devices)
    peak = max(peak, peak_before)  # a busy host lowers a measured peak: keep the better measurement
    flops_per_step = flops["flops_per_device"] * mesh.size
    tokens = method.tokens_per_step(config, stage, abstract_state)
    stats = devices[0].memory_stats() or {}
    result = {
        **_describe(config, stage, mesh, label),
        "device": devices[0].device_kind,
        "num_devices": mesh.size,
        "compile_seconds": round(compile_seconds, 2),
        "step_seconds_median": median,
        "step_seconds_min": min(times),
        "step_seconds_max": max(times),
        "examples_per_second": config.batch_size / median,
        "tokens_per_second": tokens / median,
        "flops_per_step": flops_per_step,
        "xla_cost_analysis_flops": flops["xla_cost_analysis_flops"] * mesh.size,
        "flops_per_second": flops_per_step / median,
        "peak_flops_per_second": peak,
        "peak_source": peak_source,
        "utilisation": flops_per_step / median / peak,
        **memory_summary(compiled),
        "device_peak_bytes": stats.get("peak_bytes_in_use"),
        "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "timed_steps": steps,
        "load_average": load,
    }
    return result, lambda count: run(state, count), compiled


def compile_for_topology(config, topology: str, stage_index: int = 0, label: str = "") -> dict:
    """Compiles the step for `topology` ('cpu:N' or 'tpu:<name>') without running it."""
    platform, _, name = topology.partition(":")
    if platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) != int(name):
            raise ValueError(f"--aot_topology={topology}: this process has {len(devices)} CPU devices.")
    elif platform == "tpu":
        from jax.experimental import topologies

        try:
            devices = topologies.get_topology_desc(name, platform="tpu").devices
        except RuntimeError as error:
            raise RuntimeError(f"--aot_topology={topology}: compiling for TPU needs the TPU compiler "
                               f"(`pip install libtpu`, no TPU needed): {error}") from error
    else:
        raise ValueError(f"--aot_topology={topology!r}: expected 'cpu:N' or 'tpu:<topology name>'.")
    mesh = parallel.make_mesh(config.mesh, devices)
    step_fn, abstract_state, abstract_batch, stage = build_step(config, stage_index, mesh)
    start = time.perf_counter()
    compiled = step_fn.lower(abstract_state, abstract_batch).compile()
    flops = flop_counts(compiled)
    return {
        **_describe(config, stage, mesh, label),
        "aot_topology": topology,
        "device": devices[0].device_kind,
        "num_devices": len(devices),
        "compile_seconds": round(time.perf_counter() - start, 2),
        "flops_per_step": flops["flops_per_device"] * mesh.size,
        **memory_summary(compiled),
    }


# -- where the time goes ----------------------------------------------------------------------------

_COMPONENT = re.compile(
    r"^((semantic_encoder|specific_encoder|decoder|cpc|video_pooler)_[a-z]+|adapter|quantizer|"
    r"(mu|logvar)_[a-z]+)$"
)


def component_of(op_name: str) -> str:
    """Model component of an HLO op from its `op_name` metadata, e.g. 'decoder_video backward'."""
    segments = re.split(r"/", op_name)
    direction = "backward" if any(s.startswith("transpose(") for s in segments) else "forward"
    for segment in segments:
        if _COMPONENT.match(segment):
            name = segment
            if segment.startswith(("mu_", "logvar_")):
                name = "club_" + segment.split("_", 1)[1]
            return f"{name} {direction}"
    return f"other {direction}"


def profile_components(run, hlo_text: str, steps: int) -> list[tuple[str, float]]:
    """(component, milliseconds per step) from a JAX profiler trace of `steps` steps, largest first.

    Milliseconds are the summed durations of XLA's executed ops over all threads (CPU time), so
    they add up to more than the step time when XLA runs ops in parallel.
    """
    op_names = dict(re.findall(r"%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo_text))
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory)
        run(steps)
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
        profile = jax.profiler.ProfileData.from_file(path)
    totals: dict[str, float] = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in op_names:
                    totals[component_of(op_names[event.name])] += event.duration_ns / 1e6 / steps
    return sorted(totals.items(), key=lambda item: -item[1])


def main(argv):
    del argv
    options = flags.FLAGS
    methods.for_config(options.config).validate(options.config)
    stages = len(options.config.stages)
    if not 0 <= options.stage < stages:
        raise configlib.ConfigError(f"--stage={options.stage}: the config has {stages} stage(s), 0..{stages - 1}.")
    if options.steps < 1 or options.warmup < 0:
        raise configlib.ConfigError(f"--steps must be >= 1 and --warmup >= 0, got {options.steps} and {options.warmup}.")
    if options.aot_topology:
        if options.aot_topology.startswith("cpu:"):
            jax.config.update("jax_num_cpu_devices", int(options.aot_topology.split(":")[1]))
        result = compile_for_topology(options.config, options.aot_topology, options.stage, options.label)
    else:
        result, run, compiled = benchmark(options.config, options.stage, options.steps, options.warmup,
                                          label=options.label)
        if options.profile_top:
            components = profile_components(run, compiled.as_text(), options.steps)
            result["profile_ms_per_step"] = {k: round(v, 1) for k, v in components[: options.profile_top]}
    result["config"] = config_flags.get_config_filename(options["config"])
    line = json.dumps(result)
    print(line)
    if options.output:
        with open(options.output, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:args]).", lock_config=True)
    flags.DEFINE_integer("steps", 10, "Timed steps.")
    flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
    flags.DEFINE_integer("stage", 0, "Which stage of the config to benchmark.")
    flags.DEFINE_string("output", "", "Append the JSON line to this file.")
    flags.DEFINE_string("label", "", "Free-text label stored with the result (e.g. 'remat on').")
    flags.DEFINE_integer("profile_top", 0, "Also profile, and report the N most expensive model components.")
    flags.DEFINE_string("aot_topology", "", "Compile only, for 'cpu:N' or 'tpu:<topology>' (e.g. tpu:v5e:4x4).")
    cli.run(main)
