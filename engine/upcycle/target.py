"""The recipe of an upcycled model (pure: recipes in, a recipe out).

Both upcycling commands derive the new model's recipe the same way: the source's recipe with the
`model` keys the growth changes, the target layout (tp/pp/ep; default the source's tp and pp),
and checkpoint keys that start a run from the new directory; then the model is checked against
that layout by `engine.config.validate`, with the one line training would give.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from engine.config.loader import recipe_from_dict, recipe_to_dict
from engine.config.recipe import ModelConfig, Recipe
from engine.config.validate import validate
from engine.models import get_family
from engine.upcycle import UpcycleError


def derived_recipe(recipe: Recipe, **sections) -> Recipe:
    """`recipe` with some sections' keys replaced (e.g. model={"hidden_size": 80})."""
    plain = recipe_to_dict(recipe)
    for name, values in sections.items():
        plain[name] = {**plain.get(name, {}), **values}
    return recipe_from_dict(plain, source="upcycled recipe")


def start_from(out: str | os.PathLike) -> dict:
    """The checkpoint section of an upcycled model's recipe: train it from `out` (weights only);
    where the source run saved (and how often) is no business of the new model."""
    return {"save": None, "load": None, "pretrained": str(Path(out).resolve()),
            "save_interval": None, "keep_last": None}


def target_recipe(source: Recipe, out: str | os.PathLike, *, model: dict, tp: int | None,
                  pp: int | None, ep: int | None, what: str) -> Recipe:
    """`source` with the `model` keys replaced, at the target layout (tp and pp default to the
    source's, ep to 1; sequence parallelism kept with tp > 1 and required by MoE with tp > 1),
    starting from `out`. Checked at the smallest world the layout needs (`what` names the model
    in the error); the batch sizes stay the training recipe's business."""
    par = source.parallel
    tp, pp, ep = tp or par.tp, pp or par.pp, ep or 1
    moe = model.get("moe", source.model.moe)
    parallel = {"tp": tp, "pp": pp, "ep": ep, "dp": None,
                "vpp": par.vpp if pp > 1 else None,
                "sequence_parallel": tp > 1 and (par.sequence_parallel or moe is not None)}
    dst = derived_recipe(source, model=model, parallel=parallel, checkpoint=start_from(out))
    probe = replace(dst, train=replace(dst.train, global_batch_size=None))
    validate(probe, tp * pp * dst.parallel.cp * ep, source=what)
    return dst


def model_sizes(m: ModelConfig) -> dict:
    """The shape of a model as the reports print it."""
    return {"num_layers": m.num_layers, "hidden_size": m.hidden_size,
            "ffn_hidden_size": m.ffn_hidden_size, "num_attention_heads": m.num_attention_heads,
            "num_query_groups": m.num_query_groups or m.num_attention_heads,
            "kv_channels": m.kv_channels or m.hidden_size // m.num_attention_heads,
            "share_embeddings_and_output_weights": m.share_embeddings_and_output_weights}


def grown_model(m: ModelConfig, sizes: dict) -> dict:
    """The `model` keys of a Scale-Up target: `sizes` (None = the source's; an MHA source without
    num_query_groups stays MHA), the head width kept, the embeddings untied when the hidden size
    grows."""
    model = {k: getattr(m, k) if v is None else v for k, v in sizes.items()}
    heads, groups = model["num_attention_heads"], model["num_query_groups"]
    if groups and heads % groups:
        fewer = heads // groups * groups
        raise UpcycleError(f"--num-attention-heads {heads} cannot be spread evenly over {groups} "
                           "KV groups (megatron gives every group num_attention_heads/"
                           f"num_query_groups heads); use --num-attention-heads "
                           f"{fewer or groups} or {fewer + groups}, or --num-query-groups "
                           "that divides it")
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    model["kv_channels"] = None if model["hidden_size"] == head_dim * heads else head_dim
    model["share_embeddings_and_output_weights"] = m.share_embeddings_and_output_weights and \
        model["hidden_size"] == m.hidden_size
    return model


def moe_family(dense: ModelConfig, moe: dict) -> str:
    """The family of the upcycled model: the dense family's MoE counterpart from the family
    table where it holds the model exactly (every layer MoE, top-k then softmax, no QKV bias or
    RoPE scaling); else the dense family (an HF export then says why it cannot)."""
    fits = moe["layer_freq"] == 1 and not moe["router_pre_softmax"] and \
        not dense.add_qkv_bias and dense.rotary_scaling is None
    counterpart = get_family(dense.family).moe_family
    return counterpart if fits and counterpart else dense.family
