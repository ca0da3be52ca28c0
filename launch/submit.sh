#!/usr/bin/env bash
# Submit a selfclust training run to a running Ray cluster with `ray job submit`.
#   launch/submit.sh RAY_ADDRESS CONFIG RUN_DIR [key=value ...]
# RUN_DIR must be on storage every node sees (NFS, or set ray.storage_path to s3://... ):
# rerunning the same command with the same RUN_DIR resumes the run.
# WANDB_API_KEY, when set, is passed through the job's runtime environment only; it is never
# written to a file, a config or a log by this script or by selfclust.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 RAY_ADDRESS CONFIG RUN_DIR [key=value ...]" >&2
  exit 2
fi
address=$1 config=$2 run_dir=$3
shift 3
env_json='{}'
if [ -n "${WANDB_API_KEY:-}" ]; then
  env_json=$(python3 -c 'import json,os; print(json.dumps({"env_vars": {"WANDB_API_KEY": os.environ["WANDB_API_KEY"]}}))')
fi
exec ray job submit --address "$address" --runtime-env-json "$env_json" -- \
  selfclust train "$config" --run-dir "$run_dir" ray.address=auto "$@"
