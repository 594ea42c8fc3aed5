# shellcheck shell=bash
# Environment of every engine launch (the sbatch scripts and launch/local.sh). Sourced, never run.
# Edit it for your cluster: each line keeps a value already set in the submitting environment,
# so `NCCL_DEBUG=INFO sbatch ...` also works for one job.

# megatron-core: with tensor parallelism and communication overlap, the GPU must run kernels in
# the order they are queued (one hardware queue), or TP collectives and GEMMs overlap wrongly.
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"

# NCCL. A failed or hung collective raises (and ends the job) instead of hanging until the time
# limit; a site's network interface and InfiniBand adapters go here.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
# export NCCL_SOCKET_IFNAME=ib0          # the interface NCCL bootstraps over
# export NCCL_IB_HCA=mlx5                # the InfiniBand adapters to use
# export NCCL_NVLS_ENABLE=0              # NVLink SHARP off, where it misbehaves

# Several nodes: the interface the nodes reach each other on, for gloo (megatron-core's CPU
# process groups on every run, all of a CPU run). Without it gloo listens on the address the
# hostname resolves to; where that is loopback (Debian's /etc/hosts: 127.0.1.1) the other nodes
# cannot connect, and the launchers refuse to start a multi-node run. NCCL skips loopback itself.
# export GLOO_SOCKET_IFNAME=eth0         # a name (not a prefix, as NCCL's), or eth0,eth1

# Log lines reach the Slurm log as they are printed (a file is block-buffered otherwise).
export PYTHONUNBUFFERED=1

# When a stop signal reaches torchrun itself (SIGTERM at the time limit or a preemption, or
# `--signal=USR1@N` without `B:`), torchrun forwards it to the workers, which finish the step and
# save (engine/train/signals.py), and kills them this many seconds later: the step and the save
# must fit. The preferred route, `--signal=B:USR1@N`, only signals the batch shell (train.sbatch).
export PET_SIGNALS_TO_HANDLE="${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}"
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}"
