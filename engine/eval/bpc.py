"""`engine bpc`: bits per character of text under a checkpoint, the loss that compares models with
different tokenizers (a vocabulary extension changes what a token is; a character stays one).

    bpc = -sum over documents of log p(document) / (ln 2 x characters)

log p(document) is lm-eval's `loglikelihood_rolling` through the engine's backend (engine.eval.lm):
the document's tokens (the checkpoint's tokenizer, no special tokens) scored in disjoint windows
of `max_length` tokens, the first conditioned on the prefix token (BOS, else EOS), each later one
on the window before; every token of the document is predicted exactly once, so the sum is the
document's total negative log-likelihood in nats whatever the tokenizer. Characters are Python
string characters (code points). Same windows in tokens for every model: a tokenizer with fewer
tokens per character also sees more characters of context, part of what it buys.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import namedtuple
from pathlib import Path

_Request = namedtuple("_Request", "args")


def bits_per_character(lm, texts: list[str]) -> dict:
    """{documents, characters, tokens, nats, bpc, tokens_per_char} of `texts` under the lm-eval
    model `lm` (engine.eval.lm.engine_lm)."""
    totals = lm.loglikelihood_rolling([_Request((text,)) for text in texts])
    chars = sum(map(len, texts))
    tokens = sum(len(lm.tok_encode(text)) for text in texts)
    nats = -sum(totals)
    return {"documents": len(texts), "characters": chars, "tokens": tokens, "nats": nats,
            "bpc": nats / (math.log(2) * chars), "tokens_per_char": tokens / chars}


def read_documents(path: str, *, max_documents: int | None, max_chars: int | None) -> list[str]:
    """The first non-blank documents of a .jsonl/.txt file (engine.data.documents), at most
    `max_documents` and about `max_chars` characters (whole documents: the last one that starts
    under the limit is kept)."""
    from engine.data.documents import check_inputs, iter_documents

    texts, total = [], 0
    for text in iter_documents(check_inputs([path]), "text"):
        if not text.strip():
            continue
        if (max_documents is not None and len(texts) >= max_documents) or \
                (max_chars is not None and total >= max_chars):
            break
        texts.append(text)
        total += len(text)
    return texts


def bpc_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine bpc", description=(
        "Bits per character of .jsonl/.txt documents under an engine checkpoint (comparable "
        "across tokenizers); run under torchrun for a TP/PP layout."))
    p.add_argument("--ckpt", required=True, help="engine checkpoint (save dir or iter_ dir)")
    p.add_argument("--input", required=True, help=".jsonl (key `text`) or .txt documents")
    p.add_argument("--max-documents", type=int, help="at most this many documents")
    p.add_argument("--max-chars", type=int, help="stop adding documents past this many characters")
    p.add_argument("--max-length", type=int,
                   help="tokens per scored window (default: the recipe's data.seq_length)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size to run at")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to run at")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    from engine.checkpoint.unsharded import read_recipe
    from engine.distributed import destroy_distributed
    from engine.eval.lm import engine_lm
    from engine.eval.model import load_for_eval

    texts = read_documents(args.input, max_documents=args.max_documents,
                           max_chars=args.max_chars)  # a bad file fails before the model loads
    max_length = args.max_length or read_recipe(args.ckpt)[1].data.seq_length
    try:
        model = load_for_eval(args.ckpt, tp=args.tp, pp=args.pp, batch_size=args.batch_size,
                              max_length=max_length)
        lm = engine_lm(model.scorer, model.tokenizer, max_length=max_length)
        figures = {"checkpoint": str(model.path), "input": args.input, "max_length": max_length,
                   **bits_per_character(lm, texts), "seconds": lm.seconds}
    finally:
        destroy_distributed()
    if os.environ.get("RANK", "0") == "0":
        print(f"{args.input} under {figures['checkpoint']}: bpc {figures['bpc']:.4f} | "
              f"{figures['nats']:.1f} nats over {figures['characters']:,} characters "
              f"({figures['documents']} documents, {figures['tokens']:,} tokens, "
              f"{figures['tokens_per_char']:.4f} tokens/char) | {figures['seconds']:.0f} s")
        if args.json:
            from engine.files import write_atomic

            write_atomic(Path(args.json), json.dumps(figures, indent=1) + "\n")
    return 0
