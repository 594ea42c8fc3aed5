"""`engine upcycle scale-out`: a dense checkpoint (engine, any layout, or an HF directory) -> an
MoE checkpoint for a target TP/PP/EP layout, with a JSON report (what went where, the scaling,
the measured invariant: dense vs MoE logits and loss on the same tokens)."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from engine.upcycle import UpcycleError
from engine.upcycle.io import (
    derived_recipe,
    evaluate_tokens,
    fit_vocab,
    read_checkpoint,
    start_from,
    write_checkpoint,
)
from engine.upcycle.scale_out import ScaleOutSpec, activation_scale, scale_out

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engine upcycle scale-out", description=(
        "Turn a dense model into a mixture of experts whose experts start as (shards of) its "
        "FFNs (sparse upcycling; AquilaMoE's Scale-Out)."))
    p.add_argument("--ckpt", required=True, help="dense engine checkpoint, or an HF directory")
    p.add_argument("--out", required=True, help="new (empty) directory for the MoE checkpoint")
    p.add_argument("--num-experts", type=int, required=True, help="model.moe.num_experts")
    p.add_argument("--topk", type=int, required=True, help="model.moe.topk")
    p.add_argument("--granularity", type=int, default=1, help="shards per dense FFN (G)")
    p.add_argument("--router-init", choices=("normal", "zeros"), default="normal")
    p.add_argument("--router-std", type=float, default=0.02)
    p.add_argument("--weight-scaling", choices=("auto", "exact", "none"), default="auto",
                   help="auto: a^(1/3) on fc1 and fc2 (He et al. 2024); exact: a on fc2 only")
    p.add_argument("--router-pre-softmax", action="store_true",
                   help="softmax over all experts before top-k (default: top-k, then softmax)")
    p.add_argument("--noise", type=float, default=0.0, help="relative std of expert noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer-freq", type=int, default=1, help="MoE every N layers")
    p.add_argument("--aux-loss-coeff", type=float, default=0.001)
    p.add_argument("--z-loss-coeff", type=float, default=None)
    p.add_argument("--token-dispatcher", choices=("allgather", "alltoall"), default="alltoall")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    return p


def _source(path: str, scratch: Path) -> str:
    """An HF directory is imported first (into a scratch directory)."""
    src = Path(path)
    if (src / "config.json").is_file() and not (src / "metadata.json").is_file():
        from engine.convert.importer import hf_to_engine

        return str(hf_to_engine(src, scratch / "imported"))
    return path


MOE_FAMILIES = {"llama": "mixtral", "mistral": "mixtral"}
"""The HF family a dense family's experts export as (Mixtral: Mistral attention, every MLP a
top-k-then-softmax MoE). Qwen2's MoE always has a shared expert, which upcycling does not make."""


def moe_family(dense, moe: dict) -> str:
    """The family of the upcycled model: its dense family's MoE counterpart where HF has one
    that holds it exactly; else the dense family (an HF export then says why it cannot)."""
    fits = moe["layer_freq"] == 1 and not moe["router_pre_softmax"] and \
        not dense.add_qkv_bias and dense.rotary_scaling is None
    return MOE_FAMILIES.get(dense.family, dense.family) if fits else dense.family


def upcycle(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        ckpt, recipe, dense, step = read_checkpoint(_source(args.ckpt, Path(scratch)))
    moe = {"num_experts": args.num_experts, "topk": args.topk,
           "ffn_hidden_size": recipe.model.ffn_hidden_size // max(args.granularity, 1),
           "router_pre_softmax": args.router_pre_softmax, "aux_loss_coeff": args.aux_loss_coeff,
           "z_loss_coeff": args.z_loss_coeff, "token_dispatcher": args.token_dispatcher,
           "layer_freq": args.layer_freq}
    target = derived_recipe(recipe, model={"moe": moe, "family": moe_family(recipe.model, moe)},
                            parallel={
        "tp": args.tp, "pp": args.pp, "ep": args.ep, "sequence_parallel": args.tp > 1,
        "dp": None, "distributed_optimizer": recipe.parallel.distributed_optimizer},
        checkpoint=start_from(args.out))
    spec = ScaleOutSpec(granularity=args.granularity, router_init=args.router_init,
                        router_std=args.router_std, weight_scaling=args.weight_scaling,
                        noise=args.noise, seed=args.seed)
    state, record = scale_out(fit_vocab(dense, target), recipe.model, target.model, spec=spec)
    report = {"source": str(ckpt), "source_step": step, "target": {
        "num_experts": args.num_experts, "topk": args.topk, "tp": args.tp, "pp": args.pp,
        "ep": args.ep}, **record, "invariant": measure(recipe, dense, target, state, spec)}
    write_checkpoint(args.out, target, state, report=report, source=ckpt)
    return report


def measure(dense_recipe, dense, moe_recipe, moe, spec: ScaleOutSpec) -> dict:
    """Dense vs MoE on the same validation tokens (the recipe's data when it is here, else
    random ids); `expected_exact` says when they must agree."""
    from engine.upcycle.cli import validation_tokens

    tokens, origin = validation_tokens(dense_recipe, samples=2, seed=spec.seed + 1,
                                       vocab_size=dense_recipe.model.vocab_size)
    dense_loss, dense_logits = evaluate_tokens(dense_recipe, dense, tokens)
    moe_loss, moe_logits = evaluate_tokens(moe_recipe, moe, tokens)
    vocab = dense_recipe.model.vocab_size
    diff = (dense_logits[..., :vocab] - moe_logits[..., :vocab]).abs()
    rel = (diff.max() / dense_logits[..., :vocab].abs().max()).item()
    cfg = moe_recipe.model.moe
    exact = spec.noise == 0 and not cfg.router_pre_softmax and (
        spec.granularity == 1 or spec.weight_scaling == "exact")
    return {"dense_loss": dense_loss, "moe_loss": moe_loss,
            "max_abs_logit_diff": diff.max().item(), "max_rel_logit_diff": rel,
            "activation_scale": activation_scale(cfg, spec.granularity),
            "expected_exact": exact, "holds": (rel < 1e-5) if exact else None,
            "tokens": origin}


def scale_out_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.tp > 1 and args.num_experts % args.ep:
        raise UpcycleError(f"--ep {args.ep} must divide --num-experts {args.num_experts}")
    report = upcycle(args)
    inv = report["invariant"]
    verdict = {None: "", True: " | invariant holds", False: " | invariant FAILED"}[inv["holds"]]
    print(f"{args.out}: {args.num_experts} experts (top-{args.topk}, G={args.granularity}) from "
          f"{report['source']} step {report['source_step']} | dense loss {inv['dense_loss']:.4f} "
          f"| moe loss {inv['moe_loss']:.4f} | max rel logit diff "
          f"{inv['max_rel_logit_diff']:.2e}{verdict}")
    return 0 if inv["holds"] is not False else 1
