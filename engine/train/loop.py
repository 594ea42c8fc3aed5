"""The training loop: batch -> forward/backward -> step -> schedule -> log -> eval -> save.

`train(recipe)` is what `engine train` runs, in one process or under torchrun.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.checkpoint import save_checkpoint
from engine.config.recipe import Recipe
from engine.distributed import destroy_parallel_state, init_distributed, parallel_sizes
from engine.train.flops import flops_per_token
from engine.train.freeze import freeze_hook
from engine.train.lr_record import advance_record
from engine.train.metrics import Metrics, TrainRecord
from engine.train.schedule import end_step, lr_at, wsd_decay_start
from engine.train.session import Session, build_session, checkpoint_layout
from engine.train.signals import StopRequest, write_resume_file
from engine.train.spike import Spike, SpikeWatch, rewind
from engine.train.stage import TokenCounts, decay_file_appeared, stage_start_text
from engine.train.step import NonFiniteError, eval_loss, train_step

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss of each step this process ran (1-based: step n is after n updates)."""
    grad_norms: dict[int, float | None] = field(default_factory=dict)
    valid: dict[int, dict[str, float]] = field(default_factory=dict)
    """Validation losses per named set, by step."""
    tasks: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)
    """Task probe figures ({task: {acc, acc_norm}}) by step (eval.tasks)."""
    drift: dict[int, dict[str, float]] = field(default_factory=dict)
    """Weight drift scalars by evaluated step (logging.drift, engine.train.drift)."""
    skipped: list[int] = field(default_factory=list)
    """Steps whose update was skipped (train.on_nonfinite=skip)."""
    spikes: list[int] = field(default_factory=list)
    """Steps whose loss spiked (train.spike), rewound ones included."""
    spike: Spike | None = None
    """The spike this run stopped at to rewind (train.spike.action=rewind), else None."""
    moe: dict = field(default_factory=dict)
    """MoE reports (engine.train.moe_metrics.MoEReport) by log step."""
    final_step: int = 0
    checkpoint: Path | None = None
    """The last checkpoint saved by this run."""
    stopped: str | None = None
    """Why the run stopped before train.steps on request (engine.train.signals), else None."""
    layout: dict = field(default_factory=dict)
    """The layout that ran, read from megatron's parallel state (engine.distributed)."""


def _evaluate(session: Session) -> dict[str, float]:
    recipe, layout = session.recipe, session.runtime.layout
    losses = {}
    for name, dataset in session.valid_data.items():
        batches = [
            session.plan.microbatches(dataset, k * layout.global_batch_size)
            for k in range(recipe.train.eval_steps)
        ]
        losses[name] = eval_loss(
            session.chunks,
            batches,
            seq_length=recipe.data.seq_length,
            micro_batch_size=layout.micro_batch_size,
        )
    return losses


def _evaluates(session: Session) -> bool:
    return bool(session.valid_data) or session.probes is not None


def _evaluate_step(session: Session, metrics: Metrics, result: TrainResult, step: int) -> None:
    """The validation losses and the task probes of `step`, recorded and logged."""
    if session.valid_data:
        result.valid[step] = _evaluate(session)
        metrics.valid(step, result.valid[step])
    if session.probes is not None:
        result.tasks[step] = session.probes.evaluate()
        metrics.tasks(step, result.tasks[step])
    if session.drift is not None:
        result.drift[step] = session.drift.measure()
        metrics.scalars(step, result.drift[step])


def _save(session: Session, result: TrainResult) -> None:
    recipe = session.recipe
    result.checkpoint = save_checkpoint(
        recipe.checkpoint.save,
        session.chunks,
        session.optimizer,
        session.state,
        layout=checkpoint_layout(recipe, session.padded_vocab_size),
        recipe=recipe,
        keep_last=recipe.checkpoint.keep_last,
        extra=_extra_state(session),
    )
    log.info("saved checkpoint %s", result.checkpoint)


def _extra_state(session: Session):
    """save_checkpoint's `extra`: MER's anchor and drift's W_0, when on."""
    parts = [p for p in (session.mer, session.drift) if p is not None]
    if not parts:
        return None
    return lambda model: {k: v for p in parts for k, v in p.sharded_state_dict(model).items()}


def _after_update(session: Session, lr: float) -> None:
    """After each update's counts: its LR into the stage's record (engine.train.lr_record),
    then MER's Reptile step when due."""
    session.state = replace(session.state,
                            lr_record=advance_record(session.state.lr_record, lr))
    if session.mer is not None:
        session.mer.after_step(session.state.step)


def _record(session: Session, step: int, lr: float, grad_norm, losses: list[float],
            times: list[float], flops_per_step: float) -> TrainRecord:
    """The log line for an interval: mean loss, throughput from the steps' own time."""
    layout, recipe = session.runtime.layout, session.recipe
    per_step = sum(times) / len(times)
    end = _end(session)
    return TrainRecord(
        step=step, steps=end, loss=sum(losses) / len(losses), lr=lr,
        grad_norm=grad_norm,
        tokens_per_s=layout.global_batch_size * recipe.data.seq_length / per_step,
        tflops_per_device=flops_per_step / per_step / layout.world_size / 1e12,
        eta_s=per_step * (end - step))


def _due(step: int, interval: int | None) -> bool:
    return bool(interval) and step % interval == 0


def _end(session: Session) -> int:
    """train.steps, or earlier where a wsd decay started on demand ends."""
    train = session.recipe.train
    return end_step(train.schedule, train.steps, session.state.decay_file_step)


def _eval_due(step: int, train, last: bool) -> bool:
    """eval_interval, plus eval_interval_early during the stage's first eval_early_steps."""
    early = train.eval_interval_early is not None and step <= train.eval_early_steps and \
        step % train.eval_interval_early == 0
    return early or _due(step, train.eval_interval) or \
        (last and bool(train.eval_interval or train.eval_interval_early))


def _start_decay_on_demand(session: Session) -> None:
    """wsd with train.schedule.decay_file: the decay starts at this step once the file exists."""
    s, state, steps = session.recipe.train.schedule, session.state, session.recipe.train.steps
    if s.style != "wsd" or not s.decay_file or state.decay_file_step is not None or \
            state.step >= wsd_decay_start(s, steps):
        return
    if decay_file_appeared(s.decay_file, session.runtime.device):
        session.state = replace(state, decay_file_step=state.step)
        start = wsd_decay_start(s, steps, state.step)
        # at step 0 the file is more likely left over from an earlier stage than touched now
        (log.warning if state.step == 0 else log.info)(
            "%s exists at step %d: the wsd decay runs from step %d to step %d (train.schedule."
            "decay_file)", s.decay_file, state.step, start, _end(session))


def _add(counts: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    return {**counts, **{k: counts.get(k, 0) + v for k, v in more.items()}}


def _advance(session: Session, loss_tokens: int) -> dict[str, int]:
    """Count the step just taken into the state; returns the tokens it read per source."""
    state, batch = session.state, session.runtime.layout.global_batch_size
    samples = session.train_data.source_samples(state.consumed_samples, batch)
    read = {name: n * session.recipe.data.seq_length for name, n in samples.items()}
    session.state = replace(
        state, step=state.step + 1, consumed_samples=state.consumed_samples + batch,
        consumed_tokens=state.consumed_tokens + loss_tokens,
        source_tokens=_add(state.source_tokens, read))
    return read


def _token_counts(session: Session, step: int, interval: dict[str, int]) -> TokenCounts:
    state = session.state
    return TokenCounts(step=step, interval=interval, stage=state.source_tokens,
                       earlier=sum(s["tokens"] for s in state.earlier_stages))


def _start_stage(session: Session, metrics: Metrics, result: TrainResult) -> None:
    """Step 0 of a stage: the boundary marker, and with eval_interval_early the evaluation of the
    starting weights (the baseline of the stability gap)."""
    state = session.state
    metrics.stage(0, stage_start_text(state, session.initialized_from),
                  index=len(state.earlier_stages),
                  show=bool(state.stage or session.initialized_from))
    metrics.token_totals(_token_counts(session, 0, {}))
    if _evaluates(session) and session.recipe.train.eval_interval_early:
        _evaluate_step(session, metrics, result, 0)


def _count_skip(session: Session, metrics: Metrics, result: TrainResult, out, in_a_row: int
                ) -> int:
    """A skipped update (train.on_nonfinite=skip, or fp16 overflow): logged, counted, and the run
    stopped after train.max_skips in a row. Returns the new count in a row."""
    if not out.skipped:
        return 0
    step, train = session.state.step + 1, session.recipe.train
    result.skipped.append(step)
    log.warning("step %d: update skipped (loss %s, grad_norm %s; %d in a row)", step, out.loss,
                out.grad_norm, in_a_row + 1)
    metrics.scalars(step, {"train/skipped_steps": len(result.skipped)})
    if in_a_row + 1 >= train.max_skips:
        raise NonFiniteError(f"{in_a_row + 1} steps in a row skipped for NaN/Inf (loss "
                             f"{out.loss}, grad_norm {out.grad_norm}): stopping at "
                             f"train.max_skips={train.max_skips}")
    return in_a_row + 1


def _spike_watch(session: Session, result: TrainResult) -> SpikeWatch | None:
    """train.spike's window, holding the losses of the steps up to the session's (those of an
    earlier run of this process: after a rewind, the steps before it)."""
    config = session.recipe.train.spike
    if config is None:
        return None
    done = session.state.step
    history = [loss for step, loss in sorted(result.losses.items())
               if step <= done and step not in result.spikes]
    return SpikeWatch(config, history)


def _check_spike(session: Session, metrics: Metrics, result: TrainResult, watch, out) -> bool:
    """Judge the step just taken; True when the run must stop and rewind."""
    step = session.state.step
    spike = watch.check(step, out.loss) if watch is not None and not out.skipped else None
    if spike is None:
        return False
    result.spikes.append(step)
    if session.recipe.train.spike.action == "rewind":
        result.spike = spike
        return True
    log.warning("loss spike at step %d: %.4f > %g x median %.4f of the last %d steps", step,
                spike.loss, session.recipe.train.spike.factor, spike.median,
                session.recipe.train.spike.window)
    metrics.scalars(step, {"train/spikes": len(result.spikes)})
    return False


def _forget_after(result: TrainResult, step: int) -> None:
    """Drop what `result` holds of the steps after `step` (rewound: they run again)."""
    for figures in (result.losses, result.grad_norms, result.valid, result.tasks, result.drift,
                    result.moe):
        for later in [s for s in figures if s > step]:
            del figures[later]


def run(session: Session, stop_request: StopRequest | None = None,
        result: TrainResult | None = None) -> TrainResult:
    """Train `session` to its end (or a stop request, or a spike to rewind at); `result`: that
    of an earlier run of this process to continue (after a rewind)."""
    recipe, layout = session.recipe, session.runtime.layout
    train, ck, seq = recipe.train, recipe.checkpoint, recipe.data.seq_length
    # A resumed run's first step is state.step + 1: TensorBoard drops events at and beyond the
    # purge step, and the checkpoint's own step was logged by the run that saved it. A stage
    # starting at step 0 purges from 0: what a killed earlier attempt logged before its first
    # checkpoint is not this run's (found by tests/chaos.py: steps 1-2 logged twice).
    metrics = Metrics(recipe.logging.tensorboard_dir, enabled=session.runtime.is_main,
                      purge_step=session.state.step + 1 if session.state.step else 0)
    flops_per_step = flops_per_token(recipe.model, session.padded_vocab_size, seq) * \
        layout.global_batch_size * seq
    if result is None:
        result = TrainResult(final_step=session.state.step, layout=parallel_sizes())
    result.spike, result.final_step = None, session.state.step
    watch = _spike_watch(session, result)
    saved_step = session.state.step if session.resumed_from else None
    if session.state.step == 0:
        _start_stage(session, metrics, result)
    losses, times, tokens, skips = [], [], {}, 0
    while session.state.step < _end(session):
        _start_decay_on_demand(session)
        state = session.state
        microbatches = session.plan.microbatches(session.train_data, state.consumed_samples)
        lr = lr_at(state.step, train.schedule, peak_lr=recipe.optim.lr, total_steps=train.steps,
                   decay_file_step=state.decay_file_step)
        if session.drift is not None:  # keep W_{t-1} for an evaluation after this step
            session.drift.watch(_evaluates(session) and
                                _eval_due(state.step + 1, train, state.step + 1 == _end(session)))
        start = time.perf_counter()
        out = train_step(session.chunks, session.optimizer, microbatches, lr=lr, seq_length=seq,
                         micro_batch_size=layout.micro_batch_size,
                         before_update=freeze_hook(recipe, session.chunks, session.optimizer,
                                                   state.step, lr),
                         on_nonfinite=train.on_nonfinite)
        times.append(time.perf_counter() - start)
        skips = _count_skip(session, metrics, result, out, skips)
        read = _advance(session, out.tokens)
        _after_update(session, lr)
        step = session.state.step
        result.losses[step], result.grad_norms[step] = out.loss, out.grad_norm
        result.final_step = step
        if _check_spike(session, metrics, result, watch, out):
            break  # before its logs and saves: the rewound run logs from the checkpoint's step
        losses.append(out.loss)
        tokens = _add(tokens, read)

        last = step == _end(session)
        if _due(step, recipe.logging.log_interval) or last:
            metrics.train(_record(session, step, lr, out.grad_norm, losses, times,
                                  flops_per_step))
            metrics.tokens(_token_counts(session, step, tokens))
            if session.state.rewinds:
                metrics.scalars(step, {"train/rewinds": len(session.state.rewinds)})
            if session.moe_monitor is not None:
                result.moe[step] = session.moe_monitor.report(
                    microbatches=layout.num_microbatches * len(times))
                metrics.moe(step, result.moe[step])
            losses, times, tokens = [], [], {}
        else:  # every step's LR for the loss-law analyses (~0.1 ms, ~50 bytes per event)
            metrics.scalars(step, {"train/lr": lr})
        if _evaluates(session) and _eval_due(step, train, last):
            _evaluate_step(session, metrics, result, step)
            metrics.token_totals(_token_counts(session, step, {}))
        stop = _due(step, train.exit_interval)
        requested = not last and stop_request is not None and \
            stop_request.agreed(session.runtime.device)  # all ranks stop after the same step
        if ck.save and (stop or requested or last or _due(step, ck.save_interval)):
            _save(session, result)
            saved_step = step
        if stop:
            log.info("stopping at step %d (train.exit_interval=%d)", step, train.exit_interval)
            break
        if requested:
            result.stopped = stop_request.reason() or "requested on another rank"
            log.info("stopping at step %d: %s%s", step, result.stopped,
                     "" if ck.save else " (checkpoint.save is null: nothing to resume from)")
            break
    if ck.save and saved_step != session.state.step and result.spike is None:
        # e.g. train.steps=0: the initial weights
        _save(session, result)
    metrics.close()
    if session.moe_monitor is not None:
        session.moe_monitor.close()
    return result


def train(recipe: Recipe) -> TrainResult:
    """Run `recipe` in this process (one rank of the torchrun world, or a world of one).

    SIGUSR1/SIGTERM or ENGINE_STOP_FILE stop it after the current step with a checkpoint
    (engine.train.signals); it then returns normally, `result.stopped` saying why."""
    runtime = init_distributed(recipe)
    try:
        with StopRequest.from_env().watching() as stop_request:
            session = build_session(recipe, runtime)
            if session.resumed_from:
                log.info("resumed from %s at step %d", session.resumed_from, session.state.step)
            elif session.initialized_from:
                log.info("initialized weights from %s", session.initialized_from)
            result = run(session, stop_request)
            while result.spike is not None:  # train.spike.action=rewind
                session = rewind(session, result.spike, build_session)
                _forget_after(result, session.state.step)
                result = run(session, stop_request, result)
        if result.stopped and result.checkpoint is not None and runtime.is_main:
            write_resume_file(result.final_step, result.checkpoint)
        return result
    finally:
        destroy_parallel_state()
