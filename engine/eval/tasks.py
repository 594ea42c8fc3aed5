"""Offline probe tasks from held-out text: `engine tasks build next-line`.

Next-line cloze (a multiple-choice task, scored by lm-eval's log-likelihood of each choice): the
context is `context_lines` consecutive non-empty lines of a held-out document, the choices are
the line that really follows and `choices - 1` other lines of the same document, all distinct
(compared without surrounding whitespace), drawn among the lines within 3/4 .. 4/3 of the true
one's length where the document has enough (so that a model that prefers short or long answers
is not rewarded: the true line is then the shortest of the four in 17-18% of the documents), and
shuffled. Chance level is 1 / choices, written into the task's metadata. Deterministic: the same
documents and seed give the same task, byte for byte.

`next_line_docs` is the pure part (documents in, task documents out); `write_task` writes the
documents as JSON lines and the lm-eval task YAML beside them (`dataset_path: json`), each
through a temporary file.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from engine.files import write_atomic


@dataclass(frozen=True, kw_only=True, slots=True)
class NextLineSpec:
    context_lines: int = 4
    """Lines of context before the line to choose."""
    choices: int = 4
    """Candidate next lines: the true one and choices - 1 others from the same document."""
    samples: int = 200
    """Task documents to draw (fewer when the text has fewer usable positions)."""
    min_chars: int = 8
    """Lines shorter than this (stripped) are neither the answer nor a distractor."""
    seed: int = 0


def _usable(line: str, min_chars: int) -> bool:
    return len(line.strip()) >= min_chars


def next_line_docs(documents: Iterable[str], spec: NextLineSpec) -> list[dict]:
    """Task documents {"context", "choices", "label", "doc"} from `documents` (texts)."""
    rng = random.Random(spec.seed)
    positions = []  # (document index, index of the true next line) with enough context
    docs = []
    for d, text in enumerate(documents):
        lines = [line for line in text.split("\n") if line.strip()]
        docs.append(lines)
        candidates = {line.strip() for line in lines if _usable(line, spec.min_chars)}
        if len(candidates) < spec.choices:
            continue
        positions += [(d, i) for i in range(spec.context_lines, len(lines))
                      if _usable(lines[i], spec.min_chars)]
    rng.shuffle(positions)
    out = []
    for d, i in positions:
        if len(out) == spec.samples:
            break
        lines = docs[d]
        true = lines[i]
        others = sorted({line.strip(): line for line in lines
                         if _usable(line, spec.min_chars) and line.strip() != true.strip()
                         }.values())
        if len(others) < spec.choices - 1:
            continue
        # distractors of about the true line's length (within 3/4 .. 4/3 of it where the
        # document has enough), so that length alone does not tell the answer
        near = [line for line in others if 0.75 <= len(line) / len(true) <= 4 / 3]
        pool = near if len(near) >= spec.choices - 1 else others
        choices = [true] + rng.sample(pool, spec.choices - 1)
        rng.shuffle(choices)
        out.append({"context": "\n".join(lines[i - spec.context_lines:i]), "choices": choices,
                    "label": choices.index(true), "doc": d})
    return out


def task_config(name: str, data_file: str, spec: NextLineSpec, *, source: str) -> dict:
    """The lm-eval task YAML of a next-line task stored in `data_file` (a path relative to the
    YAML's directory, as engine.eval.harness reads it)."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": data_file}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": "\n",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1, "chance": 1 / spec.choices, "source": source,
                     "built_by": f"engine tasks build next-line (context_lines="
                                 f"{spec.context_lines}, choices={spec.choices}, "
                                 f"seed={spec.seed})"},
    }


def write_task(name: str, out: Path, docs: list[dict], spec: NextLineSpec, *,
               source: str) -> Path:
    """out/<name>.jsonl and out/<name>.yaml; returns the YAML's path."""
    write_atomic(out / f"{name}.jsonl",
                 "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    config = task_config(name, f"{name}.jsonl", spec, source=source)
    return write_atomic(out / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False,
                                                             allow_unicode=True))
