#!/usr/bin/env bash
# The GPU check (issue "engine foundation"): on one GPU without network, run the tiny recipe and a
# Llama-3.2-1B shape with the local spec in bf16 for 50 steps; the console lines print tokens/s,
# TFLOP/s per device and the loss. megatron-core travels as wheels in .whl/ (see
# the device tool's notes); the tiny recipe needs data/demo/ (built by `make demo-data`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
common=(model.spec=local train.precision=bf16 train.steps=50 checkpoint.save=null
        checkpoint.save_interval=null checkpoint.keep_last=null logging.tensorboard_dir=null)
echo "== tiny recipe (1 GPU)"
python3 -m engine train --config configs/tiny-cpu.yaml "${common[@]}" parallel.tp=1 \
  parallel.sequence_parallel=false logging.log_interval=10
echo "== Llama-3.2-1B shape, synthetic tokens, seq 4096"
python3 -m engine train --config configs/llama3.2-1b.yaml "${common[@]}" logging.log_interval=5
echo "== CUDA kernels (issue: benchmarks and fused kernels): build for sm_90, each vs its reference"
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py -q build_ext --inplace
python3 -m engine bench kernels --device cuda --precision bf16
echo "== Llama-3.2-1B shape, bf16, seq 4096: the MFU row (target >= 50%)"
python3 -m engine bench train --config configs/llama3.2-1b.yaml --steps 20 --warmup 3 \
  model.spec=local train.precision=bf16
