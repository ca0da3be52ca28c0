#!/usr/bin/env bash
# Submit (or resume) a selfclust training run on a running Ray cluster with `ray job submit`.
#
#   launch/submit.sh --name RUN_NAME [--address URL] [--root DIR] [--no-wait] [--dry-run] \
#       [--verbose] CONFIG [key=value ...]
#
# --verbose: `selfclust train --verbose`, the workers' Ray output in the job log too (default:
# only in the run dir's ray.log).
# RUN_NAME is the run's persistent id: the run dir is ROOT/runs/RUN_NAME on storage every node
# sees (default ROOT=/shared, the EFS/Filestore mount of launch/*-gpu-spot.yaml), and each
# attempt's job id is RUN_NAME-<UTC time>. Submitting the same RUN_NAME again (after a
# preemption killed the head, a failure, or `ray job stop`) resumes the run from its latest
# checkpoint: the run dir's run.json keeps the Ray run name and the W&B run id.
# CONFIG (that one file) is uploaded as the job's working dir, so local edits take effect.
# Network interfaces: NCCL_SOCKET_IFNAME (CUDA collectives) and GLOO_SOCKET_IFNAME (CPU ones:
# label counts, the bank, the preemption flag, metrics), and NCCL_DEBUG, when set here, reach
# every worker through the job's runtime env (name the nodes' interface, e.g. ens5 or eth0).
#
# Secrets: WANDB_API_KEY, when set, reaches the job only through its runtime environment
# (env_vars). This script hands it to `ray job submit` through a pipe (--runtime-env /dev/fd/N):
# it is not written to a file, not placed on any command line, not echoed. On the cluster,
# Ray keeps the runtime env with the job in memory (readable by anyone who reaches the
# dashboard: `ray job list`; keep port 8265 private and use `ray dashboard CLUSTER.yaml`, an
# SSH tunnel). Ray 2.60's runtime env agent logs each runtime env at INFO; the cluster YAMLs
# start Ray with RAY_LOGGER_LEVEL=warning, so no log file gets it (tested on a local cluster),
# except one case: when the job's runtime env fails to set up on a node, the agent logs it with
# the error in /tmp/ray/session_*/logs/runtime_env_agent.log on that node. Where the key must
# touch no disk even then, give it to the nodes' environment instead (KubeRay Secret, see
# launch/kuberay-rayjob.yaml) and unset WANDB_API_KEY here. A cluster started without
# RAY_LOGGER_LEVEL=warning writes the key to that log on every submission.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

name="" root="/shared" address="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
wait_flag=() dry_run=0 verbose_flag=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name=${2:?--name needs a value}; shift 2 ;;
    --root) root=${2:?--root needs a value}; shift 2 ;;
    --address) address=${2:?--address needs a value}; shift 2 ;;
    --no-wait) wait_flag=(--no-wait); shift ;;
    --dry-run) dry_run=1; shift ;;
    --verbose) verbose_flag=(--verbose); shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    -*) echo "error: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { echo "error: CONFIG is missing" >&2; usage; }
config=$1
shift

if [[ ! "$name" =~ ^[a-z0-9][a-z0-9._-]{0,62}$ ]]; then
  echo "error: --name '$name' must be 1-63 characters of a-z 0-9 . _ - (it names the run dir" \
    "and the job ids); reuse the same name to resume a run" >&2
  exit 2
fi
if [ ! -f "$config" ]; then
  echo "error: config $config does not exist (see configs/*.yaml)" >&2
  exit 2
fi
case "$root" in
  /*) ;;
  *) echo "error: --root '$root' must be an absolute path that every node mounts" >&2; exit 2 ;;
esac
for kv in "$@"; do
  case "$kv" in
    *=*) ;;
    *) echo "error: override '$kv' must look like key=value (e.g. optim.lr=0.1)" >&2; exit 2 ;;
  esac
done

run_dir="$root/runs/$name"
submission_id="$name-$(date -u +%Y%m%d-%H%M%S)"
config_file=$(basename "$config")
# Upload only the config: a throwaway dir holding a copy of it (no secrets in it).
stage=$(mktemp -d "${TMPDIR:-/tmp}/selfclust-submit.XXXXXX")
trap 'rm -rf "$stage"' EXIT
cp "$config" "$stage/$config_file"

# The runtime env as JSON (valid YAML) on stdout; the key is read from this process's
# environment by python, never expanded into an argument list.
runtime_env() {
  python3 - "$stage" <<'PY'
import json, os, sys
env = {"working_dir": sys.argv[1], "env_vars": {}}
for name in ("WANDB_API_KEY", "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "NCCL_DEBUG"):
    if os.environ.get(name):
        env["env_vars"][name] = os.environ[name]
print(json.dumps(env))
PY
}

cmd=(ray job submit --address "$address" --submission-id "$submission_id"
  --metadata-json "{\"selfclust_run\": \"$name\"}" ${wait_flag[@]+"${wait_flag[@]}"})
entry=(selfclust train "$config_file" --run-dir "$run_dir" ${verbose_flag[@]+"${verbose_flag[@]}"}
  ray.address=auto "$@")

if [ "$dry_run" = 1 ]; then
  printf 'run dir:      %s\n' "$run_dir"
  printf 'job id:       %s\n' "$submission_id"
  printf 'working dir:  %s (a copy of %s, uploaded)\n' "$stage" "$config"
  printf 'W&B key:      %s\n' "$([ -n "${WANDB_API_KEY:-}" ] && echo 'passed via runtime env' || echo 'not set')"
  for var in NCCL_SOCKET_IFNAME GLOO_SOCKET_IFNAME NCCL_DEBUG; do
    [ -z "${!var:-}" ] || printf '%s: %s (runtime env)\n' "$var" "${!var}"
  done
  printf 'command:      %s --runtime-env <pipe> -- %s\n' "${cmd[*]}" "${entry[*]}"
  exit 0
fi

echo "selfclust run '$name' -> $run_dir (job $submission_id)" >&2
"${cmd[@]}" --runtime-env <(runtime_env) -- "${entry[@]}"
