"""lm-evaluation-harness glue: which tasks exist, loading them once, running them on a model,
and the figures a training run logs.

Tasks are lm-eval task YAMLs: the engine's under configs/tasks/ (offline: `dataset_path: json`
with local `data_files`, written by `engine tasks build`), any `--include-path` directory, and
lm-eval's own registry (those run when their data is in the local HF datasets cache:
HF_DATASETS_OFFLINE=1 is set, nothing is downloaded). An unknown name is one line listing the
local tasks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.config.errors import ConfigError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
TASKS_DIR = ROOT / "configs" / "tasks"
"""The engine's own task YAMLs (probe tasks from real text)."""
METRICS = ("acc", "acc_norm")
"""What a multiple-choice probe reports (lm-eval's metric names)."""


def _offline() -> None:
    # evaluation never downloads: local files, or what the datasets cache already holds
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def quiet() -> None:
    """No progress bars (lm-eval's tqdm, datasets') and only lm-eval's warnings: for the probes
    inside training, whose result is one console line, and for the ranks that do not print."""
    import logging

    os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads it for every new bar
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_warning()
    except ImportError:
        pass


def _local_tasks(paths: Sequence[Path]) -> dict[str, Path]:
    """{task name: its YAML} of the single-task YAMLs under `paths` (first one wins)."""
    import yaml

    found: dict[str, Path] = {}
    for directory in paths:
        for f in sorted(Path(directory).glob("**/*.yaml")):
            try:
                data = yaml.safe_load(f.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{f}: invalid YAML ({getattr(e, 'problem', e)})") from None
            if isinstance(data, dict) and isinstance(data.get("task"), str) and \
                    "include" not in data:
                found.setdefault(data["task"], f)
    return found


def local_task_config(path: Path) -> dict:
    """A local task YAML as lm-eval's config dict, its `data_files` made relative to the YAML's
    own directory (so configs/tasks/ works from anywhere), or one line naming the file and what
    is missing."""
    import yaml

    data = yaml.safe_load(path.read_text())
    needed = ["dataset_path", "output_type", "doc_to_text", "doc_to_target"]
    if data.get("output_type") == "multiple_choice":
        needed.append("doc_to_choice")
    for field in needed:
        if field not in data:
            raise ConfigError(f"{path}: task '{data['task']}' has no '{field}'")
    kwargs = dict(data.get("dataset_kwargs") or {})
    files = kwargs.get("data_files")
    if isinstance(files, (str, list, dict)):
        def resolve(f: str) -> str:
            full = Path(f) if Path(f).is_absolute() else (path.parent / f).resolve()
            if data["dataset_path"] == "json" and not full.is_file():
                raise ConfigError(f"{path}: task '{data['task']}' reads {full}, which does not "
                                  "exist (build it with `engine tasks build`)")
            return str(full)

        if isinstance(files, dict):
            files = {k: [resolve(f) for f in v] if isinstance(v, list) else resolve(v)
                     for k, v in files.items()}
        else:
            files = [resolve(f) for f in files] if isinstance(files, list) else resolve(files)
        kwargs["data_files"] = files
        data = {**data, "dataset_kwargs": kwargs}
    return data


def expand_task_names(names: Sequence[str], local: Sequence[str]) -> list[str]:
    """`names` with each pattern (`*`, `?`, `[...]`) replaced by the local tasks it matches, in
    sorted order (`passkey_*`: every task `engine tasks build passkey` wrote)."""
    import fnmatch

    out = []
    for name in names:
        if not any(c in name for c in "*?["):
            out.append(name)
            continue
        matched = sorted(fnmatch.filter(local, name))
        if not matched:
            raise ConfigError(f"--tasks {name}: matches no local task (configs/tasks/ and "
                              "--include-path)")
        out += matched
    return list(dict.fromkeys(out))


@dataclass
class TaskSet:
    """Named lm-eval tasks, loaded once (their documents read, their requests not yet built)."""

    names: list[str]
    task_dict: dict

    def __len__(self) -> int:
        return len(self.names)


def load_tasks(names: Sequence[str], include_paths: Sequence[str | os.PathLike] = ()
               ) -> TaskSet:
    """Resolve and load `names`: the single-task YAMLs of `include_paths` (in order), then of
    configs/tasks/ (a YAML of the same task name in an include path takes its place), then
    lm-eval's registry."""
    _offline()
    from lm_eval.tasks import TaskManager, get_task_dict

    paths = [*map(Path, include_paths), TASKS_DIR]
    for p in paths[:-1]:
        if not p.is_dir():
            raise ConfigError(f"--include-path {p}: not a directory of task YAMLs")
    local = _local_tasks(paths)
    names = expand_task_names(names, local)
    requested = [local_task_config(local[n]) if n in local else n for n in names]
    builtin = [n for n in names if n not in local]
    manager = TaskManager(include_defaults=bool(builtin))  # the registry takes seconds to index
    unknown = [n for n in builtin if n not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"unknown task '{unknown[0]}'; local tasks: {', '.join(local) or 'none'}"
                          f" (configs/tasks/ and --include-path; lm-eval's registry has "
                          f"{len(manager.all_tasks)} more)")
    try:
        task_dict = get_task_dict(requested, manager)
    except Exception as e:  # noqa: BLE001 - datasets/lm-eval raise many types for unreadable data
        raise ConfigError(f"tasks {', '.join(names)}: cannot load ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:300]})") from None
    return TaskSet(list(names), task_dict)


def run_tasks(lm, tasks: TaskSet, *, limit: int | None = None, num_fewshot: int | None = None,
              log_samples: bool = False, seed: int = 1234) -> dict:
    """lm-eval's results dict (`results`, `configs`, `n-samples`, `samples` when logged) of the
    tasks on `lm`, deterministic: fixed seeds, no bootstrap, no request cache."""
    import random

    import numpy
    import torch
    from lm_eval.evaluator import evaluate

    if num_fewshot is not None:
        for task in _leaves(tasks.task_dict):
            task.set_config(key="num_fewshot", value=num_fewshot)
    for task in _leaves(tasks.task_dict):  # the few-shot sampler's seed, as simple_evaluate sets
        task.set_fewshot_seed(seed=seed)
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    return evaluate(lm, tasks.task_dict, limit=limit, bootstrap_iters=0,
                    log_samples=log_samples, verbosity="WARNING")


def _leaves(task_dict) -> list:
    from lm_eval.api.task import Task

    out = []
    for value in task_dict.values():
        if isinstance(value, Task):
            out.append(value)
        elif isinstance(value, dict):
            out += _leaves(value)
    return out


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {acc, acc_norm, ...}} from lm-eval's results (the `,none` filter suffix dropped,
    standard errors left out)."""
    out = {}
    for task, values in results.get("results", {}).items():
        metrics = {}
        for key, value in values.items():
            name, _, _ = key.partition(",")
            if isinstance(value, (int, float)) and not name.endswith("_stderr") and \
                    name not in ("alias", "sample_len"):
                metrics[name] = float(value)
        out[task] = metrics
    return out
