"""The training loop: batch -> forward/backward -> step -> schedule -> log -> eval -> save.

`train(recipe)` is what `engine train` runs, in one process or under torchrun.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from engine.checkpoint import save_checkpoint
from engine.config.loader import recipe_to_dict
from engine.config.recipe import Recipe
from engine.train.distributed import destroy_parallel_state, init_distributed
from engine.train.flops import flops_per_token
from engine.train.metrics import Metrics, TrainRecord
from engine.train.schedule import lr_at
from engine.train.session import Session, build_session, checkpoint_layout
from engine.train.step import eval_loss, train_step

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss of each step this process ran (1-based: step n is after n updates)."""
    grad_norms: dict[int, float | None] = field(default_factory=dict)
    valid: dict[int, dict[str, float]] = field(default_factory=dict)
    """Validation losses per named set, by step."""
    final_step: int = 0
    checkpoint: Path | None = None
    """The last checkpoint saved by this run."""


def _recipe_yaml(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


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


def _save(session: Session, result: TrainResult) -> None:
    recipe = session.recipe
    result.checkpoint = save_checkpoint(
        recipe.checkpoint.save,
        session.chunks,
        session.optimizer,
        session.state,
        layout=checkpoint_layout(recipe, session.vocab_size),
        recipe_yaml=_recipe_yaml(recipe),
        keep_last=recipe.checkpoint.keep_last,
    )
    log.info("saved checkpoint %s", result.checkpoint)


def _record(session: Session, step: int, lr: float, grad_norm, losses: list[float],
            times: list[float], flops_per_step: float) -> TrainRecord:
    """The log line for an interval: mean loss, throughput from the steps' own time."""
    layout, recipe = session.runtime.layout, session.recipe
    per_step = sum(times) / len(times)
    return TrainRecord(
        step=step, steps=recipe.train.steps, loss=sum(losses) / len(losses), lr=lr,
        grad_norm=grad_norm,
        tokens_per_s=layout.global_batch_size * recipe.data.seq_length / per_step,
        tflops_per_device=flops_per_step / per_step / layout.world_size / 1e12,
        eta_s=per_step * (recipe.train.steps - step))


def _due(step: int, interval: int | None) -> bool:
    return bool(interval) and step % interval == 0


def run(session: Session) -> TrainResult:
    recipe, layout = session.recipe, session.runtime.layout
    train, ck, seq = recipe.train, recipe.checkpoint, recipe.data.seq_length
    metrics = Metrics(recipe.logging.tensorboard_dir, enabled=session.runtime.is_main,
                      purge_step=session.state.step or None)
    flops_per_step = flops_per_token(recipe.model, session.vocab_size, seq) * \
        layout.global_batch_size * seq
    result = TrainResult(final_step=session.state.step)
    saved_step = session.state.step if session.resumed_from else None
    losses, times = [], []
    while session.state.step < train.steps:
        state = session.state
        microbatches = session.plan.microbatches(session.train_data, state.consumed_samples)
        lr = lr_at(state.step, train.schedule, peak_lr=recipe.optim.lr, total_steps=train.steps)
        start = time.perf_counter()
        out = train_step(session.chunks, session.optimizer, microbatches, lr=lr, seq_length=seq,
                         micro_batch_size=layout.micro_batch_size)
        times.append(time.perf_counter() - start)
        step = state.step + 1
        session.state = replace(
            state, step=step,
            consumed_samples=state.consumed_samples + layout.global_batch_size,
            consumed_tokens=state.consumed_tokens + out.tokens)
        result.losses[step], result.grad_norms[step] = out.loss, out.grad_norm
        result.final_step = step
        losses.append(out.loss)

        last = step == train.steps
        if _due(step, recipe.logging.log_interval) or last:
            metrics.train(_record(session, step, lr, out.grad_norm, losses, times,
                                  flops_per_step))
            losses, times = [], []
        if session.valid_data and (_due(step, train.eval_interval) or
                                   (last and train.eval_interval)):
            result.valid[step] = _evaluate(session)
            metrics.valid(step, result.valid[step])
        stop = _due(step, train.exit_interval)
        if ck.save and (stop or last or _due(step, ck.save_interval)):
            _save(session, result)
            saved_step = step
        if stop:
            log.info("stopping at step %d (train.exit_interval=%d)", step, train.exit_interval)
            break
    if ck.save and saved_step != session.state.step:  # e.g. train.steps=0: the initial weights
        _save(session, result)
    metrics.close()
    return result


def train(recipe: Recipe) -> TrainResult:
    """Run `recipe` in this process (one rank of the torchrun world, or a world of one)."""
    runtime = init_distributed(recipe)
    try:
        session = build_session(recipe, runtime)
        if session.resumed_from:
            log.info("resumed from %s at step %d", session.resumed_from, session.state.step)
        elif session.initialized_from:
            log.info("initialized weights from %s", session.initialized_from)
        return run(session)
    finally:
        destroy_parallel_state()
