"""A whole model in one process: the boundary every whole-model command goes through.

HF import and export, Scale-Up and Scale-Out are read -> pure function on a state dict -> write:

- `read_unsharded(ckpt)`: a checkpoint of any saved TP/PP/EP layout -> `UnshardedModel` (its
  recipe, one TP=1 state dict in megatron GPTModel names, its step and its stage history);
- `write_unsharded(out, model)`: a fresh step-0 checkpoint without optimizer state, loadable at
  any layout (the one its recipe names), under a temporary name renamed when complete;
- `single_process_model(recipe, rows)` builds the TP=PP=1 model for both, and
  `evaluate(recipe, state, tokens)` runs it once (float64 by default) for invariant checks.

The state dict is the model's own parameters (`read`) or becomes them (`write`, `assign`): one
copy of the weights in memory, never two. Imports config, models, checkpoint and
engine.distributed only; never convert, upcycle or train.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml

from engine.checkpoint.errors import CheckpointError
from engine.checkpoint.io import find_checkpoint, load_weights, save_checkpoint
from engine.checkpoint.layout import current_layout, read_saved_layout
from engine.checkpoint.state import TrainState, completed_stages, read_train_state
from engine.config.errors import ConfigError
from engine.config.loader import recipe_from_dict
from engine.config.recipe import ParallelConfig, Recipe
from engine.files import new_directory, unwritable
from engine.models.measure import next_token_loss
from engine.models.vocab import VocabError, padded_vocab_size
from engine.models.weights import EMBEDDING

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class UnshardedModel:
    """A whole model: what import, export and the upcycling commands read and write."""

    recipe: Recipe
    """Its recipe, with model.vocab_size set (taken from the tokenizer when the recipe left it
    to the tokenizer)."""
    state: StateDict
    """Parameters in megatron GPTModel names at TP=PP=1; vocabulary tensors have
    `padded_vocab_size` rows."""
    step: int = 0
    """Optimizer steps of the checkpoint it was read from (a written model is step 0)."""
    stages: tuple = field(default=())
    """The training stages its weights went through, oldest first (checkpoint.state)."""
    origin: dict | None = None
    """Where the lineage's weights first came from (TrainState.origin)."""
    path: Path | None = None
    """The checkpoint directory it was read from."""

    @property
    def padded_vocab_size(self) -> int:
        return self.state[EMBEDDING].shape[0]


def read_recipe(ckpt_arg: str | os.PathLike) -> tuple[Path, Recipe]:
    """(checkpoint directory, its stored recipe) for a save directory or an iter_ directory;
    model.vocab_size is set."""
    ckpt = find_checkpoint(ckpt_arg)
    if ckpt is None:
        raise CheckpointError(f"{ckpt_arg}: no checkpoint there (expected "
                              "latest_checkpointed_iteration.txt or an iter_ directory)")
    stored = ckpt / "recipe.yaml"
    if not stored.is_file():
        raise CheckpointError(f"{stored}: missing; the checkpoint does not say what model it "
                              "holds")
    recipe = recipe_from_dict(yaml.safe_load(stored.read_text()), source=str(stored))
    if recipe.model.vocab_size is None:  # the vocabulary came from the tokenizer: pin it
        from engine.data.tokenizer import load_tokenizer

        vocab = load_tokenizer(recipe.tokenizer.type, recipe.tokenizer.path).vocab_size
        recipe = replace(recipe, model=replace(recipe.model, vocab_size=vocab))
    return ckpt, recipe


def checkpoint_rows(ckpt: Path, recipe: Recipe) -> int:
    """The embedding rows of the model saved in `ckpt` (engine.models.vocab's rule: the rows it
    was made with, else megatron's padding at its recipe's tp)."""
    saved = read_saved_layout(ckpt)
    m = recipe.model
    try:
        return padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, recipe.parallel.tp,
                                 saved=saved.padded_vocab_size if saved else None)
    except VocabError as e:
        raise CheckpointError(f"{ckpt}: {e}") from None


@contextlib.contextmanager
def single_process_model(recipe: Recipe, padded_vocab_size: int, *,
                         dtype: torch.dtype | None = None) -> Iterator[torch.nn.Module]:
    """The GPTModel of `recipe` at TP=PP=1 in this process (a world of one on gloo), with
    `padded_vocab_size` embedding rows and parameters in `dtype` (default: the recipe's
    precision), not initialized: every weight is loaded or assigned after."""
    with single_process(recipe, padded_vocab_size, dtype=dtype) as (model, _):
        yield model


@contextlib.contextmanager
def single_process(recipe: Recipe, padded_vocab_size: int, *,
                   dtype: torch.dtype | None = None) -> Iterator[tuple[torch.nn.Module, object]]:
    """`single_process_model`'s model and its TransformerConfig (what an optimizer needs)."""
    from engine.distributed import destroy_parallel_state, init_distributed
    from engine.models.build import build_model, transformer_config

    recipe = replace(recipe, parallel=ParallelConfig(backend="gloo"))
    runtime = init_distributed(recipe)
    try:
        tc = transformer_config(recipe, runtime.layout, on_cpu=True, gloo=True,
                                perform_initialization=False, dtype=dtype)
        (model,) = build_model(recipe, tc, padded_vocab_size=padded_vocab_size, spec="local")
        yield model, tc
    finally:
        destroy_parallel_state()


def parameter_shapes(recipe: Recipe, padded_vocab_size: int) -> dict[str, torch.Size]:
    """The shape of every parameter of `recipe`'s model at TP=PP=1 (what a state dict needs)."""
    with single_process_model(recipe, padded_vocab_size) as model:
        return {k: p.shape for k, p in model.named_parameters()}


def assign(model: torch.nn.Module, state: StateDict) -> None:
    """Make `state`'s tensors the model's parameters (cast to their dtype; no copy when it
    matches): every parameter exactly once, shapes checked, one line naming what does not fit."""
    params = dict(model.named_parameters())
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise CheckpointError(f"the weights do not fit the model: missing {missing[:3]}"
                              f"{' ...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
                              f"{' ...' if len(extra) > 3 else ''}")
    for name, param in params.items():
        tensor = state[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"'{name}' is {tuple(tensor.shape)}; the model expects "
                                  f"{tuple(param.shape)}")
        param.data = tensor.detach().to(param.dtype)


def read_unsharded(ckpt_arg: str | os.PathLike) -> UnshardedModel:
    """The model saved in `ckpt_arg` (a save directory or an iter_ directory, any layout)."""
    ckpt, recipe = read_recipe(ckpt_arg)
    rows = checkpoint_rows(ckpt, recipe)
    log.info("reading %s", ckpt)
    with single_process_model(recipe, rows) as model:
        load_weights(ckpt, [model])
        state = {k: p.detach() for k, p in model.named_parameters()}
    train_state = read_train_state(ckpt)
    return UnshardedModel(recipe=recipe, state=state, step=train_state.step,
                          stages=tuple(completed_stages(ckpt)), origin=train_state.origin,
                          path=ckpt)


def check_writable(path: str | os.PathLike, what: str) -> None:
    """One line naming `what` (e.g. `checkpoint.save=DIR`) when nothing can be written at
    `path`: said at start, before any work, rather than at the first save."""
    reason = unwritable(path)
    if reason is not None:
        raise CheckpointError(f"{what}: {reason}")


def check_new_output(out: str | os.PathLike) -> Path:
    """`out` as a Path, or one line when it already holds something (nothing is overwritten) or
    cannot be made (it is written as a sibling renamed into place: its parent must be
    writable)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists; choose a new output directory")
    check_writable(out.parent, str(out))
    return out


def write_unsharded(out: str | os.PathLike, model: UnshardedModel, *,
                    extras: Callable[[Path], None] | None = None, adam=None) -> Path:
    """Save `model` as the step-0 checkpoint of its recipe into the new directory `out`, keeping
    its stage history and origin; `extras(tmp)` adds files (a report, a tokenizer) before the
    rename; `adam` (engine.checkpoint.adam.AdamState) is saved as its optimizer state, which
    a stage with checkpoint.pretrained_optim loads. The state's tensors become the saved model's
    parameters (not copied)."""
    out = check_new_output(out)
    m = model.recipe.model
    try:  # the rows must suit the layout the recipe trains at
        padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, model.recipe.parallel.tp,
                          saved=model.padded_vocab_size)
    except VocabError as e:
        raise CheckpointError(f"{out}: {e}") from None
    state = TrainState(step=0, consumed_samples=0, consumed_tokens=0, schedule={},
                       earlier_stages=list(model.stages), origin=model.origin)
    with new_directory(out) as tmp:
        if adam is None:
            with single_process_model(model.recipe, model.padded_vocab_size) as built:
                assign(built, model.state)
                save_checkpoint(tmp, [built], None, state,
                                layout=current_layout(padded_vocab_size=model.padded_vocab_size),
                                recipe=model.recipe)
        else:
            from engine.checkpoint.adam import model_with_optimizer, set_adam_state

            with model_with_optimizer(model.recipe, model.padded_vocab_size) as \
                    (built, chunks, optimizer):
                assign(built, model.state)
                optimizer.reload_model_params()  # fp32 main copies of bf16 weights follow them
                set_adam_state(built, optimizer, adam)
                save_checkpoint(tmp, chunks, optimizer, state,
                                layout=current_layout(padded_vocab_size=model.padded_vocab_size),
                                recipe=model.recipe)
        if extras is not None:
            extras(tmp)
    log.info("wrote %s (%d tensors%s)", out, len(model.state),
             f", Adam's state at step {adam.step}" if adam is not None else "")
    return out


def forward_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, padded vocab] of a `single_process_model` on `tokens` [b, s], eval mode."""
    model.eval()
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, position_ids, None)


def evaluate(recipe: Recipe, state: StateDict, tokens: torch.Tensor, *,
             dtype: torch.dtype = torch.float64) -> tuple[float, torch.Tensor]:
    """(mean next-token loss over the real vocabulary, logits [b, s, padded vocab]) of the
    model `state` on `tokens` [b, s+1], run in `dtype` (eval mode: no MoE auxiliary losses)."""
    vocab = recipe.model.vocab_size
    if vocab is None:
        raise ConfigError("evaluate: model.vocab_size is not set")
    with single_process_model(recipe, state[EMBEDDING].shape[0], dtype=dtype) as model:
        assign(model, state)
        logits = forward_logits(model, tokens[:, :-1])
    return next_token_loss(logits, tokens[:, 1:], vocab_size=vocab), logits
