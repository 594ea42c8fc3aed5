"""The training loop: batch -> forward/backward -> step -> schedule -> log -> maybe eval -> maybe save.

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
from engine.train.metrics import Metrics
from engine.train.schedule import lr_at
from engine.train.session import Session, build_session, checkpoint_layout
from engine.train.step import eval_loss, train_step

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)
    """Training loss of each step run by this process (step numbers are 1-based: after the update)."""
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
        batches = [session.plan.microbatches(dataset, k * layout.global_batch_size)
                   for k in range(recipe.train.eval_steps)]
        losses[name] = eval_loss(session.chunks, batches, seq_length=recipe.data.seq_length,
                                 micro_batch_size=layout.micro_batch_size)
    return losses


def _save(session: Session, result: TrainResult) -> None:
    recipe = session.recipe
    result.checkpoint = save_checkpoint(
        recipe.checkpoint.save, session.chunks, session.optimizer, session.state,
        layout=checkpoint_layout(recipe), recipe_yaml=_recipe_yaml(recipe),
        keep_last=recipe.checkpoint.keep_last)
    log.info("saved checkpoint %s", result.checkpoint)


def run(session: Session) -> TrainResult:
    recipe, layout = session.recipe, session.runtime.layout
    train, ck = recipe.train, recipe.checkpoint
    metrics = Metrics(recipe.logging.tensorboard_dir, enabled=session.runtime.is_main,
                      purge_step=session.state.step or None)
    seq = recipe.data.seq_length
    flops_per_step = flops_per_token(recipe.model, session.vocab_size, seq) * \
        layout.global_batch_size * seq
    result = TrainResult(final_step=session.state.step)
    interval_start, interval_losses = time.perf_counter(), []
    run_start, first_step = time.perf_counter(), session.state.step
    saved_step = session.state.step if session.resumed_from else None
    while session.state.step < train.steps:
        step = session.state.step
        microbatches = session.plan.microbatches(session.train_data, session.state.consumed_samples)
        lr = lr_at(step, train.schedule, peak_lr=recipe.optim.lr, total_steps=train.steps)
        out = train_step(session.chunks, session.optimizer, microbatches, lr=lr, seq_length=seq,
                         micro_batch_size=layout.micro_batch_size)
        session.state = replace(session.state, step=step + 1,
                                consumed_samples=session.state.consumed_samples + layout.global_batch_size,
                                consumed_tokens=session.state.consumed_tokens + out.tokens)
        step += 1
        result.losses[step], result.grad_norms[step], result.final_step = out.loss, out.grad_norm, step
        interval_losses.append(out.loss)

        if step % recipe.logging.log_interval == 0 or step == train.steps:
            elapsed = time.perf_counter() - interval_start
            n = len(interval_losses)
            per_step = elapsed / n
            metrics.train(
                step=step, steps=train.steps, loss=sum(interval_losses) / n, lr=lr,
                grad_norm=out.grad_norm, tokens_per_s=layout.global_batch_size * seq / per_step,
                tflops=flops_per_step / per_step / layout.world_size / 1e12,
                eta_s=(time.perf_counter() - run_start) / (step - first_step) * (train.steps - step))
            interval_start, interval_losses = time.perf_counter(), []
        if train.eval_interval and session.valid_data and \
                (step % train.eval_interval == 0 or step == train.steps):
            result.valid[step] = _evaluate(session)
            metrics.valid(step, result.valid[step])
        stop = bool(train.exit_interval) and step % train.exit_interval == 0
        if ck.save and (stop or step == train.steps or
                        (ck.save_interval and step % ck.save_interval == 0)):
            _save(session, result)
            saved_step = step
        if step % recipe.logging.log_interval == 0:  # eval and save time is not training time
            interval_start = time.perf_counter()
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
