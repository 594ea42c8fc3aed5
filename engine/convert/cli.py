"""`engine convert hf-to-engine | engine-to-hf | verify`: argument parsing only (the export and
verify flags come from `ExportOptions` / `VerifyOptions`, engine.options)."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from engine.convert.exporter import ExportOptions
from engine.convert.importer import DTYPES
from engine.convert.verify import VerifyOptions
from engine.options import add_options, options_from_namespace


def _hf_to_engine(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine convert hf-to-engine", description=(
        "Import an HF model directory as an engine checkpoint (loads at any TP/PP layout) and "
        "write the recipe fragment that trains from it."))
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="new checkpoint directory")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size for the fragment")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size for the fragment")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE families)")
    p.add_argument("--dtype", choices=tuple(DTYPES),
                   help="parameter dtype (default: the HF config's torch_dtype)")
    a = p.parse_args(argv)
    from engine.convert.importer import hf_to_engine

    out = hf_to_engine(a.hf, a.out, tp=a.tp, pp=a.pp, ep=a.ep, dtype=a.dtype)
    print(f"{out}  (train from it: --config {out}/recipe-fragment.yaml)")
    return 0


def _engine_to_hf(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine convert engine-to-hf", description=(
        "Export an engine checkpoint (any saved layout) as an HF model directory."))
    p.add_argument("--ckpt", required=True, help="checkpoint save directory or iter_ directory")
    p.add_argument("--out", required=True, help="new HF directory")
    add_options(p, ExportOptions)
    a = p.parse_args(argv)
    opts = options_from_namespace(ExportOptions, a)
    from engine.convert.exporter import engine_to_hf

    print(engine_to_hf(a.ckpt, a.out, dtype=opts.dtype,
                       max_shard_bytes=int(opts.max_shard_size_gb * 2**30)).line())
    return 0


def _verify(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine convert verify", description=(
        "Run the same tokens through transformers and the engine (fp32); exit 1 when the "
        "largest logit difference, relative to the logits' scale, exceeds the tolerance."))
    p.add_argument("--hf", required=True, help="HF model directory")
    p.add_argument("--ckpt", required=True, help="engine checkpoint (any saved layout)")
    p.add_argument("--json", help="also write the figures to this file")
    add_options(p, VerifyOptions)
    a = p.parse_args(argv)
    opts = options_from_namespace(VerifyOptions, a)
    from engine.convert.verify import verify

    diff = verify(a.hf, a.ckpt, seq=opts.seq, batch=opts.batch)
    if opts.rtol is not None:
        diff = replace(diff, rtol=opts.rtol)
    print(f"{diff.line()} | {'ok' if diff.holds else 'FAILED: max_rel > tol'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**diff.to_dict(), "ok": diff.holds}, f)
    return 0 if diff.holds else 1


COMMANDS = {
    "hf-to-engine": (_hf_to_engine, "import an HF model directory as an engine checkpoint"),
    "engine-to-hf": (_engine_to_hf, "export an engine checkpoint as an HF model directory"),
    "verify": (_verify, "compare an engine checkpoint's logits with transformers'"),
}


def convert_main(argv: list[str]) -> int:
    from engine.cli import dispatch

    return dispatch("engine convert", COMMANDS, argv)
