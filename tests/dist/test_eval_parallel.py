"""`engine eval` under torchrun at TP=2, PP=2 and DP=2 (the replicas share the batches) gives the
single-process answers: the same per-request log-likelihoods (to 1e-4, relative for sums), the
same greedy generations and the same accuracies, for the dense model and (TP=2 with sequence
parallelism) the mixture of experts."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main

pytestmark = [pytest.mark.dist, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TASKS = "tiny_next_line,tiny_rolling,tiny_complete"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def eval_under_torchrun(ckpt, tasks_dir, out: Path, *layout: str) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "engine",
           "eval", "--ckpt", str(ckpt), "--tasks", TASKS, "--include-path", str(tasks_dir),
           "--batch-size", "3", "--out", str(out), "--log-samples", *layout]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return read(out)


def read(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    samples = {}
    for task in TASKS.split(","):
        rows = [json.loads(line) for line in (out / f"samples_{task}.jsonl").open()]
        samples[task] = [r["filtered_resps"] for r in sorted(rows, key=lambda r: r["doc_id"])]
    return {"results": results["results"], "samples": samples, "engine": results["engine"]}


@pytest.fixture(scope="module")
def single(eval_models, hf_tiny_data, tmp_path_factory):
    out = {}
    for kind, (ckpt, _) in eval_models.items():
        target = tmp_path_factory.mktemp(f"single-{kind}")
        assert main(["eval", "--ckpt", str(ckpt), "--tasks", TASKS, "--include-path",
                     hf_tiny_data["tasks"], "--batch-size", "3", "--out", str(target),
                     "--log-samples"]) == 0
        out[kind] = read(target)
    return out


LAYOUTS = {"tp": (["--tp", "2"], (2, 2, 1, 1)), "pp": (["--pp", "2"], (2, 1, 2, 1)),
           "dp": ([], (2, 1, 1, 2))}
"""flags -> what megatron's parallel state must say ran: (world size, tp, pp, dp)"""


@pytest.mark.parametrize("kind, layout", [("dense", "tp"), ("dense", "pp"), ("dense", "dp"),
                                          ("moe", "tp")])
def test_parallel_eval_equals_one_process(eval_models, hf_tiny_data, single, tmp_path, kind,
                                          layout):
    ckpt, _ = eval_models[kind]
    flags, expected = LAYOUTS[layout]
    ours = eval_under_torchrun(ckpt, hf_tiny_data["tasks"], tmp_path / "out", *flags)
    ran = ours["engine"]["layout"]  # what megatron's parallel state says ran
    assert (ran["world_size"], ran["tp"], ran["pp"], ran["dp"]) == expected
    ref = single[kind]
    for task, docs in ref["samples"].items():
        assert len(ours["samples"][task]) == len(docs) > 0
        for a, b in zip(ours["samples"][task], docs, strict=True):
            if task == "tiny_complete":
                assert a == b, task
                continue
            for x, y in zip(a, b, strict=True):
                x, y = (x, y) if task == "tiny_rolling" else (x[0], y[0])
                assert abs(float(x) - float(y)) <= 1e-4 * max(1.0, abs(float(y))), (task, x, y)
        for metric, value in ref["results"][task].items():
            if isinstance(value, (int, float)) and "stderr" not in metric:
                assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5)
