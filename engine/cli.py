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
    from engine.checkpoint.io import CheckpointError
    from engine.config.errors import ConfigError
    from engine.convert import ConvertError
    from engine.data import DataError
    from engine.upcycle import UpcycleError

    return ConfigError, DataError, CheckpointError, ConvertError, UpcycleError


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
    from engine.train.distributed import destroy_distributed
    from engine.train.loop import train

    recipe = load_recipe(args.config, args.overrides)
    if os.environ.get("RANK", "0") == "0":  # other ranks stay at WARNING: one log, not N copies
        logging.getLogger().setLevel(recipe.logging.level.upper())
    try:
        train(recipe)
    finally:
        destroy_distributed()
    return 0


def _data_command(name: str):
    def run(argv: list[str]) -> int:
        from engine.data import cli

        return getattr(cli, name)(argv)

    return run


def _tokenizer_main(argv: list[str]) -> int:
    if not argv or argv[0] != "train":
        print(
            "usage: engine tokenizer train --input ... --model-prefix P --vocab-size N",
            file=sys.stderr,
        )
        return 2
    return _data_command("tokenizer_train_main")(argv[1:])


def _convert_main(argv: list[str]) -> int:
    from engine.convert.cli import convert_main

    return convert_main(argv)


def _bench_main(argv: list[str]) -> int:
    from engine.bench.cli import main

    return main(argv)


def _upcycle_main(argv: list[str]) -> int:
    """`engine upcycle scale-up|scale-out ...`."""
    from engine.upcycle.scale_out_cli import scale_out_main

    commands = {"scale-out": scale_out_main}
    try:
        from engine.upcycle.cli import UPCYCLE_COMMANDS
        commands.update(UPCYCLE_COMMANDS)
    except ImportError:
        pass
    if not argv or argv[0] not in commands:
        print(f"usage: engine upcycle {{{','.join(sorted(commands))}}} ...", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


def _pipeline_main(argv: list[str]) -> int:
    from engine.pipeline.cli import pipeline_main

    return pipeline_main(argv)


COMMANDS = {
    "train": train_main,
    "preprocess": _data_command("preprocess_main"),
    "tokenizer": _tokenizer_main,
    "corpus": _data_command("corpus_main"),
    "convert": _convert_main,
    "upcycle": _upcycle_main,
    "bench": _bench_main,
    "pipeline": _pipeline_main,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: engine {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
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
        return COMMANDS[argv[0]](argv[1:])
    except _user_errors() as err:
        rank = os.environ.get("RANK", "0")
        if rank != "0":
            # Every rank usually meets the same error: let rank 0 say it. Exiting at once could
            # make torchrun kill rank 0 before it printed (seen under Slurm); a rank that is
            # still alive after the grace period met an error of its own and says it.
            time.sleep(ERROR_GRACE_S)
        print(f"error: {err}" if rank == "0" else f"error (rank {rank}): {err}", file=sys.stderr)
        return 2
