"""`engine eval`, `engine generate`, `engine tasks build`: argument parsing, output files, console.
The long-context ones (passkey tasks, loss by position, their summaries) are in
engine.eval.long_cli.

Under torchrun every rank runs the same command (the model is split over them); rank 0 prints
and writes. Files are written only when everything ran, each through a temporary file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from engine.eval.long_cli import add_per_position_flags, per_position_main
from engine.eval.tasks import NextLineSpec
from engine.options import add_options, options_from_namespace


def _layout_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="engine checkpoint (save dir or iter_ dir)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to run at")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to run at")
    p.add_argument("--tokenizer-type", choices=("sentencepiece", "hf"),
                   help="with --tokenizer: another tokenizer than the checkpoint's recipe names")
    p.add_argument("--tokenizer", help="tokenizer file or directory")


def _load(args, batch_size: int):
    from engine.eval.model import load_for_eval

    tokenizer = (args.tokenizer_type, args.tokenizer) if args.tokenizer else None
    return load_for_eval(args.ckpt, tp=args.tp, pp=args.pp, batch_size=batch_size,
                         tokenizer=tokenizer, max_length=getattr(args, "max_length", None))


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine eval", description=(
        "Evaluate an engine checkpoint on lm-evaluation-harness tasks (the engine is an lm-eval "
        "model backend); run under torchrun for a TP/PP layout."))
    _layout_flags(p)
    p.add_argument("--tasks", help="comma-separated task names (* and ? match local tasks)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's)")
    p.add_argument("--limit", type=int, help="at most this many documents per task")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--include-path", action="append", default=[],
                   help="another directory of task YAMLs, searched before configs/tasks/")
    p.add_argument("--out", help="directory for results.json (and samples_<task>.jsonl)")
    p.add_argument("--log-samples", action="store_true", help="also write every request")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed")
    add_per_position_flags(p)
    args = p.parse_args(argv)
    if not args.tasks and not args.per_position:
        p.error("give --tasks, or --per-position DATA")
    from engine.distributed import destroy_distributed, parallel_sizes
    from engine.eval.harness import load_tasks, quiet, run_tasks
    from engine.eval.lm import engine_lm

    if os.environ.get("RANK", "0") != "0":
        quiet()  # rank 0 shows the progress
    if args.per_position:
        try:
            per_position_main(args, _load(args, args.batch_size))
        finally:
            destroy_distributed()
        return 0
    names = [t for t in args.tasks.split(",") if t]
    tasks = load_tasks(names, args.include_path)  # a bad task fails before the model loads
    try:
        model = _load(args, args.batch_size)
        lm = engine_lm(model.scorer, model.tokenizer, max_length=model.scorer.max_length)
        start = time.perf_counter()
        results = run_tasks(lm, tasks, limit=args.limit, num_fewshot=args.num_fewshot,
                            log_samples=args.log_samples, seed=args.seed)
        seconds = time.perf_counter() - start
        if model.is_main:
            _report(results, model, lm, seconds, args, parallel_sizes())
    finally:
        destroy_distributed()
    return 0


def _report(results: dict, model, lm, seconds: float, args, layout: dict) -> None:
    from lm_eval.utils import make_table

    from engine.files import write_atomic

    speed = {"seconds": seconds, "requests": lm.requests,
             "requests_per_s": lm.requests / seconds if seconds else None,
             "tokens_per_s": model.scorer.tokens_scored / seconds if seconds else None}
    print(make_table(results))
    print(f"{lm.requests} requests, {model.scorer.tokens_scored:,} tokens in {seconds:.1f} s: "
          f"{speed['requests_per_s']:.1f} requests/s, {speed['tokens_per_s']:,.0f} tokens/s "
          f"(tp={args.tp} pp={args.pp}, batch {args.batch_size})")
    if not args.out:
        return
    out = Path(args.out)
    samples = results.pop("samples", None) or {}
    summary = {k: results[k] for k in ("results", "groups", "configs", "versions", "n-shot",
                                       "higher_is_better", "n-samples") if k in results}
    summary["engine"] = {"checkpoint": str(model.path), "layout": layout,
                         "batch_size": args.batch_size, "limit": args.limit, **speed}
    write_atomic(out / "results.json", json.dumps(summary, indent=1, default=str) + "\n")
    for task, rows in samples.items():
        write_atomic(out / f"samples_{task}.jsonl",
                     "".join(json.dumps(r, default=str) + "\n" for r in rows))
    print(f"results: {out / 'results.json'}")


def generate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine generate", description=(
        "Continue a prompt with an engine checkpoint: greedy, or top-p sampling."))
    _layout_flags(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default: greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from engine.distributed import destroy_distributed
    from engine.eval.generate import Sampling, generate

    try:
        model = _load(args, 1)
        tokens = generate(model.scorer, model.tokenizer, args.prompt,
                          max_new_tokens=args.max_new_tokens,
                          sampling=Sampling(top_p=args.top_p, temperature=args.temperature,
                                            seed=args.seed))
        if model.is_main:
            print(args.prompt + model.tokenizer.decode(tokens))
    finally:
        destroy_distributed()
    return 0


def tasks_build_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine tasks build next-line", description=(
        "A next-line multiple-choice task (lm-eval YAML + JSON lines) from held-out documents: "
        "k lines of context, the true next line among lines of the same document."))
    p.add_argument("--input", required=True, nargs="+", help=".jsonl or .txt documents")
    p.add_argument("--name", required=True, help="task name (also the file names)")
    p.add_argument("--out", required=True, help="directory for NAME.jsonl and NAME.yaml")
    p.add_argument("--json-key", default="text")
    add_options(p, NextLineSpec)
    args = p.parse_args(argv)
    from engine.data.documents import check_inputs, iter_documents
    from engine.eval.tasks import next_line_docs, write_task

    spec = options_from_namespace(NextLineSpec, args)
    docs = next_line_docs(iter_documents(check_inputs(args.input), args.json_key), spec)
    if not docs:
        print(f"error: {', '.join(args.input)}: no line has {spec.context_lines} lines of context "
              f"and {spec.choices - 1} distinct other lines in its document", file=sys.stderr)
        return 2
    path = write_task(args.name, Path(args.out), docs, spec, source=", ".join(args.input))
    print(f"{path}: {len(docs)} documents, {spec.choices} choices (chance "
          f"{1 / spec.choices:.2f})")
    return 0


def _tasks_build(argv: list[str]) -> int:
    if argv and argv[0] == "passkey":
        from engine.eval.long_cli import passkey_build_main

        return passkey_build_main(argv[1:])
    if not argv or argv[0] != "next-line":
        print("usage: engine tasks build next-line --input DOCS --name NAME --out DIR\n"
              "       engine tasks build passkey --lengths 256,512 --ckpt CKPT --out DIR",
              file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return tasks_build_main(argv[1:])


def _summary(argv: list[str]) -> int:
    from engine.eval.long_cli import summary_main

    return summary_main(argv)


TASKS_COMMANDS = {"build": (_tasks_build, "write lm-eval tasks: next-line (held-out text), "
                            "passkey (long context)"),
                  "summary": (_summary, "passkey accuracy heat-maps, per-position loss curves")}


def tasks_main(argv: list[str]) -> int:
    from engine.cli import dispatch

    return dispatch("engine tasks", TASKS_COMMANDS, argv)
