"""`engine pipeline submit --dry-run`: one sbatch per stage, chained on each stage's source."""

import shlex

import yaml

from engine.pipeline.cli import SLURM_SCRIPT, submit


def test_dry_run_chains_stages_on_their_sources(tmp_path, capsys):
    pipe = {"name": "es", "out": str(tmp_path / "run"), "recipe": "r.yaml", "stages": [
        {"name": "pre", "kind": "train", "sbatch": ["--nodes=2", "--partition=big"]},
        {"name": "grow", "kind": "scale_up", "source": "pre"},
        {"name": "cpt", "kind": "train", "source": "grow"},
        {"name": "rand", "kind": "train", "source": "grow", "init": "random",
         "baseline_for": "cpt"},
        {"name": "hf", "kind": "export", "source": "cpt"},
    ]}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(pipe))
    submit(str(path), ["--partition=gpu"], dry_run=True)
    lines = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    by_stage = {cmd[-1]: cmd for cmd in lines}
    assert list(by_stage) == ["pre", "grow", "cpt", "rand", "hf"]
    for cmd in lines:
        assert cmd[:2] == ["sbatch", "--parsable"] and "--partition=gpu" in cmd
        assert cmd[-3:-1] == [str(SLURM_SCRIPT), str(path)]
    deps = {s: [a for a in cmd if a.startswith("--dependency")] for s, cmd in by_stage.items()}
    assert deps == {"pre": [], "grow": ["--dependency=afterok:<pre>"],
                    "cpt": ["--dependency=afterok:<grow>"],
                    "rand": ["--dependency=afterok:<grow>"],
                    "hf": ["--dependency=afterok:<cpt>"]}
    assert f"--output={tmp_path}/run/cpt/slurm-%j.out" in by_stage["cpt"]
    # a stage's own options follow the pipeline's (sbatch: the later one wins), on its job only
    pre = by_stage["pre"]
    assert pre.index("--partition=gpu") < pre.index("--partition=big") and "--nodes=2" in pre
    assert not any(a.startswith("--nodes") for s, c in by_stage.items() if s != "pre" for a in c)
