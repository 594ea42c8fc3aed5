"""A 2-ratio sweep end to end (engine.pipeline.sweep, engine analyze cmr): pretrain on code,
continue on a new domain (arithmetic text, same tokenizer) with 25% and 50% code replay at equal
tokens, each member logging both validation losses at 51 points from step 0; then `engine
analyze cmr` on the sweep's directory writes cmr.json with both ratios and either a critical
ratio or "none feasible", and cmr.png."""

import json
import os
import random
import subprocess
import sys

import pytest
import yaml

from engine.analyze.runs import open_run
from engine.pipeline.config import load_pipeline
from engine.pipeline.stages import done

pytestmark = pytest.mark.slow  # a pretraining and two 50-step members, ~2 min on 2 cores


@pytest.fixture(scope="module")
def arithmetic(tiny_data, tmp_path_factory):
    """A domain the code tokenizer can read: lines of sums, as .bin/.idx (train and valid)."""
    from engine.data.preprocess import preprocess
    from engine.data.tokenizer import load_tokenizer

    out = tmp_path_factory.mktemp("arith")
    tok = load_tokenizer("sentencepiece", tiny_data["tokenizer"])
    rng = random.Random(0)
    for split, docs in (("train", 400), ("valid", 40)):
        with open(out / f"arith-{split}.jsonl", "w") as f:
            for _ in range(docs):
                lines = []
                for _ in range(20):
                    a, b = rng.randrange(1000), rng.randrange(1000)
                    lines.append(f"{a} + {b} = {a + b}")
                f.write(json.dumps({"text": "\n".join(lines)}) + "\n")
        preprocess([str(out / f"arith-{split}.jsonl")], str(out / f"arith-{split}"), tok,
                   progress=False)
    return out


def test_a_two_ratio_sweep_and_its_critical_ratio(tmp_path, make_recipe, tiny_data, arithmetic):
    base = make_recipe(train={"steps": 30, "eval_steps": 1},
                       data={"valid": {"code": tiny_data["valid"],
                                       "arith": str(arithmetic / "arith-valid")}})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    pipe = {"name": "sweep", "out": str(tmp_path / "run"), "recipe": str(tmp_path / "base.yaml"),
            "stages": [
                {"name": "pretrain", "kind": "train"},
                {"name": "ratios", "kind": "sweep", "source": "pretrain", "overrides": {
                    "data.blend": [{"path": str(arithmetic / "arith-train"), "weight": 1.0,
                                    "name": "arith"}],
                    "data.replay": {"blend": [{"path": tiny_data["train"], "weight": 1.0,
                                               "name": "code"}]},
                    "train": {"steps": 50, "eval_interval": 1, "eval_interval_early": 1,
                              "eval_early_steps": 1},
                    "optim.lr": 3e-3},
                 "sweep": {"key": "data.replay.fraction", "values": [0.25, 0.5]}}]}
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(pipe, sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "engine", "pipeline", "run", str(path),
                          "--no-report"], capture_output=True, text=True, env=env, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    p = load_pipeline(path)
    assert done(p, p.stage("ratios"))
    members = sorted((tmp_path / "run" / "ratios").iterdir())
    assert [m.name for m in members if m.is_dir()] == ["fraction-0.25", "fraction-0.5"]
    for m in members:
        if m.is_dir():
            points = open_run(m).valid("code")
            assert [s for s, _ in points] == list(range(51))  # step 0 and every step

    out = tmp_path / "cmr"
    cmr = subprocess.run([sys.executable, "-m", "engine", "analyze", "cmr",
                          str(tmp_path / "run" / "ratios"), "--domain", "arith", "--general",
                          "code", "--replicates", "20", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert cmr.returncode == 0, cmr.stdout[-3000:] + cmr.stderr[-3000:]
    report = json.loads((out / "cmr.json").read_text())
    assert sorted(r["ratio"] for r in report["runs"]) == [0.5, 0.75]
    assert all(r["domain_end"] < 0 for r in report["runs"])  # the new domain was learned
    if report["critical_ratio"] is None:
        assert report["verdict"].startswith("none feasible") and "none feasible" in cmr.stdout
    else:
        assert report["critical_ratio"] in (0.5, 0.75)
        assert report["verdict"].startswith("critical ratio ")
    assert report["png"] is None or (out / "cmr.png").is_file()
