"""`engine upcycle scale-up`: read a dense checkpoint, grow it (`scale_up.py`), measure the
function-preservation error on a validation batch, write the larger checkpoint and its report.

The command around the math: files, the tokenizer, the validation batch, the report, console
lines. `scale_up_checkpoint` is the same thing callable from Python with the same keywords.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy
import torch

from engine.config.recipe import ModelConfig, Recipe
from engine.upcycle import UpcycleError
from engine.upcycle.depth import DEPTH_METHODS
from engine.upcycle.scale_up import WIDTH_METHODS, ScaleUpSpec, scale_up

log = logging.getLogger(__name__)

EXACT_RTOL = 1e-4
"""Largest |logit change| / max |logit| a function-preserving growth may show (fp32 rounding)."""


def validation_tokens(recipe: Recipe, *, samples: int, seed: int,
                      vocab_size: int) -> tuple[torch.Tensor, dict]:
    """(tokens [samples, seq_length + 1], where they came from): the first tokens of the recipe's
    first validation set (else its first training set) when its files are here, else random ids
    in [0, vocab_size) from `seed`."""
    seq = recipe.data.seq_length
    sets = [(f"data.valid.{v.name}", v.path) for v in recipe.data.valid] + \
        [(f"data.blend[{i}]", b.path) for i, b in enumerate(recipe.data.blend)]
    if not recipe.data.synthetic:
        for name, prefix in sets:
            if Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file():
                from engine.data.datasets import inspect_indexed_dataset

                info = inspect_indexed_dataset(prefix)
                count = min(samples, info.tokens // (seq + 1))
                if count == 0:
                    continue
                data = numpy.memmap(f"{prefix}.bin", dtype=info.dtype, mode="r")
                tokens = torch.from_numpy(data[: count * (seq + 1)].astype(numpy.int64))
                return tokens.view(count, seq + 1), {"source": name, "path": prefix,
                                                     "samples": count, "seq_length": seq}
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (samples, seq + 1), generator=generator)
    return tokens, {"source": "random", "seed": seed, "samples": samples, "seq_length": seq}


def _vocab_size(recipe: Recipe, rows: int) -> int:
    """The tokenizer's vocabulary (what padding is computed from); the checkpoint's embedding
    rows when neither the recipe nor a loadable tokenizer says."""
    if recipe.model.vocab_size:
        return recipe.model.vocab_size
    tok = recipe.tokenizer
    if tok.type != "none" and tok.path and Path(tok.path).exists():
        from engine.data.tokenizer import load_tokenizer

        return load_tokenizer(tok.type, tok.path).vocab_size
    return rows


def _sizes(m: ModelConfig) -> dict:
    return {"num_layers": m.num_layers, "hidden_size": m.hidden_size,
            "ffn_hidden_size": m.ffn_hidden_size, "num_attention_heads": m.num_attention_heads,
            "num_query_groups": m.num_query_groups or m.num_attention_heads,
            "kv_channels": m.kv_channels or m.hidden_size // m.num_attention_heads,
            "share_embeddings_and_output_weights": m.share_embeddings_and_output_weights}


def target_recipe(recipe: Recipe, out: Path, *, rows: int, sizes: dict, tp: int | None,
                  pp: int | None) -> Recipe:
    """The grown model's recipe: `sizes` (None = the source's; an MHA source without
    --kv-groups stays MHA), the head width kept, the embeddings untied when the hidden size
    grows, the target layout (checked), and checkpoint keys that start a run from `out`."""
    from engine.config.validate import validate
    from engine.upcycle.io import derived_recipe, start_from

    m = recipe.model
    model = {k: getattr(m, k) if v is None else v for k, v in sizes.items()}
    heads, groups = model["num_attention_heads"], model["num_query_groups"]
    if groups and heads % groups:
        fewer = heads // groups * groups
        raise UpcycleError(f"--heads {heads} cannot be spread evenly over {groups} KV groups "
                           "(megatron gives every group num_attention_heads/num_query_groups "
                           f"heads); use --heads {fewer or groups} or {fewer + groups}, or "
                           "--kv-groups that divides it")
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    model["kv_channels"] = None if model["hidden_size"] == head_dim * \
        model["num_attention_heads"] else head_dim
    model["vocab_size"] = _vocab_size(recipe, rows)
    model["share_embeddings_and_output_weights"] = m.share_embeddings_and_output_weights and \
        model["hidden_size"] == m.hidden_size
    parallel = {"tp": tp or recipe.parallel.tp, "pp": pp or recipe.parallel.pp}
    if parallel["pp"] == 1:
        parallel["vpp"] = None
    if parallel["tp"] == 1:
        parallel["sequence_parallel"] = False
    dst = derived_recipe(recipe, model=model, parallel=parallel, checkpoint=start_from(out))
    p = dst.parallel
    validate(dst, p.tp * p.pp * p.cp * (p.dp or 1), source="the grown model")
    return dst


def _expected_exact(src: ModelConfig, dst: ModelConfig, spec: ScaleUpSpec) -> bool:
    width = spec.width_method == "exact" or (
        spec.width_method == "fpi" and dst.hidden_size % src.hidden_size == 0
        and spec.noise_std == 0.0)
    depth = spec.depth_method == "identity" or dst.num_layers == src.num_layers
    return width and depth


def scale_up_checkpoint(ckpt: str | os.PathLike, out: str | os.PathLike, *,
                        num_layers: int | None = None, hidden_size: int | None = None,
                        ffn_hidden_size: int | None = None, num_attention_heads: int | None = None,
                        num_query_groups: int | None = None, width_method: str = "fpi",
                        depth_method: str = "stack", noise: float = 0.0, seed: int = 0,
                        tp: int | None = None, pp: int | None = None,
                        eval_samples: int = 4) -> dict:
    """Grow the checkpoint `ckpt` into the new checkpoint directory `out`; return the report
    (also written to out/report.json). Sizes left None keep the source's."""
    from engine.upcycle.io import fit_vocab, read_checkpoint, write_checkpoint

    out = Path(out)
    spec = ScaleUpSpec(width_method=width_method, depth_method=depth_method, noise_std=noise,
                       seed=seed)
    ckpt_dir, recipe, state, step = read_checkpoint(ckpt)
    rows = state["embedding.word_embeddings.weight"].shape[0]
    sizes = {"num_layers": num_layers, "hidden_size": hidden_size,
             "ffn_hidden_size": ffn_hidden_size, "num_attention_heads": num_attention_heads,
             "num_query_groups": num_query_groups}
    dst_recipe = target_recipe(recipe, out, rows=rows, sizes=sizes, tp=tp, pp=pp)
    src, dst = recipe.model, dst_recipe.model
    log.info("read %s (step %d, %d tensors); growing %s+%s", ckpt_dir, step, len(state),
             width_method, depth_method)
    grown, source_map = scale_up(state, src, dst, spec=spec)
    grown = fit_vocab(grown, dst_recipe)
    log.info("grown to %d tensors: %d layers, hidden %d, ffn %d, %d heads in %d KV groups",
             len(grown), dst.num_layers, dst.hidden_size, dst.ffn_hidden_size,
             dst.num_attention_heads, dst.num_query_groups or dst.num_attention_heads)
    report = {
        "command": "scale-up", "source": {"checkpoint": str(ckpt_dir), "step": step,
                                          "model": _sizes(src)},
        "target": {"model": _sizes(dst), "tp": dst_recipe.parallel.tp,
                   "pp": dst_recipe.parallel.pp},
        "width_method": width_method, "depth_method": depth_method, "noise_std": noise,
        "seed": seed,
        "untied_embeddings": src.share_embeddings_and_output_weights and
        not dst.share_embeddings_and_output_weights,
        "expected_exact": _expected_exact(src, dst, spec),
    }
    if eval_samples:
        v = report["validation"] = measure(recipe, state, dst_recipe, grown, spec,
                                           samples=eval_samples)
        v["holds"] = v["max_rel_logit_diff"] < EXACT_RTOL if report["expected_exact"] else None
    report["source_map"] = source_map.to_dict()
    log.info("writing %s", out)
    write_checkpoint(out, dst_recipe, grown, report=report, source=ckpt_dir)
    return report


def measure(recipe: Recipe, state: dict, dst_recipe: Recipe, grown: dict, spec: ScaleUpSpec,
            *, samples: int) -> dict:
    """Step-0 loss and logits of source and grown model on one validation batch (and, with
    noise, the loss of the same growth without it: the change the noise alone causes)."""
    from engine.upcycle.io import evaluate_tokens, fit_vocab

    tokens, where = validation_tokens(recipe, samples=samples, seed=spec.seed,
                                      vocab_size=dst_recipe.model.vocab_size)
    log.info("measuring on %d x %d tokens (%s)", *tokens.shape, where["source"])
    source_loss, source_logits = evaluate_tokens(recipe, state, tokens)
    grown_loss, grown_logits = evaluate_tokens(dst_recipe, grown, tokens)
    vocab = dst_recipe.model.vocab_size  # padding rows are no tokens
    diff = (grown_logits[..., :vocab] - source_logits[..., :vocab]).abs().max().item()
    result = {"tokens": where, "loss_source": source_loss, "loss_grown": grown_loss,
              "loss_change": grown_loss - source_loss, "max_abs_logit_diff": diff,
              "max_rel_logit_diff": diff / source_logits[..., :vocab].abs().max().item()}
    if spec.noise_std:
        plain, _ = scale_up(state, recipe.model, dst_recipe.model,
                            spec=ScaleUpSpec(width_method=spec.width_method,
                                             depth_method=spec.depth_method, seed=spec.seed))
        plain_loss, _ = evaluate_tokens(dst_recipe, fit_vocab(plain, dst_recipe), tokens)
        result.update(loss_grown_without_noise=plain_loss,
                      noise_loss_change=grown_loss - plain_loss)
    return result


def scale_up_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine upcycle scale-up", description=(
        "Grow a dense checkpoint (any saved layout) wider and deeper into a new step-0 "
        "checkpoint at the target TP/PP layout, with a JSON report of where every new unit "
        "came from and the measured step-0 loss change. Train it with checkpoint.pretrained."))
    p.add_argument("--ckpt", required=True, help="source checkpoint (save dir or iter_ dir)")
    p.add_argument("--out", required=True, help="new checkpoint directory")
    p.add_argument("--hidden", type=int, help="hidden_size (default: the source's)")
    p.add_argument("--ffn", type=int, help="ffn_hidden_size")
    p.add_argument("--heads", type=int, help="num_attention_heads (head width stays)")
    p.add_argument("--kv-groups", type=int, help="num_query_groups")
    p.add_argument("--layers", type=int, help="num_layers")
    p.add_argument("--width-method", choices=WIDTH_METHODS, default="fpi")
    p.add_argument("--depth-method", choices=DEPTH_METHODS, default="stack")
    p.add_argument("--noise", type=float, default=0.0,
                   help="std of noise on copied units (fpi/aki/aki-pro), to break symmetry")
    p.add_argument("--seed", type=int, default=0, help="seed of fresh units, noise, tokens")
    p.add_argument("--tp", type=int, help="target tensor-parallel size (default: the source's)")
    p.add_argument("--pp", type=int, help="target pipeline-parallel size")
    p.add_argument("--eval-samples", type=int, default=4,
                   help="validation sequences for the measured loss change (0: skip)")
    a = p.parse_args(argv)
    report = scale_up_checkpoint(
        a.ckpt, a.out, num_layers=a.layers, hidden_size=a.hidden, ffn_hidden_size=a.ffn,
        num_attention_heads=a.heads, num_query_groups=a.kv_groups, width_method=a.width_method,
        depth_method=a.depth_method, noise=a.noise, seed=a.seed, tp=a.tp, pp=a.pp,
        eval_samples=a.eval_samples)
    v = report.get("validation")
    loss = (f"loss {v['loss_source']:.4f} -> {v['loss_grown']:.4f} ({v['loss_change']:+.2e}) "
            f"| max rel logit diff {v['max_rel_logit_diff']:.2e}" if v else "loss not measured")
    verdict = {None: "", True: " | function preserved", False: " | NOT preserved"}[
        v["holds"] if v else None]
    print(f"{a.out} | {a.width_method}+{a.depth_method} | {loss}{verdict} | report "
          f"{Path(a.out) / 'report.json'}")
    return 1 if v and v["holds"] is False else 0


UPCYCLE_COMMANDS = {"scale-up": scale_up_main}
