"""Checkpoints in and out of the upcycling math: unsharded state dicts in one process.

`read_checkpoint` loads any saved layout as one TP=PP=1 state dict (megatron's GPTModel keys);
`write_checkpoint` builds the target model, fills every tensor exactly once from a state dict and
saves it as a fresh step-0 checkpoint (no optimizer state) with its recipe and a JSON report. The
format is layout-independent, so it loads at the target TP/PP/EP layout named in its recipe.
Outputs are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml

from engine.checkpoint import TrainState, current_layout, read_train_state, save_checkpoint
from engine.checkpoint.io import completed_stages
from engine.config.loader import recipe_from_dict, recipe_to_dict
from engine.config.recipe import Recipe
from engine.convert.engine_model import checkpoint_vocab, engine_model, parameters
from engine.convert.exporter import load_checkpoint_recipe
from engine.models.build import model_vocab_size
from engine.upcycle import UpcycleError

StateDict = dict[str, torch.Tensor]


def read_checkpoint(ckpt_arg: str | os.PathLike) -> tuple[Path, Recipe, StateDict, int]:
    """(checkpoint dir, its recipe, unsharded weights (parameters only), its step)."""
    from engine.checkpoint import load_weights

    ckpt, recipe = load_checkpoint_recipe(ckpt_arg)
    with engine_model(recipe, vocab_size=checkpoint_vocab(ckpt, recipe)) as model:
        load_weights(ckpt, [model])
        state = {k: p.detach().clone() for k, p in parameters(model).items()}
    return ckpt, recipe, state, read_train_state(ckpt).step


def write_checkpoint(out: str | os.PathLike, recipe: Recipe, state: StateDict, *,
                     report: dict, source: Path | None = None) -> Path:
    """Save `state` as the step-0 checkpoint of `recipe` into the new directory `out`; the
    training history (stages, tokens) of the `source` checkpoint carries over."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UpcycleError(f"{out}: not empty; choose a new output directory")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    vocab = model_vocab_size(recipe, None)
    try:
        with engine_model(recipe, vocab_size=vocab) as model, torch.no_grad():
            params = parameters(model)
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            if missing or extra:
                raise UpcycleError(f"upcycled weights do not fit the target model: missing "
                                   f"{missing[:3]}, unexpected {extra[:3]}")
            for name, param in params.items():
                if tuple(state[name].shape) != tuple(param.shape):
                    raise UpcycleError(f"'{name}' is {tuple(state[name].shape)}; the target "
                                       f"model expects {tuple(param.shape)}")
                param.copy_(state[name])
            history = completed_stages(source) if source is not None else []
            save_checkpoint(tmp, [model], None, TrainState(0, 0, 0, {}, earlier_stages=history),
                            layout=current_layout(distributed_optimizer=False,
                                                  optim_sharding="dp_reshardable",
                                                  padded_vocab_size=vocab),
                            recipe_yaml=yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def evaluate_tokens(recipe: Recipe, state: StateDict, tokens: torch.Tensor
                    ) -> tuple[float, torch.Tensor]:
    """(mean next-token loss, logits [b, s, padded vocab]) of the model `state` on `tokens`
    [b, s+1], in one process, in eval mode (no MoE auxiliary losses)."""
    vocab = state["embedding.word_embeddings.weight"].shape[0]
    with engine_model(recipe, vocab_size=vocab) as model, torch.no_grad():
        for name, param in parameters(model).items():
            param.copy_(state[name])
        model.eval()
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        position_ids = torch.arange(inputs.shape[1]).expand_as(inputs)
        logits = model(inputs, position_ids, None).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return loss.item(), logits


def loss_on_tokens(recipe: Recipe, state: StateDict, tokens: torch.Tensor) -> float:
    """Mean next-token loss of the model `state` on `tokens` [b, s+1] (fp32, one process)."""
    return evaluate_tokens(recipe, state, tokens)[0]


def fit_vocab(state: StateDict, recipe: Recipe) -> StateDict:
    """Embedding/output rows padded (zeros) or trimmed to the padding `recipe` needs at its tp:
    megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by x tp."""
    rows = model_vocab_size(recipe, None)
    out = dict(state)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key in out and out[key].shape[0] != rows:
            t = out[key][: min(rows, out[key].shape[0])]
            out[key] = torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])
    return out


def start_from(out: str | os.PathLike) -> dict:
    """The checkpoint section of an upcycled model's recipe: train it from `out` (weights only);
    where the source run saved (and how often) is no business of the new model."""
    return {"save": None, "load": None, "pretrained": str(Path(out).resolve()),
            "save_interval": None, "keep_last": None}


def derived_recipe(recipe: Recipe, **sections) -> Recipe:
    """`recipe` with some sections' keys replaced (e.g. model={"hidden_size": 80})."""
    plain = recipe_to_dict(recipe)
    for name, values in sections.items():
        plain[name] = {**plain.get(name, {}), **values}
    return recipe_from_dict(plain, source="upcycled recipe")
