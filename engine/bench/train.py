"""`engine bench train`: real training steps of a recipe, timed, as one `BenchRow`.

The engine itself runs through the same session and `train_step` as `engine train` (so every
parallel layout works, under torchrun too); the baselines of `engine bench compare` run the same
recipe's shape in `engine.bench.baselines`. All share `time_steps` (which times the batch apart
from the step: the data-wait share), `profile_step` (one more step under the profiler: the GEMM
share and rate) and `make_row`.

A bench run changes the recipe only where timing needs it (`bench_recipe`): steps = warm-up +
timed steps + the profiled one, a constant learning rate, no evaluation, no checkpoints,
synthetic tokens unless the recipe's data is asked for.
"""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.bench.peak import Peak, device_peak, model_gemm_shapes
from engine.bench.profile import GemmShape, StepProfile, profile_step
from engine.bench.row import BenchRow, model_name, throughput
from engine.config.recipe import (
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    Recipe,
    ScheduleConfig,
)
from engine.models.params import count_parameters
from engine.train.flops import flops_per_token


def bench_recipe(recipe: Recipe, *, steps: int, warmup: int, data: str = "synthetic") -> Recipe:
    """`recipe` made into a benchmark: data 'synthetic' (random tokens) or 'recipe' (its blend)."""
    r = recipe
    synthetic = data == "synthetic"
    tokenizer = r.tokenizer
    if synthetic and r.model.vocab_size is not None:
        tokenizer = dataclasses.replace(tokenizer, type="none", path=None)  # vocab is known
    return dataclasses.replace(
        r,
        data=dataclasses.replace(r.data, synthetic=synthetic, valid=()),
        tokenizer=tokenizer,
        # one step more than timed: the profiled step (engine.bench.profile) reads its batch too
        train=dataclasses.replace(r.train, steps=warmup + steps + 1, eval_interval=None,
                                  exit_interval=None, schedule=ScheduleConfig(style="constant")),
        checkpoint=CheckpointConfig(),
        eval=EvalConfig(),  # no task probes: a benchmark times training steps
        logging=LoggingConfig(log_interval=warmup + steps + 1, tensorboard_dir=None,
                              level=r.logging.level),
    )


@dataclass(frozen=True, slots=True)
class Timing:
    """The timed steps of a benchmark (after the warm-up steps)."""

    step_s: list[float]
    """Wall time of each step: its batch, forward/backward and optimizer step."""
    data_s: list[float]
    """The part of each step that made its batch."""
    losses: list[float]
    warmup: int
    """Untimed steps before them."""

    @property
    def data_wait_share(self) -> float:
        return sum(self.data_s) / sum(self.step_s)


def time_steps(batch: Callable[[int], object], step: Callable[[object], float], *, steps: int,
               warmup: int, progress: bool = True) -> Timing:
    """Run step(batch(i)) (step returning the loss) warmup + steps times."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times, data, losses = [], [], []
    for i in range(warmup + steps):
        sync()
        start = time.perf_counter()
        batches = batch(i)
        sync()
        fetched = time.perf_counter()
        loss = step(batches)
        sync()
        elapsed = time.perf_counter() - start
        if i >= warmup:
            times.append(elapsed)
            data.append(fetched - start)
            losses.append(loss)
        if progress:
            kind = "warm-up" if i < warmup else "step"
            print(f"  {kind} {i + 1}/{warmup + steps}: {elapsed:.3f} s, loss {loss:.4f}",
                  file=sys.stderr, flush=True)
    return Timing(times, data, losses, warmup)


def peak_memory_gib() -> tuple[float, str]:
    """This process's peak memory: CUDA max allocated, else the max resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "cpu process max RSS"


def device_label() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'s' if n != 1 else ''})"


@dataclass(frozen=True, slots=True)
class RunShape:
    """How a benchmarked system ran: its layout and batch."""

    layout: str
    devices: int
    global_batch: int
    micro_batch: int


def make_row(recipe: Recipe, *, system: str, padded_vocab_size: int, run: RunShape,
             timing: Timing, profile: StepProfile | None, peak: Peak,
             memory: tuple[float, str], kernels: str) -> BenchRow:
    m, seq, vocab = recipe.model, recipe.data.seq_length, padded_vocab_size
    params = count_parameters(m, vocab).total
    return BenchRow(
        system=system, model=model_name(m, vocab, params), layout=run.layout,
        devices=run.devices, device=device_label(),
        precision=recipe.train.fp8 and "fp8" or recipe.train.precision,
        global_batch=run.global_batch, micro_batch=run.micro_batch, seq_length=seq,
        steps=len(timing.step_s), warmup=timing.warmup,
        **throughput(timing.step_s, tokens_per_step=run.global_batch * seq, devices=run.devices,
                     flops_per_token=flops_per_token(m, vocab, seq),
                     flops_per_token_megatron=flops_per_token(m, vocab, seq,
                                                              convention="megatron"),
                     peak_tflops=peak.tflops),
        peak_source=peak.source, peak_memory_gib=memory[0], memory_kind=memory[1],
        loss_first=timing.losses[0], loss_last=timing.losses[-1], kernels=kernels,
        data_wait_share=timing.data_wait_share,
        gemm_time_share=profile.gemm_share if profile else None,
        gemm_tflops_per_device=profile.gemm_tflops if profile else None)


def _layout_name(layout, sequence_parallel: bool) -> str:
    parts = [f"tp{layout.tp}", f"pp{layout.pp}", f"dp{layout.dp}"]
    parts += [f"vpp{layout.vpp}"] if layout.vpp else []
    parts += [f"{k}{getattr(layout, k)}" for k in ("cp", "ep") if getattr(layout, k) > 1]
    return " ".join(parts + (["sp"] if sequence_parallel else []))


def kernels_label(recipe: Recipe, spec: str, device_type: str) -> str:
    from engine.kernels import ops

    if not recipe.model.fused_kernels or spec != "local":
        return "off"
    return "csrc" if ops.has_kernel("rms_norm_fwd", device_type) else "reference"


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64,
                     device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def _mean_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64,
                     device="cuda" if torch.cuda.is_available() else "cpu")
    torch.distributed.all_reduce(t)
    return float(t.item()) / torch.distributed.get_world_size()


def run_engine(recipe: Recipe, *, steps: int, warmup: int, peak: Peak | None = None,
               show_profile: bool = False) -> BenchRow:
    """Time `recipe` (already a `bench_recipe`) on this rank's part of the layout; every rank
    returns the same row. Peak: measured by every rank at once (CPU) and averaged, unless given."""
    from engine.distributed import destroy_parallel_state, init_distributed
    from engine.models.spec import resolve_spec
    from engine.train.session import build_session
    from engine.train.step import train_step

    runtime = init_distributed(recipe)
    try:
        session = build_session(recipe, runtime)
        layout, seq = runtime.layout, recipe.data.seq_length
        if peak is None:
            torch.distributed.barrier()
            shapes = model_gemm_shapes(recipe.model, layout.micro_batch_size * seq,
                                       session.padded_vocab_size)
            own = device_peak(recipe.train.fp8 and "fp8" or recipe.train.precision, shapes)
            tflops = _mean_over_ranks(own.tflops) if own.tflops is not None else None
            peak = Peak(tflops, own.source + (f", mean of {layout.world_size} processes"
                                              if layout.world_size > 1 else ""))

        def batch(i: int):
            return session.plan.microbatches(session.train_data, i * layout.global_batch_size)

        def step(batches) -> float:
            return train_step(session.chunks, session.optimizer, batches, lr=recipe.optim.lr,
                              seq_length=seq, micro_batch_size=layout.micro_batch_size).loss

        timing = time_steps(batch, step, steps=steps, warmup=warmup, progress=runtime.is_main)
        profile = profile_step(lambda: step(batch(warmup + steps)))
        if runtime.is_main and show_profile:
            print(profile.table(), file=sys.stderr)
        memory, kind = peak_memory_gib()
        spec = resolve_spec(recipe.model.spec, fp8=recipe.train.fp8)
        timing = dataclasses.replace(timing, step_s=[_max_over_ranks(t) for t in timing.step_s],
                                     data_s=[_max_over_ranks(t) for t in timing.data_s])
        profile = dataclasses.replace(  # the mean over ranks: every rank returns the same row
            profile, step_s=_mean_over_ranks(profile.step_s),
            gemms=[GemmShape("all", "", 0, _mean_over_ranks(profile.gemm_s),
                             _mean_over_ranks(profile.gemm_flops))])
        run = RunShape(layout=_layout_name(layout, recipe.parallel.sequence_parallel),
                       devices=layout.world_size, global_batch=layout.global_batch_size,
                       micro_batch=layout.micro_batch_size)
        return make_row(recipe, system="engine", padded_vocab_size=session.padded_vocab_size,
                        run=run, timing=timing, profile=profile, peak=peak,
                        memory=(_max_over_ranks(memory), kind),
                        kernels=kernels_label(recipe, spec, runtime.device.type))
    finally:
        destroy_parallel_state()
