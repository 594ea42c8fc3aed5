"""Chaos harness: kill a torchrun training run at random moments, restart the same command each
time, and check that nothing was lost.

    python tests/chaos.py --layout tp2 --kills 20 --seed 1 --out /tmp/chaos

The tiny recipe (4-layer Llama on Python's standard library, 2 processes: `tp2` = tensor
parallel 2, `dp2` = data parallel 2 with the distributed optimizer) runs once uninterrupted,
then again under attack: each attempt is killed, by a seeded choice, either at a random moment
of a random training step (SIGKILL to one rank, or to every process of the run) or inside a
checkpoint save (ENGINE_FAULT_SAVE_PAUSE holds every save between its last file and the
tracker; the harness kills there). The same command is started again after each kill until the
run completes. Then the whole TensorBoard loss curve (every step exactly once) and the final
weights must equal the uninterrupted run's, bit for bit; no `.partial` directory and no process
of ours may remain. Prints a table of the kills and writes `chaos.json`; exits 1 on any
difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "tp2": {"parallel": {"tp": 2, "sequence_parallel": True}},
    "dp2": {"parallel": {"tp": 1, "distributed_optimizer": True}},
}


def build_data(out: Path) -> dict:
    """The stdlib corpus, a 512-piece sentencepiece BPE, .bin/.idx (kept between calls)."""
    from engine.data.corpus import build_stdlib_corpus
    from engine.data.preprocess import preprocess
    from engine.data.tokenizer import load_tokenizer, train_sentencepiece

    if not (out / "code-train.idx").is_file():
        out.mkdir(parents=True, exist_ok=True)
        build_stdlib_corpus(out, max_bytes=600_000)
        model = train_sentencepiece([str(out / "code-train.jsonl")], str(out / "tok"), 512)
        tok = load_tokenizer("sentencepiece", model)
        for split in ("train", "valid"):
            preprocess([str(out / f"code-{split}.jsonl")], str(out / f"code-{split}"), tok,
                       progress=False)
    return {"train": str(out / "code-train"), "valid": str(out / "code-valid"),
            "tokenizer": str(out / "tok.model")}


def write_recipe(path: Path, data: dict, layout: str, run: Path, steps: int) -> Path:
    recipe = {
        "model": {"num_layers": 4, "hidden_size": 64, "ffn_hidden_size": 128,
                  "num_attention_heads": 4, "num_query_groups": 2,
                  "max_position_embeddings": 64},
        "parallel": LAYOUTS[layout]["parallel"],
        "data": {"blend": [{"path": data["train"], "weight": 1.0}],
                 "valid": {"code": data["valid"]}, "seq_length": 64},
        "tokenizer": {"type": "sentencepiece", "path": data["tokenizer"]},
        "train": {"steps": steps, "micro_batch_size": 4, "global_batch_size": 32, "seed": 7,
                  "eval_interval": 4, "eval_steps": 1,
                  "schedule": {"style": "cosine", "warmup_steps": 2, "min_lr": 1e-4}},
        "optim": {"lr": 3e-3},
        "checkpoint": {"save": str(run / "ckpt"), "save_interval": 2, "keep_last": 2},
        "logging": {"log_interval": 1, "tensorboard_dir": str(run / "tb")},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def command(recipe: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", "-m", "engine", "train", "--config", str(recipe)]


def environment(mark: str, pause: float) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1",
            "ENGINE_CHAOS_MARK": mark, "ENGINE_FAULT_SAVE_PAUSE": str(pause)}


def ours(mark: str) -> list[int]:
    """Pids of live processes whose environment carries the run's mark."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"ENGINE_CHAOS_MARK={mark}".encode() in (proc / "environ").read_bytes():
                if (proc / "stat").read_text().split()[2] != "Z":
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


def workers(mark: str, launcher: int) -> list[int]:
    return [p for p in ours(mark) if p != launcher and _parent(p) == launcher]


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Whether `pattern` appears in the log before the run ends or the timeout."""
    end = time.time() + timeout
    regex = re.compile(pattern, re.M)
    while time.time() < end and proc.poll() is None:
        if log.is_file() and regex.search(log.read_text(errors="replace")):
            return True
        time.sleep(0.05)
    return False


def attack(recipe: Path, run: Path, rng: random.Random, kills: int, steps: int, mark: str,
           pause: float) -> list[dict]:
    """Kill the run `kills` times, restarting it each time; then let it finish."""
    record, attempt, kinds = [], 0, []
    while True:
        log = run / f"attempt-{attempt}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(command(recipe), stdout=out, stderr=subprocess.STDOUT,
                                    env=environment(mark, pause), cwd=ROOT,
                                    start_new_session=True)
        if len(record) < kills:
            done = _latest(run)
            if len(record) % 3 == 0:  # every 3 kills cover each kind once, in a seeded order
                kinds = ["one rank mid-step", "all ranks mid-step", "inside a save"]
                rng.shuffle(kinds)
            kind = kinds[len(record) % 3]
            if kind == "inside a save":
                hit = wait_for(log, r"pausing .* before the tracker", proc, 300)
            else:
                step = rng.randint(done + 1, max(done + 1, steps - 2))  # room to be killed in
                hit = wait_for(log, rf"^step {step}/", proc, 300)
                time.sleep(rng.uniform(0.0, 0.3))  # somewhere inside the next step (~0.5 s)
            if hit and proc.poll() is None:
                if kind == "one rank mid-step":
                    victims = workers(mark, proc.pid)
                    if victims:
                        os.kill(rng.choice(victims), signal.SIGKILL)
                else:  # torchrun starts its workers in sessions of their own: every pid
                    for pid in ours(mark):
                        os.kill(pid, signal.SIGKILL)
                record.append({"attempt": attempt, "kind": kind, "resumed_at": done,
                               "checkpoint_after": None})
        code = proc.wait(timeout=600)
        _reap(mark)
        if record and record[-1]["attempt"] == attempt:
            record[-1]["checkpoint_after"] = _latest(run)
        elif code == 0:
            return record
        else:
            raise RuntimeError(f"attempt {attempt} failed without a kill (exit {code}):\n"
                               + log.read_text()[-3000:])
        attempt += 1


def _latest(run: Path) -> int:
    tracker = run / "ckpt" / "latest_checkpointed_iteration.txt"
    return int(tracker.read_text()) if tracker.is_file() else 0


def _reap(mark: str, timeout: float = 30) -> None:
    """Wait for the run's processes to go; what remains after `timeout` is an error."""
    end = time.time() + timeout
    while ours(mark) and time.time() < end:
        time.sleep(0.2)
    left = ours(mark)
    named = {pid: _describe(pid) for pid in left}  # before the kill: what they were
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    if left:
        raise RuntimeError(f"processes of the run outlived it: {named}")


def _describe(pid: int) -> str:
    """`pid`'s command line, parent and state, for the report of a process left behind."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
        return f"{cmd.strip()} (state {state[0]}, parent {state[1]})"
    except OSError:
        return "gone"


def losses(tb: Path) -> tuple[dict[int, float], dict[int, int]]:
    """(the last loss logged for each step, how many times each step appears)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("train/loss")
    by_step: dict[int, list[float]] = {}
    for e in events:
        by_step.setdefault(e.step, []).append(e.value)
    return {s: v[-1] for s, v in by_step.items()}, {s: len(v) for s, v in by_step.items()}


def weights(ckpt: Path) -> dict:
    from engine.checkpoint.unsharded import read_unsharded

    return read_unsharded(ckpt).state


def compare(reference: Path, chaos: Path, steps: int) -> list[str]:
    from engine.checkpoint import find_checkpoint

    problems = []
    ref, _ = losses(reference / "tb")
    got, counts = losses(chaos / "tb")
    if sorted(got) != list(range(1, steps + 1)):
        problems.append(f"steps logged: {sorted(got)}")
    repeated = {s: n for s, n in counts.items() if n > 1}
    if repeated:
        problems.append(f"steps logged more than once: {repeated}")
    differ = [s for s in ref if got.get(s) != ref[s]]
    if differ:
        problems.append(f"losses differ at steps {differ}")
    a = weights(find_checkpoint(reference / "ckpt"))
    b = weights(find_checkpoint(chaos / "ckpt"))
    bad = [k for k in a if k not in b or not (a[k] == b[k]).all()]
    if bad or a.keys() != b.keys():
        problems.append(f"final weights differ: {bad[:3]}")
    partial = sorted(p.name for p in (chaos / "ckpt").glob("*.partial"))
    if partial:
        problems.append(f"partial checkpoints left: {partial}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layout", choices=sorted(LAYOUTS), default="tp2")
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--pause", type=float, default=1.0, help="seconds each save waits")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    out = Path(args.out)
    data = build_data(out / "data")
    start = time.time()
    reference, chaos = out / f"reference-{args.layout}", out / f"chaos-{args.layout}"
    for run in (reference, chaos):
        run.mkdir(parents=True, exist_ok=True)
    if not (reference / "ckpt" / "latest_checkpointed_iteration.txt").is_file():
        subprocess.run(command(write_recipe(reference / "r.yaml", data, args.layout, reference,
                                            args.steps)),
                       env=environment("reference", 0), cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    recipe = write_recipe(chaos / "r.yaml", data, args.layout, chaos, args.steps)
    mark = f"chaos-{os.getpid()}-{args.seed}"
    record = attack(recipe, chaos, random.Random(args.seed), args.kills, args.steps, mark,
                    args.pause)
    problems = compare(reference, chaos, args.steps)
    if len(record) < args.kills:
        problems.append(f"only {len(record)} of {args.kills} kills landed before the run ended")
    result = {"layout": args.layout, "kills": record, "problems": problems,
              "seconds": round(time.time() - start, 1)}
    (out / f"chaos-{args.layout}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'attempt':>7} | {'kill':<20} | resumed from | checkpoint after")
    for r in record:
        print(f"{r['attempt']:>7} | {r['kind']:<20} | step {r['resumed_at']:<7} | "
              f"step {r['checkpoint_after']}")
    print("identical to the uninterrupted run" if not problems else "\n".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
