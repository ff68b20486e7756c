#!/usr/bin/env bash
# Run every step in order on a GPU node (training steps under `accelerate launch`). Each step skips
# work that is already done for the same config, so re-running after an interruption continues.
#
#   steps/run_all.sh configs/experiments/baseline.yaml data.root=/data/NEU-DET
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [key=value ...]" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
for step in $(neu-det list-steps | cut -d' ' -f1); do
  "$here/run_step.sh" "$step" "$@"
done
