#!/usr/bin/env bash
# The A/B set on a GPU node: the four experiment configs in turn, then `neu-det compare` over their run folders,
# whose table (Step 5 quality and utility beside each experiment's cost) is the last thing printed.
# Every experiment shares one control-map cache, and starts from the finished steps of the earlier ones that it
# would redo identically (`neu-det reuse`: same config keys, inputs and upstream steps).
#
#   steps/run_ab.sh data.root=/data/NEU-DET
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
experiments=(baseline exp_a_blip2_unipc exp_b_dora_8bit exp_c_sdxl_all exp_d_defect_focus)
shared=(generation.control_cache_dir=outputs/control-maps)
runs=()
for name in "${experiments[@]}"; do
  config="$repo/configs/experiments/$name.yaml"
  out=$(neu-det show-config --config "$config" "$@" "${shared[@]}" --key run.output_dir)
  if [ ${#runs[@]} -gt 0 ]; then
    neu-det reuse --config "$config" "${runs[@]}" "$@" "${shared[@]}"
  fi
  "$here/run_all.sh" "$config" "$@" "${shared[@]}"
  runs+=("$out")
done
# Last, so its table (one row per experiment: quality, utility, cost) ends the output; it names compare.html.
neu-det compare "${runs[@]}" --out outputs/ab-compare
