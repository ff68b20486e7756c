#!/usr/bin/env bash
# Run one pipeline step on a GPU node: training steps and generation under `accelerate launch` (settings from
# `accelerate config`, or the file in $ACCELERATE_CONFIG_FILE; with CUDA_VISIBLE_DEVICES set, one process per
# visible GPU), the others with plain python.
#
#   steps/run_step.sh step3_lora configs/experiments/exp_b_dora_8bit.yaml data.root=/data/NEU-DET
#   CUDA_VISIBLE_DEVICES=0,1 steps/run_step.sh step4_generate configs/experiments/baseline.yaml data.root=/data/NEU-DET
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 STEP CONFIG [key=value ...]   (steps: $(neu-det list-steps | cut -d' ' -f1 | tr '\n' ' '))" >&2
  exit 2
fi
step=$1; config=$2; shift 2
launcher=$(neu-det list-steps | awk -v s="$step" '$1 == s {print $2}')
case "$launcher" in
  accelerate)
    launch=(accelerate launch)
    if [ -n "${ACCELERATE_CONFIG_FILE:-}" ]; then
      launch+=(--config_file "$ACCELERATE_CONFIG_FILE")
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
      gpus=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
      launch+=(--num_processes "$gpus")
      [ "$gpus" -gt 1 ] && launch+=(--multi_gpu)
    fi
    exec "${launch[@]}" -m "neu_det_pipeline.$step" --config "$config" "$@" ;;
  python) exec python -m "neu_det_pipeline.$step" --config "$config" "$@" ;;
  *) echo "error: unknown step '$step'; run \`neu-det list-steps\` for the list" >&2; exit 2 ;;
esac
