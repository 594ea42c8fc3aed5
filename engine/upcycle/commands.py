"""`engine upcycle scale-up | scale-out | vocab` as Python functions of the same shape:
`scale_up_checkpoint(ckpt, out, **options)`, `scale_out_checkpoint(ckpt, out, **options)` and
`vocab_checkpoint(ckpt, out, **options)`, each read -> pure math -> measure -> write, returning
the report (also out/report.json).

The options are dataclasses (`ScaleUpOptions`, `ScaleOutOptions`, `VocabOptions`) whose field
names are the recipe's keys (`hidden_size`, `num_experts`, ...): the same names are the CLI flags
(engine.options) and a pipeline stage's `args`. This is the command layer around the math
(scale_up.py, scale_out.py, vocab.py): files, the report, the HF source of Scale-Out
(engine.convert), the tokenizers of a vocabulary resize (engine.data.subtokens).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from engine.checkpoint.unsharded import (
    UnshardedModel,
    check_new_output,
    read_unsharded,
    write_unsharded,
)
from engine.config.recipe import ModelConfig, Recipe, TokenizerConfig
from engine.models.build import DTYPES
from engine.models.vocab import padded_vocab_size
from engine.models.weights import resize_vocab
from engine.upcycle import UpcycleError
from engine.upcycle.depth import DEPTH_METHODS
from engine.upcycle.invariant import measure_invariant, measurement_tokens, storage_dtype
from engine.upcycle.scale_out import ScaleOutSpec, scale_out
from engine.upcycle.scale_up import WIDTH_METHODS, ScaleUpSpec, scale_up
from engine.upcycle.target import grown_model, model_sizes, moe_family, target_recipe
from engine.upcycle.vocab import INITS, VocabSpec, resize_vocabulary, vocab_shift

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class UpcycleOptions:
    """What every upcycling command takes: the target layout and the measurement."""

    tp: int | None = None
    """Target tensor-parallel size (default: the source's)."""
    pp: int | None = None
    """Target pipeline-parallel size (default: the source's)."""
    eval_samples: int = 1
    """Sequences for the measured loss and logit change (engine.upcycle.invariant), run in
    float64; 0 skips the measurement."""
    eval_seq_length: int = 512
    """Tokens per measured sequence (at most the recipe's data.seq_length)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ScaleUpOptions(UpcycleOptions):
    """Scale-Up: the grown model's sizes (None keeps the source's), the methods, the layout."""

    num_layers: int | None = None
    """model.num_layers of the grown model."""
    hidden_size: int | None = None
    """model.hidden_size of the grown model."""
    ffn_hidden_size: int | None = None
    """model.ffn_hidden_size of the grown model."""
    num_attention_heads: int | None = None
    """model.num_attention_heads of the grown model (the head width stays)."""
    num_query_groups: int | None = None
    """model.num_query_groups of the grown model."""
    width_method: str = field(default="fpi", metadata={"choices": WIDTH_METHODS})
    """How the width grows: fpi, aki, aki-pro or exact (engine/upcycle/width.py)."""
    depth_method: str = field(default="stack", metadata={"choices": DEPTH_METHODS})
    """How the depth grows: stack, interpolate or identity (engine/upcycle/depth.py)."""
    noise: float = 0.0
    """Std of noise on the copied units, relative to the std of their tensor (fpi/aki/aki-pro)."""
    seed: int = 0
    """Seed of fresh units, noise and random measurement tokens."""
    carry_optimizer: bool = False
    """Also write Adam's state mapped through the growth (engine/upcycle/moments.py; step count
    kept); a stage with checkpoint.pretrained_optim: true starts from it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ScaleOutOptions(UpcycleOptions):
    """Scale-Out: the experts (model.moe keys), the upcycling method, the layout."""

    num_experts: int
    """model.moe.num_experts."""
    topk: int
    """model.moe.topk."""
    granularity: int = 1
    """Shards per dense FFN (G); the expert width is ffn_hidden_size / G."""
    router_init: str = field(default="normal", metadata={"choices": ("normal", "zeros")})
    """Router rows: normal (std router_std) or zeros."""
    router_std: float = 0.02
    """Std of the normal router initialization."""
    weight_scaling: str = field(default="auto", metadata={"choices": ("auto", "exact", "none")})
    """auto: a^(1/3) on fc1 and fc2 (He et al. 2024); exact: a on fc2 only; none."""
    router_pre_softmax: bool = False
    """model.moe.router_pre_softmax: softmax over all experts before top-k."""
    noise: float = 0.0
    """Std of noise on each expert, relative to the std of its tensor (0 keeps the invariant)."""
    drop_upcycling: float = 0.0
    """Drop-Upcycling (Nakamura et al. 2025, arXiv 2502.19261): the fraction r in [0, 1) of each
    expert's intermediate units whose fc1 rows (gate and up) and fc2 columns are re-initialized
    from the dense weights' mean and std, a different random subset per expert (0.5 is the
    paper's best); r > 0 is not function preserving (the change is measured, not judged)."""
    seed: int = 0
    """Seed of the router, the noise, the dropped units and random measurement tokens."""
    layer_freq: int = 1
    """model.moe.layer_freq: MoE every N layers."""
    aux_loss_coeff: float = 0.001
    """model.moe.aux_loss_coeff."""
    z_loss_coeff: float | None = None
    """model.moe.z_loss_coeff."""
    token_dispatcher: str = field(default="alltoall",
                                  metadata={"choices": ("allgather", "alltoall")})
    """model.moe.token_dispatcher."""
    ep: int | None = None
    """Target expert-parallel size (default 1)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class VocabOptions(UpcycleOptions):
    """Vocabulary resize: the extended tokenizer, how new rows start, the layout."""

    tokenizer: str
    """The extended tokenizer (engine tokenizer extend's directory, a tokenizer.json or a
    sentencepiece .model): every id of the checkpoint's tokenizer kept, new ids after them."""
    init: str = field(default="subtoken-mean", metadata={"choices": INITS})
    """New rows: subtoken-mean (mean of the rows of the base tokens the base tokenizer splits the
    new token into), mean (mean of all old rows; Hewitt 2021) or normal (N(0, std of the old
    rows)); engine/upcycle/vocab.py."""
    seed: int = 0
    """Seed of the normal init and of random measurement tokens."""


def _stored(source: UnshardedModel, recipe: Recipe, state: dict) -> UnshardedModel:
    """The upcycled model as it will be written: vocabulary rows padded for the target's tp,
    weights in its storage dtype (what the measurement sees), the source's history kept."""
    m = recipe.model
    rows = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, recipe.parallel.tp)
    dtype = DTYPES[recipe.train.precision]
    state = {k: v.to(dtype) for k, v in resize_vocab(state, m.vocab_size, rows).items()}
    return replace(source, recipe=recipe, state=state, step=0, path=None)


def _measure(source: UnshardedModel, target: UnshardedModel, options, *,
             expected_exact: bool) -> dict | None:
    if not options.eval_samples:
        return None
    tokens, where = measurement_tokens(source.recipe, samples=options.eval_samples,
                                       seq_length=options.eval_seq_length, seed=options.seed)
    return measure_invariant(source, target, tokens, where, expected_exact=expected_exact)


def _write(out: Path, target: UnshardedModel, report: dict, more=None, adam=None) -> None:
    def extras(tmp: Path) -> None:
        if more is not None:
            more(tmp)
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str))

    write_unsharded(out, target, extras=extras, adam=adam)


def _source_record(source: UnshardedModel) -> dict:
    return {"checkpoint": str(source.path or source.origin.get("hf")), "step": source.step,
            "model": model_sizes(source.recipe.model)}


def growth_record(source: UnshardedModel, target: UnshardedModel, depth_method: str) -> dict:
    """How much and when the model grew: parameters, the depth factor (`stack` at an integer
    factor g is G_stack, Du et al. 2024, arXiv 2405.15319: the whole block sequence repeated g
    times), and the source's learning rate at the growth against its peak (G_stack and Staged
    Training grow before the decay: a ratio near 1; a fully decayed source is near min_lr/lr)."""
    params = [sum(t.numel() for t in m.state.values()) for m in (source, target)]
    old, new = source.recipe.model.num_layers, target.recipe.model.num_layers
    last = source.stages[-1] if source.stages else {}  # the stage that trained the weights
    lr = last.get("lr") or {}
    return {"parameters": {"source": params[0], "target": params[1],
                           "factor": params[1] / params[0]},
            "depth": {"method": depth_method, "factor": new / old,
                      "g_stack": new // old if depth_method == "stack" and new % old == 0
                      else None},
            "timing": {"source_steps": last.get("steps", 0),
                       "final_lr": lr.get("final"), "peak_lr": lr.get("peak"),
                       "final_over_peak": lr["final"] / lr["peak"] if lr.get("peak") else None}}


def scale_up_exact(src: ModelConfig, dst: ModelConfig, spec: ScaleUpSpec) -> bool:
    """Whether the growth preserves the function by construction: the exact width method, or FPI
    at an integer hidden ratio without noise; identity blocks or no new layers."""
    width = spec.width_method == "exact" or (
        spec.width_method == "fpi" and dst.hidden_size % src.hidden_size == 0
        and spec.noise == 0.0)
    depth = spec.depth_method == "identity" or dst.num_layers == src.num_layers
    return width and depth


def scale_up_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, **options) -> dict:
    """Grow the dense checkpoint `ckpt` (any saved layout) into the new checkpoint directory
    `out` (ScaleUpOptions keywords); return the report, also written to out/report.json."""
    opts = ScaleUpOptions(**options)
    out = check_new_output(out)
    spec = ScaleUpSpec(width_method=opts.width_method, depth_method=opts.depth_method,
                       noise=opts.noise, seed=opts.seed)
    if opts.carry_optimizer:  # before the growth and its measurement, not after them
        from engine.checkpoint.adam import check_carriable

        check_carriable(ckpt)
    source = read_unsharded(ckpt)
    src = source.recipe.model
    sizes = {k: getattr(opts, k) for k in ("num_layers", "hidden_size", "ffn_hidden_size",
                                           "num_attention_heads", "num_query_groups")}
    recipe = target_recipe(source.recipe, out, model=grown_model(src, sizes), tp=opts.tp,
                           pp=opts.pp, ep=None, what="the grown model")
    dst = recipe.model
    log.info("growing %s (step %d) %s+%s", source.path, source.step, spec.width_method,
             spec.depth_method)
    grown, source_map = scale_up(source.state, src, dst, spec=spec)
    target = _stored(source, recipe, grown)
    report = {"command": "scale-up", "source": _source_record(source),
              "target": {"model": model_sizes(dst), "tp": recipe.parallel.tp,
                         "pp": recipe.parallel.pp},
              "options": asdict(opts),
              "untied_embeddings": src.share_embeddings_and_output_weights and
              not dst.share_embeddings_and_output_weights,
              "growth": growth_record(source, target, spec.depth_method)}
    exact = scale_up_exact(src, dst, spec)
    report["invariant"] = _measure(source, target, opts, expected_exact=exact)
    if report["invariant"] and spec.noise:  # what the noise alone changed
        plain, _ = scale_up(source.state, src, dst, spec=replace(spec, noise=0.0))
        without = _measure(source, _stored(source, recipe, plain), opts, expected_exact=False)
        report["invariant"].update(loss_target_without_noise=without["loss_target"],
                                   noise_loss_change=report["invariant"]["loss_target"] -
                                   without["loss_target"])
    report["source_map"] = source_map.to_dict()
    adam = None
    if opts.carry_optimizer:
        adam, report["optimizer"] = _carried_adam(source, target, spec)
    _write(out, target, report, adam=adam)
    return report


def _carried_adam(source: UnshardedModel, target: UnshardedModel, spec: ScaleUpSpec):
    """(the grown model's AdamState, its report record): the source checkpoint's moments
    through the growth's maps, vocabulary rows padded like the weights (with zeros)."""
    from engine.checkpoint.adam import AdamState, read_adam_state
    from engine.upcycle.moments import carry_moments

    state = read_adam_state(source.path)
    m, v, summary = carry_moments(state.exp_avg, state.exp_avg_sq, source.recipe.model,
                                  target.recipe.model, spec)
    dst = target.recipe.model
    rows = target.padded_vocab_size
    m, v = (resize_vocab(x, dst.vocab_size, rows) for x in (m, v))
    record = {"carried": True, "adam_step": state.step, "elements_carried": summary["carried"],
              "elements_zero": summary["zero"]}
    log.info("Adam's state carried (step %d): %d elements from the source, %d new at zero",
             state.step, summary["carried"], summary["zero"])
    return AdamState(step=state.step, exp_avg=m, exp_avg_sq=v), record


def _read_source(ckpt: str | os.PathLike) -> UnshardedModel:
    """An engine checkpoint, or an HF model directory (imported on the fly)."""
    path = Path(ckpt)
    if (path / "config.json").is_file() and not (path / "metadata.json").is_file():
        from engine.convert.importer import read_hf

        return read_hf(path)
    return read_unsharded(path)


def scale_out_inexact(moe, spec: ScaleOutSpec) -> list[str]:
    """Why the MoE does not compute the dense function by construction (scale_out.py's
    invariant); empty when it does."""
    reasons = []
    if spec.noise:
        reasons.append(f"noise {spec.noise}")
    if spec.drop_upcycling:
        reasons.append(f"drop_upcycling {spec.drop_upcycling} (re-initialized units)")
    if moe.router_pre_softmax:
        reasons.append("router_pre_softmax")
    if spec.granularity > 1 and spec.weight_scaling != "exact":
        reasons.append(f"granularity {spec.granularity} with weight_scaling "
                       f"{spec.weight_scaling}")
    return reasons


def scale_out_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, **options) -> dict:
    """Upcycle the dense model `ckpt` (an engine checkpoint of any layout, or an HF directory)
    into a mixture of experts in the new directory `out` (ScaleOutOptions keywords); return the
    report, also written to out/report.json."""
    opts = ScaleOutOptions(**options)
    out = check_new_output(out)
    spec = ScaleOutSpec(granularity=opts.granularity, router_init=opts.router_init,
                        router_std=opts.router_std, weight_scaling=opts.weight_scaling,
                        noise=opts.noise, drop_upcycling=opts.drop_upcycling,
                        seed=opts.seed)
    source = _read_source(ckpt)
    src = source.recipe.model
    moe = {"num_experts": opts.num_experts, "topk": opts.topk,
           "ffn_hidden_size": src.ffn_hidden_size // max(opts.granularity, 1),
           "router_pre_softmax": opts.router_pre_softmax,
           "aux_loss_coeff": opts.aux_loss_coeff, "z_loss_coeff": opts.z_loss_coeff,
           "token_dispatcher": opts.token_dispatcher, "layer_freq": opts.layer_freq}
    recipe = target_recipe(source.recipe, out, model={"moe": moe,
                                                      "family": moe_family(src, moe)},
                           tp=opts.tp, pp=opts.pp, ep=opts.ep, what="the mixture of experts")
    log.info("upcycling %s (step %d) into %d experts, top-%d", source.path or ckpt, source.step,
             opts.num_experts, opts.topk)
    state, record = scale_out(source.state, src, recipe.model, spec=spec)
    drop = record["drop_upcycling"]
    if drop["units_per_expert"]:
        log.info("drop-upcycling %g: %d of %d units per expert re-initialized from the dense "
                 "weights' statistics; not function preserving: the change is measured, not "
                 "judged", spec.drop_upcycling, drop["units_per_expert"], drop["expert_units"])
    target = _stored(source, recipe, state)
    p = recipe.parallel
    report = {"command": "scale-out", "source": _source_record(source),
              "target": {"model": model_sizes(recipe.model), "num_experts": opts.num_experts,
                         "topk": opts.topk, "tp": p.tp, "pp": p.pp, "ep": p.ep},
              "options": asdict(opts), **record}
    inexact = scale_out_inexact(recipe.model.moe, spec)
    report["invariant"] = _measure(source, target, opts, expected_exact=not inexact)
    if report["invariant"] and inexact:  # measured, not judged: say why
        report["invariant"]["not_exact_by_construction"] = inexact
    _write(out, target, report)
    return report


def _tokenizers(source: UnshardedModel, path: str):
    """(base, new, kind, file) of a resize: the checkpoint's tokenizer and the extended one,
    checked (one line naming the first moved id; nothing is written before)."""
    from engine.data.subtokens import first_moved, open_tokenizer
    from engine.data.tokenizer import load_tokenizer

    tok = source.recipe.tokenizer
    if tok.type == "none" or not tok.path:
        raise UpcycleError(f"{source.path}: its recipe names no tokenizer (tokenizer.type none); "
                           "a resize needs the base tokenizer to keep its ids")
    base = load_tokenizer(tok.type, tok.path)
    kind, new = open_tokenizer(path)
    file = Path(new.path)
    n = source.recipe.model.vocab_size
    if base.vocab_size != n:
        raise UpcycleError(f"{source.path}: model.vocab_size={n} but its tokenizer {tok.path} "
                           f"has {base.vocab_size} tokens; a resize needs them equal")
    moved = first_moved(base, new)
    if moved is not None:
        raise UpcycleError(f"{file}: {moved.line()}; base ids must not move (extend the "
                           f"checkpoint's tokenizer {tok.path} with engine tokenizer extend)")
    if new.vocab_size <= n:
        raise UpcycleError(f"{file}: {new.vocab_size} tokens, no more than the model's {n}; "
                           "nothing to add")
    return base, new, kind, file


def _measure_vocab(source: UnshardedModel, target: UnshardedModel,
                   opts: VocabOptions) -> dict | None:
    """Logits over the old vocabulary unchanged (the verdict) and the distribution's shift
    (engine.upcycle.vocab.vocab_shift), on the source's validation tokens (old ids only)."""
    from engine.checkpoint.unsharded import evaluate
    from engine.models.measure import compare_logits, next_token_loss

    if not opts.eval_samples:
        return None
    tokens, where = measurement_tokens(source.recipe, samples=opts.eval_samples,
                                       seq_length=opts.eval_seq_length, seed=opts.seed)
    n, vocab = source.recipe.model.vocab_size, target.recipe.model.vocab_size
    log.info("measuring on %d x %d tokens (%s), float64", tokens.shape[0], tokens.shape[1] - 1,
             where["source"])
    loss_source, logits_source = evaluate(source.recipe, source.state, tokens)
    loss_target, logits_target = evaluate(target.recipe, target.state, tokens)
    diff = compare_logits(logits_source, logits_target, vocab_size=n,
                          dtype=storage_dtype(source, target))
    shift = vocab_shift(logits_source, logits_target, n, vocab)
    mean = opts.init == "mean"  # the output rows at the old rows' mean: the KL bound holds
    bounded = not mean or shift["kl_max"] <= shift["kl_bound"]
    # the target's loss with its softmax over the old tokens only: the source's, bit for bit
    old_only = next_token_loss(logits_target, tokens[:, 1:], vocab_size=n)
    return {"tokens": where, "loss_source": loss_source, "loss_target": loss_target,
            "loss_change": loss_target - loss_source, "loss_target_old_vocab": old_only,
            **diff.to_dict(), **shift,
            "expected_exact": True, "kl_within_bound": bounded if mean else None,
            "holds": diff.holds and bounded}


def _write_fragment(tmp: Path, out: Path, recipe: Recipe, origin: str) -> None:
    """recipe-fragment.yaml, as an import writes it: the model, its layout, its tokenizer and
    checkpoint.pretrained, for `engine train --config <recipe> --config <fragment>`."""
    import yaml

    from engine.config.loader import recipe_to_dict

    plain = recipe_to_dict(recipe)
    fragment = {"model": plain["model"],
                "parallel": {k: plain["parallel"][k] for k in ("tp", "pp")},
                "tokenizer": plain["tokenizer"],
                "checkpoint": {"pretrained": plain["checkpoint"]["pretrained"]}}
    (tmp / "recipe-fragment.yaml").write_text(
        f"# {origin}\n# use: engine train --config <your recipe> --config "
        f"{out}/recipe-fragment.yaml\n" + yaml.safe_dump(fragment, sort_keys=False))


def vocab_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, **options) -> dict:
    """Resize the model `ckpt` (an engine checkpoint of any layout; import an HF model with
    engine convert hf-to-engine, which brings its tokenizer) for the extended tokenizer
    `tokenizer` into the new directory `out` (VocabOptions keywords): old
    rows kept, new rows by `init`, the vocabulary padded for the target layout, the new
    tokenizer in out/tokenizer and in the recipe. Returns the report (also out/report.json)."""
    from engine.convert.hf_io import copy_tokenizer
    from engine.data.subtokens import base_split, new_pieces

    opts = VocabOptions(**options)
    out = check_new_output(out)
    source = read_unsharded(ckpt)
    base, new, kind, file = _tokenizers(source, opts.tokenizer)
    src = source.recipe.model
    pieces = new_pieces(base, new)
    split = tuple(base_split(base, pieces)) if opts.init == "subtoken-mean" else None
    recipe = target_recipe(source.recipe, out, model={"vocab_size": new.vocab_size}, tp=opts.tp,
                           pp=opts.pp, ep=None, what="the resized model")
    tokenizer_dir = out.resolve() / "tokenizer"
    recipe = replace(recipe, tokenizer=TokenizerConfig(
        type=kind, path=str(tokenizer_dir if kind == "hf" else tokenizer_dir / "tokenizer.model")))
    log.info("resizing %s (step %d) from %d to %d tokens, %s", source.path or ckpt, source.step,
             src.vocab_size, new.vocab_size, opts.init)
    state, record = resize_vocabulary(source.state, src, new.vocab_size,
                                      spec=VocabSpec(init=opts.init, pieces=split, seed=opts.seed))
    target = _stored(source, recipe, state)
    report = {"command": "vocab", "source": _source_record(source),
              "target": {"vocab_size": new.vocab_size, "padded_vocab_size":
                         target.padded_vocab_size, "tp": recipe.parallel.tp,
                         "pp": recipe.parallel.pp, "tokenizer": recipe.tokenizer.path},
              "options": asdict(opts), **record}
    if split is not None:
        report["examples"] = [{"id": src.vocab_size + i, "piece": pieces[i],
                               "base_ids": list(split[i])} for i in range(min(10, len(pieces)))]
    report["invariant"] = _measure_vocab(source, target, opts)

    def tokenizer_files(tmp: Path) -> None:
        copy_tokenizer(file.parent if kind == "hf" else file, tmp / "tokenizer")
        _write_fragment(tmp, out, recipe, f"engine upcycle vocab {source.path} -> {out}")

    _write(out, target, report, tokenizer_files)
    return report
