"""Adam's state of a whole model in one process: read from a training checkpoint, written beside
a grown model (Scale-Up's --carry-optimizer; Staged Training, Shen et al. 2022, arXiv
2203.06211, carries the optimizer state across growth).

`read_adam_state(ckpt)` -> `AdamState` (exp_avg and exp_avg_sq per parameter, in the model's
TP=1 megatron names, and Adam's step count) from a checkpoint saved by the regular optimizer at
any TP/PP/EP layout; `write_unsharded(out, model, adam=...)` (unsharded.py) saves one with the
model through the same megatron optimizer a training run builds (engine.models.optimizer), so a
stage with `checkpoint.pretrained_optim: true` loads it at any layout. The arithmetic that maps
the moments through a growth is engine.upcycle.moments; this module only moves them.

megatron-core keeps one step count for all parameters (optimizer.py
`_extract_common_per_param_step`), so the step is one number here too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from engine.checkpoint.errors import CheckpointError
from engine.checkpoint.io import holds_optimizer_state, load_checkpoint
from engine.checkpoint.layout import current_layout, read_saved_layout
from engine.config.recipe import ParallelConfig, Recipe

StateDict = dict[str, torch.Tensor]
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class AdamState:
    """Adam's state of a whole model (TP=PP=1 megatron names), fp32 like megatron's main
    parameters."""

    step: int
    """Adam's step count (its bias correction), shared by every parameter."""
    exp_avg: StateDict
    exp_avg_sq: StateDict


def _single_process_recipe(recipe: Recipe) -> Recipe:
    return replace(recipe, parallel=ParallelConfig(backend="gloo"))


@contextlib.contextmanager
def model_with_optimizer(recipe: Recipe, rows: int) -> Iterator[tuple]:
    """(model, DDP chunks, megatron optimizer) of `recipe` at TP=PP=1 in this process; the
    model's weights are not initialized."""
    from engine.checkpoint.unsharded import single_process
    from engine.models.optimizer import build_optimizer, wrap_ddp

    recipe = _single_process_recipe(recipe)
    with single_process(recipe, rows) as (model, tc):
        chunks = wrap_ddp(recipe, tc, [model])
        yield model, chunks, build_optimizer(recipe, tc, chunks)


def _main_and_state(optimizer) -> dict:
    """Model parameter -> (the tensor Adam updates for it, that tensor's torch optimizer)."""
    from engine.models.optimizer import main_pairs, megatron_optimizers

    return {p: (main, opt.optimizer) for opt in megatron_optimizers(optimizer)
            for p, main, _ in main_pairs(opt)}


def check_carriable(ckpt_arg: str | os.PathLike) -> None:
    """One line unless `ckpt_arg` holds Adam's state that read_adam_state can read: said before
    a growth starts, not after it."""
    from engine.checkpoint.unsharded import read_recipe

    _check_readable(*read_recipe(ckpt_arg))


def _check_readable(ckpt, recipe: Recipe) -> None:
    if recipe.optim.name != "adam":
        raise CheckpointError(f"{ckpt}: optim.name={recipe.optim.name}; carrying the optimizer "
                              "state maps Adam's moments (optim.name=adam)")
    if not holds_optimizer_state(ckpt):
        raise CheckpointError(f"{ckpt}: holds no optimizer state to carry (an import, an "
                              "upcycle, train.steps=0)")
    saved = read_saved_layout(ckpt)
    if saved is not None and saved.distributed_optimizer:
        raise CheckpointError(
            f"{ckpt}: optimizer state saved by the distributed optimizer "
            "(parallel.distributed_optimizer=true); carrying it is implemented for the regular "
            "optimizer's state only: train the source with distributed_optimizer=false")


def read_adam_state(ckpt_arg: str | os.PathLike) -> AdamState:
    """Adam's moments and step of the checkpoint `ckpt_arg` (any TP/PP/EP layout of the regular
    optimizer), one line when it holds none."""
    from engine.checkpoint.unsharded import checkpoint_rows, read_recipe

    ckpt, recipe = read_recipe(ckpt_arg)
    _check_readable(ckpt, recipe)
    rows = checkpoint_rows(ckpt, recipe)
    with model_with_optimizer(recipe, rows) as (model, chunks, optimizer):
        load_checkpoint(ckpt, chunks, optimizer, layout=current_layout(padded_vocab_size=rows),
                        load_rng=False, require_optim=True)
        mains = _main_and_state(optimizer)
        moments: dict[str, StateDict] = {k: {} for k in MOMENTS}
        steps = set()
        for name, p in model.named_parameters():
            main, inner = mains[p]
            state = inner.state.get(main, {})
            for k in MOMENTS:
                moments[k][name] = state[k].detach().float().clone() if k in state else \
                    torch.zeros(p.shape)
            if "step" in state:
                steps.add(int(state["step"]))
    if len(steps) > 1:
        raise CheckpointError(f"{ckpt}: Adam's step differs between parameters ({sorted(steps)})")
    return AdamState(step=steps.pop() if steps else 0, **moments)


def set_adam_state(model: torch.nn.Module, optimizer, adam: AdamState) -> None:
    """Make `adam` the state of `optimizer` (built over `model`): every parameter's moments
    (shapes checked, one line naming the first that does not fit) and the step."""
    mains = _main_and_state(optimizer)
    for name, p in model.named_parameters():
        main, inner = mains[p]
        state = {"step": torch.tensor(float(adam.step), dtype=torch.float32)}
        for k in MOMENTS:
            t = getattr(adam, k).get(name)
            if t is None or tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"Adam's {k} of '{name}' is "
                                      f"{None if t is None else tuple(t.shape)}; the model "
                                      f"expects {tuple(p.shape)}")
            state[k] = t.detach().to(main.dtype).clone()
        inner.state[main] = state
