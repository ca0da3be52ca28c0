#!/usr/bin/env bash
# Behaviour check for restructurings: the model_digest (sha256 of the final model) and scores of
# the quickstart and of short SeLa, DEC, DEPICT and DGG runs, through the real CLI and Ray, on
# the built-in MNIST test set. Run it on two commits and compare the lines: equal digests mean
# the same model, bit for bit.
#
#   benchmarks/digests.sh OUT_DIR                 # this checkout
#   git worktree add /tmp/old <commit> && PYTHONPATH=/tmp/old benchmarks/digests.sh OUT_OLD
#                                                 # (that checkout's code and configs)
#   SHORT_ONLY=1 benchmarks/digests.sh OUT_DIR    # without the ~7-minute quickstart
#
# The short runs use only keys that every selfclust since the config redesign accepts.
set -euo pipefail
out=${1:?usage: benchmarks/digests.sh OUT_DIR}
here=$(cd "$(dirname "$0")/.." && pwd)
root=${PYTHONPATH:-$here}  # the checkout whose code and configs run
py=${PYTHON:-$here/.venv/bin/python}
export WANDB_MODE=offline RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
mkdir -p "$out"
short=(data.train=mnist_test trainer.log_every=50 wandb.mode=disabled)
run() {  # name config overrides...
  local name=$1 config=$2
  shift 2
  rm -rf "${out:?}/$name"
  "$py" -m selfclust train "$root/configs/$config" --run-dir "$out/$name" "$@" >"$out/$name.log" 2>&1
  "$py" - "$out/$name/summary.json" "$name" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:14s} {s['model_digest']}  acc {s['acc']:.4f} nmi {s['nmi']:.4f}")
EOF
}
if [ -z "${SHORT_ONLY:-}" ]; then
  run quickstart quickstart.yaml
fi
run sela_short quickstart.yaml "${short[@]}" optim.epochs=2 method.relabels=2 method.init=kmeans
run dec_short dec_mnist_test.yaml "${short[@]}" method.pretrain_epochs=2 optim.epochs=2 \
  method.relabels=2 method.cluster_init=kmeans method.kmeans_restarts=2
run depict_short depict_mnist_test.yaml "${short[@]}" method.pretrain_epochs=1 optim.epochs=2 \
  method.relabels=2 method.manifold_relabels=1 method.manifold_init_candidates=1 \
  method.conv_channels=[16,16]
run dgg_short dgg_mnist_test.yaml "${short[@]}" method.pretrain_epochs=2 optim.epochs=2 \
  method.relabels=2 method.cluster_init=kmeans method.kmeans_restarts=2 method.hidden=[64,64]
