#!/usr/bin/env bash
# Train a recipe on this machine with torchrun, without Slurm: the same engine command as one node
# of launch/slurm/train.sbatch, with the same environment (launch/slurm/env.sh).
#
#   launch/local.sh configs/<recipe>.yaml [key=value ...]
#   ENGINE_NPROC_PER_NODE=4 launch/local.sh configs/<recipe>.yaml parallel.tp=2
#   launch/local.sh --dry-run configs/<recipe>.yaml       # print, run nothing (or ENGINE_DRY_RUN=1)
#
# Processes: ENGINE_NPROC_PER_NODE, else one per GPU, else 2 on a machine without GPUs (the CPU
# demo, configs/tiny-cpu.yaml, is tensor parallel 2). Ctrl-C or SIGTERM reaches torchrun, which
# forwards it to the workers: they finish the step in flight and save a checkpoint, and running
# the same command again resumes from it.
set -euo pipefail
ENGINE_SCRIPT=local.sh
ENGINE_ROOT="${ENGINE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export ENGINE_ROOT
# shellcheck source=launch/slurm/lib.sh
source "$ENGINE_ROOT/launch/slurm/lib.sh"
# shellcheck source=launch/slurm/env.sh
source "$ENGINE_ROOT/launch/slurm/env.sh"
export PYTHONPATH="$ENGINE_ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == --dry-run ]]; then
  export ENGINE_DRY_RUN=1
  shift
fi
if [[ $# -lt 1 ]]; then
  engine_die "usage: launch/local.sh [--dry-run] RECIPE.yaml [key=value ...]"
fi
recipe="$1"
shift

nproc="$(engine_nproc_per_node 2)"
# --standalone: a rendezvous on this machine, on a free port.
cmd=("$(engine_python)" -m torch.distributed.run --standalone --nproc-per-node="$nproc"
  -m engine train --config "$recipe" "$@")
if engine_dry_run; then
  engine_show_dry_run "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"
