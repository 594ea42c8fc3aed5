"""Long-context commands: `engine tasks build passkey`, `engine eval --per-position`, and
`engine tasks summary passkey|per-position`. Argument parsing, files and console around
engine.eval.passkey and engine.eval.long_context; rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.eval.passkey import PasskeySpec
from engine.options import add_options, options_from_namespace


def _numbers(kind: type, text: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") \
            from None


def _tokenizer(args):
    """The tokenizer of --tokenizer-type/--tokenizer, else the one --ckpt's recipe names."""
    from engine.data.tokenizer import load_tokenizer

    if args.tokenizer:
        return load_tokenizer(args.tokenizer_type or "sentencepiece", args.tokenizer), \
            args.tokenizer
    if not args.ckpt:
        raise SystemExit("engine tasks build passkey: give --ckpt or --tokenizer (the prompts "
                         "are sized in the model's tokens)")
    from engine.checkpoint.unsharded import read_recipe
    from engine.eval.model import eval_tokenizer

    path, recipe = read_recipe(args.ckpt)
    return eval_tokenizer(recipe, str(path)), recipe.tokenizer.path


def passkey_build_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine tasks build passkey", description=(
        "Passkey retrieval tasks (Mohtashami & Jaggi 2023): one lm-eval task per (length, "
        "depth), prompts of at most LENGTH tokens of the model's tokenizer with a 5-digit key "
        "after a fraction DEPTH of the filler."))
    p.add_argument("--lengths", required=True, type=lambda t: _numbers(int, t),
                   help="prompt lengths in tokens, e.g. 256,512,1024")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1", type=lambda t: _numbers(float, t),
                   help="where the key sits in the filler, 0 (start) .. 1 (end)")
    p.add_argument("--out", required=True, help="directory for the task YAMLs and JSON lines")
    p.add_argument("--ckpt", help="take the tokenizer from this checkpoint's recipe")
    p.add_argument("--tokenizer-type", choices=("sentencepiece", "hf"))
    p.add_argument("--tokenizer", help="tokenizer file or directory (instead of --ckpt)")
    add_options(p, PasskeySpec)
    args = p.parse_args(argv)
    from engine.eval.passkey import write_passkey_tasks

    spec = options_from_namespace(PasskeySpec, args)
    tokenizer, source = _tokenizer(args)
    try:
        names = write_passkey_tasks(Path(args.out), tokenizer.encode, args.lengths,
                                    args.depths, spec, source=str(source))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {len(names)} tasks x {spec.samples} prompts")
    print(f"run: engine eval --ckpt CKPT --include-path {args.out} --tasks 'passkey_*' "
          f"--out RESULTS")
    return 0


def add_per_position_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--per-position", metavar="DATA", help=(
        "loss by position bucket on long held-out documents instead of tasks: a .bin/.idx "
        "prefix or .jsonl/.txt files (tokenized with the model's tokenizer)"))
    p.add_argument("--seq-length", type=int,
                   help="--per-position: positions per document (default: the model's context)")
    p.add_argument("--documents", type=int, default=32,
                   help="--per-position: documents to average over (those long enough)")
    p.add_argument("--buckets", type=int, default=16, help="--per-position: position buckets")
    p.add_argument("--max-length", type=int,
                   help="longest input (default: model.max_position_embeddings, or "
                        "data.seq_length when longer)")


def _documents(data: str, tokenizer):
    """Token lists of the documents of a dataset prefix, or of .jsonl/.txt files."""
    if Path(f"{data}.idx").is_file():
        import numpy as np
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from engine.data.datasets import inspect_indexed_dataset

        inspect_indexed_dataset(data)
        index = IndexedDataset(data)
        bounds = index.document_indices
        for d in range(len(bounds) - 1):
            yield np.concatenate([index[i] for i in range(bounds[d], bounds[d + 1])])
        return
    from engine.data.documents import iter_documents

    for text in iter_documents([data]):
        yield tokenizer.encode(text)


def per_position_main(args, model) -> dict | None:
    """`engine eval --per-position`: the report on rank 0 (JSON and PNG under --out), else
    None. Every rank scores the same rows (the scorer spreads them over replicas)."""
    import numpy as np

    from engine.data import DataError
    from engine.eval.long_context import long_rows, per_position_report, plot_positions

    seq = args.seq_length or model.scorer.max_length
    if seq > model.scorer.max_length:
        raise DataError(f"--seq-length={seq} exceeds the model's context "
                        f"{model.scorer.max_length} (--max-length to allow more)")
    rows = long_rows(_documents(args.per_position, model.tokenizer), seq, args.documents)
    if not rows:
        raise DataError(f"{args.per_position}: no document has seq_length + 1 = {seq + 1} tokens")
    losses = np.array(model.scorer.token_losses(rows))
    report = per_position_report(losses, args.buckets, checkpoint=str(model.path),
                                 data=args.per_position, seq_length=seq)
    if not model.is_main:
        return None
    from engine.eval.long_context import format_positions

    print(format_positions({Path(str(model.path)).name: report}))
    print(f"{report['documents']} documents of {seq + 1} tokens")
    if args.out:
        from engine.files import write_atomic

        out = Path(args.out)
        write_atomic(out / "per_position.json", json.dumps(report, indent=1) + "\n")
        png = plot_positions({Path(str(model.path)).name: report}, out / "per_position.png")
        print(f"results: {out / 'per_position.json'}" + (f", {png}" if png else ""))
    return report


def _labelled(paths: list[str], labels: str | None) -> dict[str, dict]:
    names = labels.split(",") if labels else [Path(p).parent.name or p for p in paths]
    if len(names) != len(paths):
        raise SystemExit(f"--labels: {len(names)} labels for {len(paths)} files")
    return {n: json.loads(Path(p).read_text()) for n, p in zip(names, paths, strict=True)}


def summary_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine tasks summary", description=(
        "Tables and figures of long-context evaluations: `passkey` reads engine eval's "
        "results.json files (accuracy by length and depth, heat-maps), `per-position` reads "
        "engine eval --per-position's JSON files (loss curves)."))
    p.add_argument("kind", choices=("passkey", "per-position"))
    p.add_argument("files", nargs="+", help="one file per run (e.g. before and after a stage)")
    p.add_argument("--labels", help="comma-separated names of the runs (default: their dirs)")
    p.add_argument("--out", help="directory for summary JSON and PNG")
    args = p.parse_args(argv)
    from engine.eval import long_context as lc
    from engine.eval.passkey import passkey_grid

    runs = _labelled(args.files, args.labels)
    if args.kind == "passkey":
        grids = {label: passkey_grid(results) for label, results in runs.items()}
        if not any(grids.values()):
            print(f"error: {', '.join(args.files)}: no passkey_<length>_d<depth> task results",
                  file=sys.stderr)
            return 2
        print(lc.format_passkey(grids))
        summary = {label: {str(n): {str(d): a for d, a in row.items()} for n, row in g.items()}
                   for label, g in grids.items()}
        draw, name = (lambda path: lc.plot_passkey(grids, path)), "passkey"
    else:
        print(lc.format_positions(runs))
        summary = {label: {k: r[k] for k in ("starts", "ends", "loss", "documents")}
                   for label, r in runs.items()}
        draw, name = (lambda path: lc.plot_positions(runs, path)), "per_position"
    if args.out:
        from engine.files import write_atomic

        out = Path(args.out)
        write_atomic(out / f"{name}_summary.json", json.dumps(summary, indent=1) + "\n")
        png = draw(out / f"{name}.png")
        print(f"summary: {out / f'{name}_summary.json'}" + (f", {png}" if png else ""))
    return 0
