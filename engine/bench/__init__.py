"""Throughput benchmarks: tokens/s, step times, model TFLOP/s and MFU against the hardware limit.

`engine bench` (engine.bench.cli) drives it; `row` holds the row format and its files, `train`
times the engine, `baselines` the transformers and plain megatron-core loops, `compare`, `sweep`
and `kernels` are the other subcommands, `peak` the hardware limits.
"""
