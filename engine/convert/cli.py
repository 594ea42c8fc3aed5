"""`engine convert hf-to-engine | engine-to-hf | verify`: argument parsing only."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict


def _hf_to_engine(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine convert hf-to-engine", description=(
        "Import an HF model directory as an engine checkpoint (loads at any TP/PP layout) and "
        "write the recipe fragment that trains from it."))
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="new checkpoint directory")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size for the fragment")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size for the fragment")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE families)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
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
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0)
    a = p.parse_args(argv)
    from engine.convert.exporter import engine_to_hf

    print(engine_to_hf(a.ckpt, a.out, dtype=a.dtype,
                       max_shard_bytes=int(a.max_shard_size_gb * 2**30)))
    return 0


def _verify(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine convert verify", description=(
        "Run the same tokens through transformers and the engine; exit 1 beyond tolerance."))
    p.add_argument("--hf", required=True)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tol", type=float, default=1e-3, help="max |logit difference| allowed")
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args(argv)
    from engine.convert.verify import verify

    diff = verify(a.hf, a.ckpt, seq=a.seq, batch=a.batch)
    ok = diff.max_abs <= a.tol
    print(f"{diff.line()} | {'ok' if ok else f'FAILED: max_abs > tol {a.tol:g}'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**asdict(diff), "ok": ok, "tol": a.tol}, f)
    return 0 if ok else 1


COMMANDS = {"hf-to-engine": _hf_to_engine, "engine-to-hf": _engine_to_hf, "verify": _verify}


def convert_main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: engine convert {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](argv[1:])
