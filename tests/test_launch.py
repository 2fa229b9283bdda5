"""Tests for the multi-host launchers in launch/ (TPU pod slice over gcloud, SLURM GPU nodes).

The scripts run in DRY_RUN mode (they print the commands they would run) or against fake
`gcloud` / `git` / `srun` executables that log their arguments. The remote command strings are
executed by a real bash with a fake venv python, so quoting is checked by the shell that parses it
on the workers, not by a Python imitation of it.
"""

import os
import pathlib
import shlex
import shutil
import subprocess
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TPU_POD = REPO / "launch" / "tpu_pod.sh"
SLURM = REPO / "launch" / "slurm_gpu.sbatch"

TPU_ENV = {"NAME": "unialign-pod", "ZONE": "us-central2-b", "ACCELERATOR": "v4-32", "VERSION": "tpu-ubuntu2204-base"}
GCLOUD_TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
GCLOUD_QUEUED = ["gcloud", "compute", "tpus", "queued-resources"]
# Colons and commas (config args), spaces, both kinds of quote, `$` and `;`.
TRAIN_ARGS = [
    "--config=configs/comet_vt_at_it.py:data=digits,size=tiny",
    "--workdir=gs://my-bucket/runs/run a",
    "--config.note=it's \"quoted\" $HOME; echo injected",
    "--config.stages.0.steps=5",
]
SLURM_ENV = {
    "CONFIG": "configs/comet_vt_at_it.py:data=digits,size=tiny",
    "WORKDIR": "/shared/runs/run a",
    "VENV": "/shared/venvs/unialign",
    "GPUS_PER_NODE": "4",
}


def _jax_pin() -> str:
    with open(REPO / "pyproject.toml", "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    (pin,) = [d for d in dependencies if d.startswith("jax==")]
    return pin.removeprefix("jax==")


def _run(script, env, args=(), path_prefix=None):
    """Runs a launcher from the repository root with only `env` (plus PATH and HOME)."""
    path = os.environ["PATH"] if path_prefix is None else f"{path_prefix}:{os.environ['PATH']}"
    return subprocess.run(
        ["bash", str(script), *args],
        env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _dry_run_commands(script, env, args=()):
    result = _run(script, {"DRY_RUN": "1", **env}, args)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def _flag(command, name):
    """The value of `--name=value` in an argv list."""
    (value,) = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"--{name}=")]
    return value


def _run_on_fake_worker(command, tmp_path):
    """Runs a remote `--command` string in bash, in a fake worker home directory.

    Returns what the fake venv python saw: its working directory, the forwarded environment, its argv.
    """
    home = tmp_path / "worker_home"
    (home / "unialign_jax").mkdir(parents=True, exist_ok=True)
    python = home / "unialign_venv" / "bin" / "python"
    python.parent.mkdir(parents=True, exist_ok=True)
    python.write_text(
        "#!/bin/sh\nprintf '%s\\0' \"$PWD\" \"UNIALIGN_DISTRIBUTED=$UNIALIGN_DISTRIBUTED\""
        ' "LIBTPU_INIT_ARGS=$LIBTPU_INIT_ARGS" "$@"\n'
    )
    python.chmod(0o755)
    result = subprocess.run(
        ["bash", "-c", command],
        env={"HOME": str(home), "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.split("\0")[:-1]


# ---------------------------------------------------------------------------------------------------
# Both scripts.


@pytest.mark.parametrize("script", [TPU_POD, SLURM], ids=lambda p: p.name)
def test_script_is_valid_bash(script):
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


@pytest.mark.parametrize("script", [TPU_POD, SLURM], ids=lambda p: p.name)
def test_shellcheck_is_clean(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed on this machine")
    result = subprocess.run(
        ["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stdout


# ---------------------------------------------------------------------------------------------------
# TPU pod slice.


def test_tpu_pod_dry_run_prints_every_step(tmp_path):
    name, zone = TPU_ENV["NAME"], TPU_ENV["ZONE"]
    describe, create, archive, scp, setup, train = _dry_run_commands(TPU_POD, TPU_ENV, ["--", *TRAIN_ARGS])

    assert describe == [*GCLOUD_TPU_VM, "describe", name, f"--zone={zone}", "--format=value(state)"]
    assert create == [
        *GCLOUD_TPU_VM, "create", name, "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", f"--zone={zone}"
    ]
    assert archive[:3] == ["git", "-C", str(REPO)] and archive[3] == "archive" and archive[-1] == "HEAD"
    tarball = _flag(archive, "output")
    assert scp == [*GCLOUD_TPU_VM, "scp", tarball, f"{name}:unialign_jax.tar.gz", "--worker=all", f"--zone={zone}"]
    for ssh in (setup, train):
        assert ssh[:6] == [*GCLOUD_TPU_VM, "ssh", name] and "--worker=all" in ssh

    install = _flag(setup, "command")
    subprocess.run(["bash", "-n", "-c", install], check=True, timeout=30)
    assert f"'jax[tpu]=={_jax_pin()}'" in install
    assert "-f https://storage.googleapis.com/jax-releases/libtpu_releases.html" in install
    assert '-e "$HOME/unialign_jax[gcs]"' in install  # gcsfs for the gs:// workdir

    assert _run_on_fake_worker(_flag(train, "command"), tmp_path) == [
        str(tmp_path / "worker_home" / "unialign_jax"),
        "UNIALIGN_DISTRIBUTED=1",
        "LIBTPU_INIT_ARGS=",
        "-m",
        "unialign_jax.train",
        *TRAIN_ARGS,
    ]


def test_tpu_pod_queued_resource_variant_with_project():
    env = {**TPU_ENV, "QUEUED": "1", "PROJECT": "my-project", "SPOT": "1"}
    commands = _dry_run_commands(TPU_POD, env, ["--", *TRAIN_ARGS])
    name, zone = TPU_ENV["NAME"], TPU_ENV["ZONE"]

    assert commands[0] == [
        *GCLOUD_QUEUED, "describe", name, f"--zone={zone}", "--project=my-project", "--format=value(state.state)"
    ]
    assert commands[1] == [
        *GCLOUD_QUEUED, "create", name, f"--node-id={name}", "--accelerator-type=v4-32",
        "--runtime-version=tpu-ubuntu2204-base", f"--zone={zone}", "--project=my-project", "--spot",
    ]  # fmt: skip
    assert not any(c[:5] == [*GCLOUD_TPU_VM, "create"] for c in commands)
    assert all("--project=my-project" in c for c in commands if c[0] == "gcloud")


def test_tpu_pod_flags_override_environment(tmp_path):
    flags = [
        "--name", "flag-pod", "--zone=europe-west4-a", "--dry-run", "--module", "unialign_jax.evaluate",
        "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b='2'",
    ]  # fmt: skip
    result = _run(TPU_POD, TPU_ENV, [*flags, "--", *TRAIN_ARGS])
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()]

    assert commands[1][:6] == [*GCLOUD_TPU_VM, "create", "flag-pod"]
    assert all("--zone=europe-west4-a" in c for c in commands if c[0] == "gcloud")
    seen = _run_on_fake_worker(_flag(commands[-1], "command"), tmp_path)
    assert seen[2:] == ["LIBTPU_INIT_ARGS=--xla_a=1 --xla_b='2'", "-m", "unialign_jax.evaluate", *TRAIN_ARGS]


@pytest.mark.parametrize("variable", ["NAME", "ZONE", "ACCELERATOR", "VERSION"])
def test_tpu_pod_missing_variable_is_named(variable):
    env = {key: value for key, value in TPU_ENV.items() if key != variable}
    result = _run(TPU_POD, {"DRY_RUN": "1", **env}, ["--", *TRAIN_ARGS])
    assert result.returncode != 0
    assert f"{variable} is not set" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no train arguments"),
        (["--", "--config=configs/x.py"], "no --workdir"),
        (["--", "--config=configs/x.py", "--workdir", "runs/a"], "--workdir=runs/a is relative"),
        (["--env", "not a pair", "--", "--workdir=gs://b/r"], "is not KEY=VALUE"),
        (["--nme=x", "--", "--workdir=gs://b/r"], "unknown flag '--nme'"),
        (["--zone"], "flag --zone needs a value"),
    ],
)
def test_tpu_pod_rejects_bad_arguments(args, message):
    result = _run(TPU_POD, {"DRY_RUN": "1", **TPU_ENV}, args)
    assert result.returncode != 0
    assert message in result.stderr
    assert result.stdout == ""


_FAKE_TOOL = r"""#!/bin/bash
# Logs its name and arguments. `gcloud ... describe` answers the next line of $FAKE_STATES
# (MISSING: fails, as gcloud does for a resource that does not exist); `git archive` writes --output.
tool=$(basename "$0")
{ printf '%s' "$tool"; printf '\t%s' "$@"; printf '\n'; } >> "$FAKE_LOG"
if [[ "$tool" == git && "$3" == archive ]]; then
    for arg; do [[ "$arg" == --output=* ]] && : > "${arg#--output=}"; done
elif [[ "$tool" == gcloud && "$4" == describe ]]; then
    state=$(head -n 1 "$FAKE_STATES"); sed -i 1d "$FAKE_STATES"
    [[ "$state" == MISSING ]] && exit 1
    echo "$state"
fi
exit 0
"""


def _run_tpu_pod_with_fake_tools(tmp_path, queued, states):
    """Runs tpu_pod.sh for real against fake gcloud and git; returns (result, [(tool, verb), ...])."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("gcloud", "git"):
        (bin_dir / tool).write_text(_FAKE_TOOL)
        (bin_dir / tool).chmod(0o755)
    (tmp_path / "states").write_text("".join(f"{state}\n" for state in states))
    log = tmp_path / "log"
    env = {
        **TPU_ENV,
        "QUEUED": queued,
        "FAKE_LOG": str(log),
        "FAKE_STATES": str(tmp_path / "states"),
        "TMPDIR": str(tmp_path),
        "POLL_SECONDS": "0",
    }
    result = _run(TPU_POD, env, ["--", *TRAIN_ARGS], path_prefix=bin_dir)
    calls = [line.split("\t") for line in log.read_text().splitlines()]
    # gcloud compute tpus GROUP VERB ... / git -C REPO SUBCOMMAND ...
    return result, [(call[0], call[4] if call[0] == "gcloud" else call[3]) for call in calls]


@pytest.mark.parametrize(
    "queued, states, slice_steps",
    [
        ("0", ["MISSING"], ["describe", "create"]),
        ("0", ["READY"], ["describe"]),
        ("1", ["MISSING", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"], ["describe", "create"] + ["describe"] * 3),
        ("1", ["ACTIVE"], ["describe"]),
    ],
)
def test_tpu_pod_creates_or_reuses_the_slice_and_waits_for_it(tmp_path, queued, states, slice_steps):
    result, steps = _run_tpu_pod_with_fake_tools(tmp_path, queued, states)
    assert result.returncode == 0, result.stderr
    assert steps == [("gcloud", verb) for verb in slice_steps] + [
        ("git", "status"),
        ("git", "archive"),
        ("gcloud", "scp"),
        ("gcloud", "ssh"),
        ("gcloud", "ssh"),
    ]
    assert (tmp_path / f"unialign_jax-{TPU_ENV['NAME']}.tar.gz").exists()


@pytest.mark.parametrize("queued, state", [("1", "FAILED"), ("1", "SUSPENDED"), ("0", "PREEMPTED")])
def test_tpu_pod_stops_on_a_dead_slice(tmp_path, queued, state):
    result, steps = _run_tpu_pod_with_fake_tools(tmp_path, queued, [state])
    assert result.returncode != 0
    assert f"'{state}'" in result.stderr and "delete it with" in result.stderr
    assert steps == [("gcloud", "describe")]


# ---------------------------------------------------------------------------------------------------
# SLURM GPU nodes.


def test_slurm_header_requests_one_task_per_node():
    directives = [line.split()[1] for line in SLURM.read_text().splitlines() if line.startswith("#SBATCH ")]
    assert "--ntasks-per-node=1" in directives
    requested = {directive.split("=")[0] for directive in directives}
    assert {"--nodes", "--gpus-per-node", "--cpus-per-task", "--time"} <= requested


def test_slurm_dry_run_prints_the_srun_line():
    extra = ["--config.note=it's \"quoted\" $HOME", "--config.seed=3"]
    assert _dry_run_commands(SLURM, SLURM_ENV, extra) == [
        [
            "srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", f"--chdir={REPO}",
            "env", "UNIALIGN_DISTRIBUTED=1", "JAX_LOCAL_DEVICE_IDS=0,1,2,3",
            "/shared/venvs/unialign/bin/python", "-m", "unialign_jax.train",
            f"--config={SLURM_ENV['CONFIG']}", f"--workdir={SLURM_ENV['WORKDIR']}", *extra,
        ]
    ]  # fmt: skip


def test_slurm_reads_gpu_count_and_submit_dir_from_slurm(tmp_path):
    env = {key: value for key, value in SLURM_ENV.items() if key not in ("GPUS_PER_NODE", "VENV")}
    env |= {"SLURM_GPUS_PER_NODE": "a100:2", "SLURM_SUBMIT_DIR": str(tmp_path)}
    (command,) = _dry_run_commands(SLURM, env)
    assert f"--chdir={tmp_path}" in command
    assert "JAX_LOCAL_DEVICE_IDS=0,1" in command
    assert f"{tmp_path}/.venv/bin/python" in command


def test_slurm_runs_srun(tmp_path):
    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\nprintf '%s\\0' \"$@\" > \"$FAKE_LOG\"\n")
    srun.chmod(0o755)
    log = tmp_path / "log"
    result = _run(SLURM, {**SLURM_ENV, "FAKE_LOG": str(log)}, ["--config.seed=3"], path_prefix=tmp_path)
    assert result.returncode == 0, result.stderr
    argv = log.read_text().split("\0")[:-1]
    assert argv[:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert argv[-3:] == [f"--config={SLURM_ENV['CONFIG']}", f"--workdir={SLURM_ENV['WORKDIR']}", "--config.seed=3"]


@pytest.mark.parametrize("variable", ["CONFIG", "WORKDIR", "GPUS_PER_NODE"])
def test_slurm_missing_variable_is_named(variable):
    env = {key: value for key, value in SLURM_ENV.items() if key != variable}
    result = _run(SLURM, {"DRY_RUN": "1", **env})
    assert result.returncode != 0
    assert f"{variable} is not set" in result.stderr
    assert result.stdout == ""
