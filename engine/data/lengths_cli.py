"""`engine data split-length` and `engine data lengths`: argument parsing and console output
around engine.data.lengths (length-aware blends for long-context stages)."""

from __future__ import annotations

import argparse
import json
import sys

from engine.data import DataError


def split_length_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine data split-length", description=(
        "Split a .bin/.idx dataset by document length: documents of at least --min-tokens "
        "tokens to --long, the others to --short (list both in a blend, the long part with the "
        "weight that up-samples it; Fu et al. 2024 per-source length up-sampling)."))
    p.add_argument("--input", required=True, help="dataset prefix (PREFIX.bin/.idx)")
    p.add_argument("--min-tokens", type=int, required=True,
                   help="documents this long or longer (eod included) are long")
    p.add_argument("--long", required=True, help="output prefix of the long documents")
    p.add_argument("--short", required=True, help="output prefix of the other documents")
    args = p.parse_args(argv)
    from engine.data.lengths import split_by_length

    try:
        s = split_by_length(args.input, args.min_tokens, args.long, args.short)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    total = s.long_tokens + s.short_tokens
    print(f"{args.long}: {s.long_documents:,} documents, {s.long_tokens:,} tokens "
          f"({100 * s.long_tokens / max(total, 1):.1f}% of the tokens)")
    print(f"{args.short}: {s.short_documents:,} documents, {s.short_tokens:,} tokens")
    return 0


def lengths_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine data lengths", description=(
        "Length histograms of a recipe's training blend: each file's tokens by document length, "
        "and the first --samples training samples' tokens by the length of their document's "
        "piece in the sample (what the blend achieves at data.seq_length)."))
    p.add_argument("--config", required=True, action="append",
                   help="recipe YAML; repeat to merge, later files win")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_length=1024")
    p.add_argument("--samples", type=int, default=1000, help="training samples to read")
    p.add_argument("--json", help="also write the histograms to this JSON file")
    args = p.parse_args(argv)
    from engine.config.loader import load_recipe

    try:
        report = length_report(load_recipe(args.config, args.overrides), args.samples)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from engine.data.lengths import format_histogram

    print(format_histogram(report["edges"], {**report["files"], "drawn": report["drawn"]}))
    print(f"drawn: the first {report['samples']} samples of seq_length {report['seq_length']} "
          "(domain blend; replay not included)")
    if args.json:
        from engine.files import write_atomic

        write_atomic(args.json, json.dumps(report, indent=1) + "\n")
    return 0


def length_report(recipe, samples: int) -> dict:
    """{edges, labels, files: {source: histogram}, drawn: histogram, samples, seq_length}: the
    blend's files by document length and its first `samples` training samples by piece length.
    The blend is built with the recipe's seed and its full run's sample count, so the samples
    are those the run draws first (at one data-parallel rank group: order does not depend on
    the layout)."""
    import numpy as np

    from engine.config.recipe import source_name
    from engine.config.validate import validate
    from engine.data.datasets import build_datasets
    from engine.data.lengths import (
        bucket_edges,
        bucket_labels,
        context_histogram,
        document_histogram,
        document_lengths,
    )
    from engine.data.tokenizer import load_tokenizer

    data, train = recipe.data, recipe.train
    if recipe.tokenizer.type == "none" or data.synthetic:
        raise DataError("engine data lengths needs documents and the tokenizer's eod "
                        "(data.synthetic is true or tokenizer.type is none)")
    par = recipe.parallel
    layout = validate(recipe, par.tp * par.pp * par.cp * (par.dp or 1))
    replay = data.replay.samples_per_batch(layout.global_batch_size) if data.replay else 0
    tok = load_tokenizer(recipe.tokenizer.type, recipe.tokenizer.path)
    edges = bucket_edges(data.seq_length)
    files = {source_name(b): document_histogram(document_lengths(b.path), edges)
             for b in data.blend}
    total = max(train.steps * (layout.global_batch_size - replay), samples)
    blend, _ = build_datasets(blend=[(b.path, b.weight) for b in data.blend], valid={},
                              tokenizer=tok, seq_length=data.seq_length, seed=train.seed,
                              train_samples=total, valid_samples=None,
                              data_cache_dir=data.cache_dir)
    n = min(samples, len(blend))
    drawn = context_histogram([np.asarray(blend[i]["tokens"]) for i in range(n)], tok.eod,
                              edges)
    return {"edges": edges, "labels": bucket_labels(edges), "files": files, "drawn": drawn,
            "samples": n, "seq_length": data.seq_length}
