#!/usr/bin/env bash
# Runs `python -m unialign_jax.train` on every worker of a Cloud TPU VM pod slice.
#
#   NAME=my-pod ZONE=us-central2-b ACCELERATOR=v4-32 VERSION=tpu-ubuntu2204-base \
#     bash launch/tpu_pod.sh -- --config=configs/comet_vt_at_it.py:data=digits \
#       --workdir=gs://my-bucket/runs/comet_v4_32
#
# Steps: create the slice (or reuse it if it is READY; QUEUED=1 asks through a
# queued resource and waits for ACTIVE), ship `git archive HEAD` to every worker,
# install it into a venv with jax[tpu], then run the same command on all workers
# with UNIALIGN_DISTRIBUTED=1. Re-running the same command resumes the run.
# Every setting is an environment variable or the flag of the same name
# (--name=..., --queued, --dry-run, ...); flags win. See launch/README.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: [VAR=value ...] bash launch/tpu_pod.sh [flags] -- TRAIN_ARGS...

required   NAME (--name)  ZONE (--zone)  ACCELERATOR (--accelerator)  VERSION (--version)
optional   PROJECT (--project)    QUEUED=1 (--queued)    SPOT=1 (--spot)
           DRY_RUN=1 (--dry-run)  MODULE (--module, default unialign_jax.train)
           PYTHON (--python, interpreter on the workers, default python3.11)
           POLL_SECONDS (queued-resource polling period, default 60)
           --env KEY=VALUE (repeatable: environment of the remote command)
TRAIN_ARGS go to `python -m MODULE` unchanged and must include --workdir=gs://...
EOF
}

die() {
  echo "tpu_pod.sh: error: $*" >&2
  exit 1
}

# quote WORD...: the words quoted for a POSIX shell, joined by spaces.
quote() {
  local word out="" safe='^[A-Za-z0-9_@%+=:,./-]+$' sq="'" esc="'\\''"
  for word in "$@"; do
    if [[ "$word" =~ $safe ]]; then
      out+=" $word"
    else
      out+=" '${word//$sq/$esc}'"
    fi
  done
  printf '%s' "${out# }"
}

# Prints the command (ready to paste into a shell) under DRY_RUN=1, otherwise runs it.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s\n' "$(quote "$@")"
  else
    "$@"
  fi
}

set_flag() {  # set_flag --flag VALUE
  case "$1" in
    --name) NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --accelerator) ACCELERATOR=$2 ;;
    --version) VERSION=$2 ;;
    --project) PROJECT=$2 ;;
    --module) MODULE=$2 ;;
    --python) PYTHON=$2 ;;
    --env) remote_env+=("$2") ;;
    *) die "unknown flag '$1' (train arguments go after --)" ;;
  esac
}

remote_env=()
while [[ $# -gt 0 ]]; do
  arg=$1
  shift
  case "$arg" in
    --) break ;;
    -h | --help) usage; exit 0 ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --*=*) set_flag "${arg%%=*}" "${arg#*=}" ;;
    --*)
      [[ $# -gt 0 ]] || die "flag $arg needs a value"
      set_flag "$arg" "$1"
      shift
      ;;
    *) die "unexpected argument '$arg' (train arguments go after --)" ;;
  esac
done
train_args=("$@")

for spec in NAME:--name ZONE:--zone ACCELERATOR:--accelerator VERSION:--version; do
  var=${spec%%:*}
  [[ -n "${!var:-}" ]] || die "$var is not set (environment variable $var or flag ${spec#*:})"
done
PROJECT="${PROJECT:-}"
QUEUED="${QUEUED:-0}"
SPOT="${SPOT:-0}"
DRY_RUN="${DRY_RUN:-0}"
MODULE="${MODULE:-unialign_jax.train}"
PYTHON="${PYTHON:-python3.11}"
POLL_SECONDS="${POLL_SECONDS:-60}"

[[ ${#train_args[@]} -gt 0 ]] || die "no train arguments: pass them after --, e.g. -- --config=configs/X.py --workdir=gs://BUCKET/RUN"
workdir=""
for ((i = 0; i < ${#train_args[@]}; i++)); do
  case "${train_args[i]}" in
    --workdir=*) workdir="${train_args[i]#--workdir=}" ;;
    --workdir) workdir="${train_args[i + 1]:-}" ;;
  esac
done
[[ -n "$workdir" ]] || die "no --workdir in the train arguments; all workers must share it (gs://BUCKET/RUN)"
[[ "$workdir" == gs://* || "$workdir" == /* ]] \
  || die "--workdir=$workdir is relative: every worker would write its own copy; use gs://BUCKET/RUN or an absolute path on a shared filesystem"
for pair in ${remote_env[@]+"${remote_env[@]}"}; do
  [[ "$pair" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$pair' is not KEY=VALUE"
done

repo_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
jax_version=$(sed -n 's/^[[:space:]]*"jax==\([^"]*\)".*/\1/p' "$repo_dir/pyproject.toml")
[[ -n "$jax_version" ]] || die "no \"jax==VERSION\" pin found in $repo_dir/pyproject.toml"

gcloud_flags=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
  gcloud_flags+=(--project="$PROJECT")
fi
create_flags=()
if [[ "$SPOT" == 1 ]]; then
  create_flags+=(--spot)
fi

# --- 1. The slice: reuse, create, or wait for the queued resource. -------------
read_state() {  # read_state CMD...: sets $state; empty when the resource does not exist.
  state=""
  if [[ "$DRY_RUN" == 1 ]]; then
    run "$@"
  else
    state=$("$@" 2>/dev/null) || state=""
  fi
}

if [[ "$QUEUED" == 1 ]]; then
  describe=(gcloud compute tpus queued-resources describe "$NAME" "${gcloud_flags[@]}" --format='value(state.state)')
  read_state "${describe[@]}"
  if [[ -z "$state" ]]; then
    run gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" \
      "${gcloud_flags[@]}" ${create_flags[@]+"${create_flags[@]}"}
    state=CREATING
  fi
  while [[ "$DRY_RUN" != 1 && "$state" != ACTIVE ]]; do
    case "$state" in
      CREATING | ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING)
        echo "tpu_pod.sh: queued resource $NAME is $state; next check in ${POLL_SECONDS}s" >&2
        sleep "$POLL_SECONDS"
        read_state "${describe[@]}"
        ;;
      *)
        die "queued resource $NAME is '${state:-gone}', not ACTIVE; delete it with: gcloud compute tpus queued-resources delete $NAME --zone=$ZONE --force"
        ;;
    esac
  done
else
  read_state gcloud compute tpus tpu-vm describe "$NAME" "${gcloud_flags[@]}" --format='value(state)'
  case "$state" in
    "")
      run gcloud compute tpus tpu-vm create "$NAME" --accelerator-type="$ACCELERATOR" \
        --version="$VERSION" "${gcloud_flags[@]}" ${create_flags[@]+"${create_flags[@]}"}
      ;;
    READY) echo "tpu_pod.sh: reusing the READY TPU VM $NAME" >&2 ;;
    *) die "TPU VM $NAME is '$state', not READY; delete it with: gcloud compute tpus tpu-vm delete $NAME --zone=$ZONE" ;;
  esac
fi

# --- 2. Code: the committed tree (HEAD) goes to every worker. ---------------------
if [[ -n "$(GIT_OPTIONAL_LOCKS=0 git -C "$repo_dir" status --porcelain --untracked-files=no 2>/dev/null)" ]]; then
  echo "tpu_pod.sh: warning: uncommitted changes in $repo_dir are NOT shipped (git archive HEAD)" >&2
fi
tarball="${TMPDIR:-/tmp}/unialign_jax-$NAME.tar.gz"
run git -C "$repo_dir" archive --format=tar.gz --output="$tarball" HEAD
run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:unialign_jax.tar.gz" --worker=all "${gcloud_flags[@]}"

# --- 3. Install on every worker: fresh code dir, persistent venv. ----------------
# Paths on the workers, double-quoted there; `$HOME` is expanded by the worker's shell.
# shellcheck disable=SC2016
code_dir='"$HOME/unialign_jax"' venv_dir='"$HOME/unialign_venv"' package='"$HOME/unialign_jax[gcs]"'
python_q=$(quote "$PYTHON")
setup="set -e"
setup+="; if ! command -v $python_q >/dev/null; then"
setup+=" sudo apt-get -o DPkg::Lock::Timeout=600 update"
setup+=" && sudo apt-get -o DPkg::Lock::Timeout=600 install -y $python_q $(quote "$PYTHON-venv"); fi"
setup+="; rm -rf $code_dir; mkdir -p $code_dir; tar -xzf unialign_jax.tar.gz -C $code_dir"
setup+="; $python_q -m venv $venv_dir; $venv_dir/bin/pip install --quiet --upgrade pip"
setup+="; $venv_dir/bin/pip install --quiet -e $package $(quote "jax[tpu]==$jax_version")"
setup+=" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${gcloud_flags[@]}" --command="$setup"

# --- 4. Train: the same command on all workers; jax.distributed finds its peers. ---
train="cd $code_dir && UNIALIGN_DISTRIBUTED=1"
for pair in ${remote_env[@]+"${remote_env[@]}"}; do
  train+=" ${pair%%=*}=$(quote "${pair#*=}")"
done
train+=" $venv_dir/bin/python -m $(quote "$MODULE") $(quote "${train_args[@]}")"
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${gcloud_flags[@]}" --command="$train"
