#!/usr/bin/env bash
# Run one pipeline step on a GPU node: training steps under `accelerate launch` (all visible GPUs,
# settings from `accelerate config`), the others with plain python.
#
#   steps/run_step.sh step3_lora configs/experiments/exp_b_dora_8bit.yaml data.root=/data/NEU-DET
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 STEP CONFIG [key=value ...]   (steps: $(neu-det list-steps | cut -d' ' -f1 | tr '\n' ' '))" >&2
  exit 2
fi
step=$1; config=$2; shift 2
launcher=$(neu-det list-steps | awk -v s="$step" '$1 == s {print $2}')
case "$launcher" in
  accelerate) exec accelerate launch -m "neu_det_pipeline.$step" --config "$config" "$@" ;;
  python) exec python -m "neu_det_pipeline.$step" --config "$config" "$@" ;;
  *) echo "error: unknown step '$step'; run \`neu-det list-steps\` for the list" >&2; exit 2 ;;
esac
