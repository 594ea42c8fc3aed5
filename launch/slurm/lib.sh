# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, never run): the repository's Python, the number
# of processes per node, dry runs, and one-line errors.

# The Python that runs the engine: ENGINE_PYTHON, else the repository's .venv, else python3.
engine_python() {
  if [[ -n "${ENGINE_PYTHON:-}" ]]; then
    printf '%s\n' "$ENGINE_PYTHON"
  elif [[ -x "$ENGINE_ROOT/.venv/bin/python" ]]; then
    printf '%s\n' "$ENGINE_ROOT/.venv/bin/python"
  else
    printf '%s\n' python3
  fi
}

# Processes per node: ENGINE_NPROC_PER_NODE, else the GPUs Slurm gave this node, else the GPUs
# nvidia-smi lists, else $1 (the caller's CPU default).
engine_nproc_per_node() {
  local n=""
  if [[ -n "${ENGINE_NPROC_PER_NODE:-}" ]]; then
    n="$ENGINE_NPROC_PER_NODE"
  elif [[ -n "${SLURM_GPUS_ON_NODE:-}" && "${SLURM_GPUS_ON_NODE}" != 0 ]]; then
    n="$SLURM_GPUS_ON_NODE"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  fi
  if [[ -z "$n" || "$n" == 0 ]]; then
    n="$1"
  fi
  printf '%s\n' "$n"
}

# `engine_die MESSAGE`: one line on stderr, prefixed by the script's name, then exit 2.
engine_die() {
  printf '%s: error: %s\n' "$ENGINE_SCRIPT" "$*" >&2
  exit 2
}

# `engine_note MESSAGE`: a launcher line in the job's log, with the time as the engine's lines.
engine_note() {
  printf '%(%H:%M:%S)T %s: %s\n' -1 "$ENGINE_SCRIPT" "$*"
}

# The environment a dry run prints: what env.sh and the launcher set, and the Slurm job facts the
# commands were derived from.
ENGINE_ENV_PATTERN='^(CUDA_DEVICE_MAX_CONNECTIONS|NCCL_[A-Z_]*|GLOO_[A-Z_]*|TORCH_[A-Z_]*'
ENGINE_ENV_PATTERN+='|PET_[A-Z_]*|OMP_NUM_THREADS|PYTHON[A-Z_]*|ENGINE_[A-Z_]*'
ENGINE_ENV_PATTERN+='|SLURM_(JOB_ID|JOB_NODELIST|NNODES|RESTART_COUNT|ARRAY_JOB_ID|ARRAY_TASK_ID))='

# `engine_quote WORD`: WORD as the shell reads it back: bare when that is safe, else in quotes.
engine_quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:,=@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf '%s' "${1@Q}"
  fi
}

# `engine_print_env`: those variables as `export NAME=VALUE` lines, ready to paste.
engine_print_env() {
  local line
  while IFS= read -r line; do
    printf 'export %s=%s\n' "${line%%=*}" "$(engine_quote "${line#*=}")"
  done < <(env | grep -E "$ENGINE_ENV_PATTERN" | LC_ALL=C sort)
}

# `engine_print_cmd CMD...`: the command on one line, ready to paste.
engine_print_cmd() {
  local word sep=""
  for word in "$@"; do
    printf '%s%s' "$sep" "$(engine_quote "$word")"
    sep=" "
  done
  printf '\n'
}

# Whether this is a dry run: `--dry-run` as the first argument (removed by the caller) or
# ENGINE_DRY_RUN=1.
engine_dry_run() {
  [[ "${ENGINE_DRY_RUN:-0}" == 1 ]]
}

# `engine_show_dry_run CMD...`: print the environment and the command, for a dry run.
engine_show_dry_run() {
  printf '# %s dry run: environment\n' "$ENGINE_SCRIPT"
  engine_print_env
  printf '# command\n'
  engine_print_cmd "$@"
}

# `engine_check_gloo_address`: before a launch over several nodes. Unless GLOO_SOCKET_IFNAME names
# an interface, gloo (megatron-core's CPU process groups on every run, all collectives of a CPU
# run) listens on the first address this node's hostname resolves to, and tells the other nodes
# to connect there; where that is loopback (Debian's /etc/hosts maps the hostname to 127.0.1.1)
# they cannot, and the job fails after its start-up with gloo's "Connection refused" in a
# traceback (measured: tests/slurm/two_nodes). Say it first, in one line.
engine_check_gloo_address() {
  [[ -z "${GLOO_SOCKET_IFNAME:-}" ]] || return 0
  local host addr
  host="$(hostname)"
  addr="$(getent ahosts "$host" | awk 'NR == 1 {print $1}' || true)"
  if [[ -z "$addr" || "$addr" == 127.* || "$addr" == ::1 ]]; then
    engine_die "this node's name $host resolves to ${addr:-nothing} (not an address the other" \
      "nodes reach): gloo would listen there; set GLOO_SOCKET_IFNAME to the interface the nodes" \
      "reach each other on (launch/slurm/env.sh)"
  fi
}
