#!/usr/bin/env bash
# Run every step in order on a GPU node (training steps and generation under `accelerate launch`, see
# run_step.sh), each step's output also in <run.output_dir>/logs/<step>.log. Stops at the first failing step
# with its log path. Every step skips work already done for the same config, so re-running continues.
#
#   steps/run_all.sh configs/experiments/baseline.yaml data.root=/data/NEU-DET
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [key=value ...]" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
config=$1
logs="$(neu-det show-config --config "$@" --key run.output_dir)/logs"
mkdir -p "$logs"
for step in $(neu-det list-steps --config "$@" | cut -d' ' -f1); do  # the steps this config has work in
  log="$logs/$step.log"
  echo "=== $step (log: $log)"
  if ! "$here/run_step.sh" "$step" "$@" 2>&1 | tee "$log"; then
    echo "error: $step failed; its output is in $log; fix the cause and re-run the same command to continue" >&2
    exit 1
  fi
done
echo "done: $(neu-det show-config --config "$@" --key run.output_dir)"
