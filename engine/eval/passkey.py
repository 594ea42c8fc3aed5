"""Passkey retrieval tasks: `engine tasks build passkey` (Mohtashami & Jaggi 2023, "Landmark
Attention: Random-Access Infinite Context Length for Transformers", arXiv 2305.16300, §4.2).

A prompt is their template: an instruction, filler sentences ("The grass is green. The sky is
blue. ..."), the line "The pass key is K. Remember it. K is the pass key." after a fraction
`depth` of the filler, more filler, and "What is the pass key? The pass key is"; the answer is
" K" (K a random 5-digit number). Each (length, depth) is one lm-eval task `passkey_<length>_d<
depth in %>` of `samples` prompts whose context + answer is at most `length` tokens of the
model's tokenizer (filler added sentence by sentence: the longest that fits).

The tasks are `output_type: loglikelihood` with lm-eval's `acc`: whether every answer token is
the greedy choice given the prompt and the answer's earlier tokens, which is exactly whether
greedy decoding writes the key (teacher forcing changes nothing while every token is greedy); it
needs no generation length or stop strings. Deterministic: the same tokenizer, lengths, depths,
samples and seed give the same files, byte for byte.

`passkey_docs` is the pure part (an `encode` function in, documents out); `write_passkey_tasks`
writes each task's JSON lines and YAML; `passkey_grid` reads accuracies back from lm-eval's
results for the table and heat-map (engine.eval.long_context).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.files import write_atomic

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
               "memorize them. I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
NAME = re.compile(r"passkey_(\d+)_d(\d+)")


@dataclass(frozen=True, kw_only=True, slots=True)
class PasskeySpec:
    samples: int = 20
    """Prompts per (length, depth) task."""
    seed: int = 0
    """Seed of the keys."""


def task_name(length: int, depth: float) -> str:
    """passkey_<length>_d<depth in percent>, e.g. passkey_512_d25."""
    return f"passkey_{length}_d{round(depth * 100)}"


def parse_task_name(name: str) -> tuple[int, float] | None:
    """(length, depth) of a passkey task name, else None."""
    m = NAME.fullmatch(name)
    return (int(m.group(1)), int(m.group(2)) / 100) if m else None


def prompt(key: int, sentences: int, depth: float) -> tuple[str, str, str]:
    """(context, answer, the text before the key line) with `sentences` filler sentences, the
    key line after round(depth * sentences) of them."""
    before = round(depth * sentences)
    filler = [FILLER[i % len(FILLER)] for i in range(sentences)]
    head = "\n".join([INSTRUCTION, " ".join(filler[:before])])
    context = "\n".join([head, KEY_LINE.format(key=key), " ".join(filler[before:]), QUESTION])
    return context, f" {key}", head


def _fit(encode: Callable[[str], list[int]], key: int, length: int, depth: float) -> int:
    """The most filler sentences whose context + answer is at most `length` tokens."""
    def tokens(n: int) -> int:
        context, answer, _ = prompt(key, n, depth)
        return len(encode(context + answer))

    if tokens(0) > length:
        raise ValueError(f"passkey: length {length} is shorter than the prompt without filler "
                         f"({tokens(0)} tokens)")
    low, high = 0, 1
    while tokens(high) <= length:
        low, high = high, high * 2
    while high - low > 1:  # tokens(low) <= length < tokens(high)
        mid = (low + high) // 2
        low, high = (mid, high) if tokens(mid) <= length else (low, mid)
    return low


def passkey_docs(encode: Callable[[str], list[int]], length: int, depth: float,
                 spec: PasskeySpec) -> list[dict]:
    """The documents of one task: {context, target, key, tokens (context + answer), key_token
    (where the key line starts, in tokens), depth}."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey: depth {depth} is not in [0, 1]")
    rng = random.Random(f"{spec.seed}-{length}-{depth}")
    docs = []
    for _ in range(spec.samples):
        key = rng.randint(10000, 99999)
        sentences = _fit(encode, key, length, depth)
        context, answer, head = prompt(key, sentences, depth)
        docs.append({"context": context, "target": answer, "key": key,
                     "tokens": len(encode(context + answer)),
                     "key_token": len(encode(head + "\n")), "depth": depth})
    return docs


def task_config(name: str, data_file: str, *, length: int, depth: float, source: str) -> dict:
    """The lm-eval task YAML of one (length, depth) passkey task."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "test_split": "test",
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{target}}",
        "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1, "length": length, "depth": depth, "tokenizer": source,
                     "built_by": "engine tasks build passkey (Mohtashami & Jaggi 2023)"},
    }


def write_passkey_tasks(out: Path, encode: Callable[[str], list[int]], lengths: Sequence[int],
                        depths: Sequence[float], spec: PasskeySpec, *, source: str
                        ) -> list[str]:
    """out/<task>.jsonl and out/<task>.yaml for every (length, depth); returns the names."""
    names = []
    for length in lengths:
        for depth in depths:
            name = task_name(length, depth)
            docs = passkey_docs(encode, length, depth, spec)
            write_atomic(out / f"{name}.jsonl", "".join(json.dumps(d) + "\n" for d in docs))
            config = task_config(name, f"{name}.jsonl", length=length, depth=depth,
                                 source=source)
            write_atomic(out / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False))
            names.append(name)
    return names


def passkey_grid(results: dict) -> dict[int, dict[float, float]]:
    """{length: {depth: accuracy}} of the passkey tasks in lm-eval's results (results.json)."""
    grid: dict[int, dict[float, float]] = {}
    for task, metrics in results.get("results", {}).items():
        where = parse_task_name(task)
        if where is not None and "acc,none" in metrics:
            grid.setdefault(where[0], {})[where[1]] = float(metrics["acc,none"])
    return {length: dict(sorted(row.items())) for length, row in sorted(grid.items())}
