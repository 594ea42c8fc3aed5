"""`engine upcycle scale-up | scale-out | vocab`: flags from the options dataclasses
(engine.options), one result line, exit code 1 when a growth that should preserve the function
does not (for vocab: logits over the old vocabulary moved, or `mean` broke its KL bound)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from engine.options import add_options, options_from_namespace
from engine.upcycle.commands import (
    ScaleOutOptions,
    ScaleUpOptions,
    VocabOptions,
    scale_out_checkpoint,
    scale_up_checkpoint,
    vocab_checkpoint,
)


def verdict(invariant: dict | None) -> str:
    """The measured part of the result line."""
    if invariant is None:
        return "not measured (--eval-samples 0)"
    v = invariant
    line = (f"loss {v['loss_source']:.4f} -> {v['loss_target']:.4f} ({v['loss_change']:+.2e}) "
            f"| max rel logit diff {v['max_rel']:.2e} (tol {v['rtol']:.1e})")
    return line + {None: "", True: " | function preserved", False: " | NOT preserved"}[v["holds"]]


def _command(prog: str, description: str, options: type, source: str, run, describe):
    """argv -> exit code for one upcycling command."""
    def main(argv: list[str]) -> int:
        p = argparse.ArgumentParser(prog=prog, description=description)
        p.add_argument("--ckpt", required=True, help=source)
        p.add_argument("--out", required=True, help="new (empty) directory for the checkpoint")
        add_options(p, options)
        args = p.parse_args(argv)
        opts = options_from_namespace(options, args)
        report = run(args.ckpt, args.out, **{f.name: getattr(opts, f.name)
                                             for f in dataclasses.fields(opts)})
        print(f"{args.out} | {describe(report)} | {verdict(report['invariant'])} | report "
              f"{Path(args.out) / 'report.json'}")
        return 1 if report["invariant"] and report["invariant"]["holds"] is False else 0
    return main


def _grown(report: dict) -> str:
    o, m = report["options"], report["target"]["model"]
    return (f"{o['width_method']}+{o['depth_method']} to {m['num_layers']} layers x "
            f"{m['hidden_size']}")


def _experts(report: dict) -> str:
    o = report["options"]
    return (f"{o['num_experts']} experts (top-{o['topk']}, G={o['granularity']}) from step "
            f"{report['source']['step']}")


scale_up_main = _command(
    "engine upcycle scale-up",
    "Grow a dense checkpoint (any saved layout) wider and deeper into a new step-0 checkpoint "
    "at the target TP/PP layout, with a JSON report of where every new unit came from and the "
    "measured step-0 loss and logit change. Train it with checkpoint.pretrained.",
    ScaleUpOptions, "source checkpoint (save dir or iter_ dir)", scale_up_checkpoint, _grown)

scale_out_main = _command(
    "engine upcycle scale-out",
    "Turn a dense model into a mixture of experts whose experts start as (shards of) its FFNs "
    "(sparse upcycling; AquilaMoE's Scale-Out), with a JSON report and the measured invariant.",
    ScaleOutOptions, "dense engine checkpoint (any saved layout), or an HF directory",
    scale_out_checkpoint, _experts)


def _resized(report: dict) -> str:
    line = (f"{report['old_vocab_size']} -> {report['vocab_size']} tokens "
            f"({report['target']['padded_vocab_size']} rows), {report['init']}")
    v = report["invariant"]
    if v is not None:
        line += f" | KL(p_old||p_new) {v['kl_mean']:.3e} (log(1+k/n) {v['kl_bound']:.3e})"
    return line


vocab_main = _command(
    "engine upcycle vocab",
    "Resize a checkpoint's vocabulary for an extended tokenizer (engine tokenizer extend): old "
    "rows kept bit for bit, new rows from the base tokenizer's split of each new token "
    "(subtoken-mean), the mean row (mean) or noise (normal); padded for the target TP/PP; the "
    "new tokenizer goes into the checkpoint. Warm the new rows with train.freeze.",
    VocabOptions, "engine checkpoint (any saved layout; HF models: engine convert hf-to-engine)",
    vocab_checkpoint, _resized)

COMMANDS = {
    "scale-up": (scale_up_main, "grow a dense model wider and deeper (Scale-Up)"),
    "scale-out": (scale_out_main, "turn a dense model into a mixture of experts (Scale-Out)"),
    "vocab": (vocab_main, "resize the vocabulary for an extended tokenizer (new rows initialized)"),
}


def upcycle_main(argv: list[str]) -> int:
    from engine.cli import dispatch

    return dispatch("engine upcycle", COMMANDS, argv)
