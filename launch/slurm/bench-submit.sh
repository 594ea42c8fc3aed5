#!/usr/bin/env bash
# Submit a benchmark: a job array over LAYOUTS.txt (bench.sbatch, one layout a task) and, after
# it, the collector that merges the rows into one table (collect.sbatch). sbatch options before
# `--` go to both jobs.
#
#   launch/slurm/bench-submit.sh [sbatch options --] LAYOUTS.txt RECIPE.yaml [key=value ...]
#   launch/slurm/bench-submit.sh -p gpu -A proj -- launch/slurm/layouts.txt configs/x.yaml
#   launch/slurm/bench-submit.sh --dry-run ...          # print the two sbatch commands
#
# Prints the output directory (ENGINE_BENCH_OUT, default runs/bench/<date-time>) and the job ids.
set -euo pipefail
ENGINE_SCRIPT=bench-submit.sh
ENGINE_ROOT="${ENGINE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
export ENGINE_ROOT  # the jobs inherit it, wherever this is run from
# shellcheck source=launch/slurm/lib.sh
source "$ENGINE_ROOT/launch/slurm/lib.sh"

if [[ "${1:-}" == --dry-run ]]; then
  export ENGINE_DRY_RUN=1
  shift
fi
sbatch_opts=()
if [[ " $* " == *" -- "* ]]; then
  while [[ "$1" != -- ]]; do
    sbatch_opts+=("$1")
    shift
  done
  shift
fi
if [[ $# -lt 2 ]]; then
  engine_die "usage: bench-submit.sh [--dry-run] [sbatch options --] LAYOUTS.txt RECIPE.yaml" \
    "[key=value ...]"
fi
layouts_file="$1"
[[ -f "$layouts_file" ]] || engine_die "$layouts_file: no such layouts file"
count="$(grep -Evc '^[[:space:]]*(#|$)' "$layouts_file" || true)"
((count > 0)) || engine_die "$layouts_file: no layouts in it"

out="${ENGINE_BENCH_OUT:-runs/bench/$(date +%Y%m%d-%H%M%S)}"
[[ "$out" == /* ]] || out="$PWD/$out"
export ENGINE_BENCH_OUT="$out"  # sbatch passes the environment on: both jobs use this directory
array=(sbatch --parsable --array="0-$((count - 1))" "${sbatch_opts[@]}"
  "$ENGINE_ROOT/launch/slurm/bench.sbatch" "$@")
collect=(sbatch --parsable "${sbatch_opts[@]}" "$ENGINE_ROOT/launch/slurm/collect.sbatch" "$out"
  "$layouts_file")
if engine_dry_run; then
  unset ENGINE_DRY_RUN  # the jobs themselves are not dry runs
  printf '# %s dry run\n' "$ENGINE_SCRIPT"
  engine_print_cmd "${array[@]}"
  engine_print_cmd "${collect[0]}" "${collect[1]}" "--dependency=afterany:<array job id>" \
    "${collect[@]:2}"
  exit 0
fi
array_id="$("${array[@]}")"
array_id="${array_id%%;*}"  # --parsable prints "id" or "id;cluster"
collect_id="$("${collect[0]}" "${collect[1]}" --dependency="afterany:$array_id" "${collect[@]:2}")"
collect_id="${collect_id%%;*}"
engine_note "array job $array_id ($count layouts), collector job $collect_id; table: $out/table.csv"
