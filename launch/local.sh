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
#
# Several machines, no Slurm: run the same command on each, with ENGINE_NNODES (how many),
# ENGINE_NODE_RANK (this machine's index, 0..N-1) and ENGINE_MASTER_ADDR (machine 0's address as
# the others reach it), on the same ENGINE_MASTER_PORT (default 29500):
#   ENGINE_NNODES=2 ENGINE_NODE_RANK=0 ENGINE_MASTER_ADDR=host1 launch/local.sh R.yaml   # host1
#   ENGINE_NNODES=2 ENGINE_NODE_RANK=1 ENGINE_MASTER_ADDR=host1 launch/local.sh R.yaml   # host2
# torchrun's static rendezvous (--nnodes, --node-rank, --rdzv-endpoint): node rank 0 hosts the
# c10d store on host1:29500 (whatever its hostname resolves to; the dynamic c10d backend decides
# that by name and waits for ever when the endpoint is an address the hostname does not resolve
# to) and runs ranks 0..nproc-1, node rank r the next nproc. The checkpoint and log directories
# must be one shared file system, and GLOO_SOCKET_IFNAME is needed where the hostname resolves to
# loopback (launch/slurm/env.sh). Each machine starts when it likes: the rendezvous waits 600 s.
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
nnodes="${ENGINE_NNODES:-1}"
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || engine_die "ENGINE_NNODES=$nnodes: expected the number of" \
  "machines (a positive integer)"
if ((nnodes == 1)); then
  rendezvous=(--standalone)  # a rendezvous on this machine, on a free port
else
  rank="${ENGINE_NODE_RANK:-}"
  if [[ ! "$rank" =~ ^[0-9]+$ ]] || ((rank >= nnodes)); then
    engine_die "ENGINE_NODE_RANK=${rank}: expected this machine's index 0..$((nnodes - 1))" \
      "(ENGINE_NNODES=$nnodes; 0 hosts the rendezvous)"
  fi
  [[ -n "${ENGINE_MASTER_ADDR:-}" ]] || engine_die "ENGINE_NNODES=$nnodes needs" \
    "ENGINE_MASTER_ADDR: the address of the machine with ENGINE_NODE_RANK=0"
  rendezvous=(--nnodes="$nnodes" --node-rank="$rank" --rdzv-backend=static
    --rdzv-endpoint="$ENGINE_MASTER_ADDR:${ENGINE_MASTER_PORT:-29500}" --max-restarts=0)
fi
cmd=("$(engine_python)" -m torch.distributed.run "${rendezvous[@]}" --nproc-per-node="$nproc"
  -m engine train --config "$recipe" "$@")
if engine_dry_run; then
  engine_show_dry_run "${cmd[@]}"
  exit 0
fi
((nnodes == 1)) || engine_check_gloo_address
exec "${cmd[@]}"
