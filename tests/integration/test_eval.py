"""`engine eval` against lm-evaluation-harness's own `hf` backend on the exported model: the same
per-request log-likelihoods (multiple choice and rolling) to 1e-4, the same greedy generations,
the same accuracies, for a dense and a mixture-of-experts model trained a few steps (fp32, an HF
byte-level BPE tokenizer that both backends read alike). In-training probes equal `engine eval`
on the checkpoint saved at the same step. Bad input is one line, exit 2, nothing written."""

import json

import pytest

from engine.cli import main
from engine.config.loader import recipe_from_dict
from engine.train.loop import train

pytestmark = pytest.mark.slow

TASKS = ["tiny_next_line", "tiny_rolling", "tiny_complete"]


def engine_results(ckpt, tasks_dir, *, limit=None):
    from engine.distributed import destroy_parallel_state
    from engine.eval.harness import load_tasks, run_tasks
    from engine.eval.lm import engine_lm
    from engine.eval.model import load_for_eval

    model = load_for_eval(ckpt, batch_size=4)
    try:
        lm = engine_lm(model.scorer, model.tokenizer,
                       max_length=model.recipe.model.max_position_embeddings)
        return run_tasks(lm, load_tasks(TASKS, [tasks_dir]), limit=limit, log_samples=True)
    finally:
        destroy_parallel_state()


def hf_results(hf_dir, tasks_dir, *, limit=None):
    import lm_eval

    from engine.eval.harness import load_tasks

    tasks = load_tasks(TASKS, [tasks_dir])  # the same task objects' configs
    return lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu"},
        tasks=[t.config.to_dict() for t in tasks.task_dict.values()], batch_size=4,
        limit=limit, log_samples=True, bootstrap_iters=0)


def responses(results) -> dict[str, list]:
    """{task: per document, its filtered responses}, documents in order."""
    return {task: [s["filtered_resps"] for s in sorted(rows, key=lambda s: s["doc_id"])]
            for task, rows in results["samples"].items()}


def assert_same_answers(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() == set(TASKS)
    for task in TASKS:
        assert len(ours[task]) == len(theirs[task]) > 0
        for a, b in zip(ours[task], theirs[task], strict=True):
            if task == "tiny_complete":
                assert a == b  # greedy text
                continue
            for x, y in zip(a, b, strict=True):  # (logprob, greedy) per choice, or logprob
                x, y = (x, y) if task == "tiny_rolling" else (x[0], y[0])
                # 1e-4, relative once a sum of log-probabilities exceeds 1 in size: a rolling
                # window sums hundreds of tokens (fp32 noise ~1e-7 of the sum, measured)
                assert abs(float(x) - float(y)) <= 1e-4 * max(1.0, abs(float(y))), (task, x, y)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_engine_backend_equals_the_hf_backend(eval_models, hf_tiny_data, kind):
    ckpt, hf = eval_models[kind]
    ours = engine_results(ckpt, hf_tiny_data["tasks"])
    theirs = hf_results(hf, hf_tiny_data["tasks"])
    assert_same_answers(responses(ours), responses(theirs))
    for task in TASKS:
        for metric, value in theirs["results"][task].items():
            if metric.endswith("_stderr,none") or not isinstance(value, (int, float)):
                continue
            assert ours["results"][task][metric] == pytest.approx(value, rel=1e-5), (task, metric)


def test_eval_command_writes_results_and_samples(eval_models, hf_tiny_data, tmp_path, capsys):
    ckpt, _ = eval_models["dense"]
    out = tmp_path / "eval"
    assert main(["eval", "--ckpt", str(ckpt), "--tasks", "tiny_next_line", "--include-path",
                 hf_tiny_data["tasks"], "--limit", "8", "--out", str(out), "--log-samples"]) == 0
    printed = capsys.readouterr().out
    assert "tiny_next_line" in printed and "requests/s" in printed and "tokens/s" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["n-samples"]["tiny_next_line"]["effective"] == 8
    assert results["engine"]["requests"] == 8 * 4 and results["engine"]["tokens_per_s"] > 0
    assert len((out / "samples_tiny_next_line.jsonl").read_text().splitlines()) == 8


def test_probes_in_training_equal_engine_eval_on_the_saved_checkpoint(
        hf_recipe, hf_tiny_data, tmp_path):
    r = hf_recipe(tmp_path / "probed")
    r["train"].update(eval_interval=2, eval_steps=1)
    r["checkpoint"]["save_interval"] = 2
    r["logging"]["tensorboard_dir"] = str(tmp_path / "tb")
    r["eval"] = {"tasks": ["tiny_next_line"], "limit": 12,
                 "include_path": hf_tiny_data["tasks"]}
    result = train(recipe_from_dict(r))
    assert sorted(result.tasks) == [2, 4]
    from engine.distributed import destroy_parallel_state
    from engine.eval.harness import load_tasks, run_tasks, task_metrics
    from engine.eval.lm import engine_lm
    from engine.eval.model import load_for_eval

    model = load_for_eval(tmp_path / "probed" / "iter_0000002")
    try:
        lm = engine_lm(model.scorer, model.tokenizer, max_length=512)
        again = task_metrics(run_tasks(lm, load_tasks(["tiny_next_line"],
                                                      [hf_tiny_data["tasks"]]), limit=12))
    finally:
        destroy_parallel_state()
    assert again == result.tasks[2]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("tasks/tiny_next_line/acc")}
    assert logged == {s: pytest.approx(result.tasks[s]["tiny_next_line"]["acc"]) for s in (2, 4)}


@pytest.mark.parametrize("args, message", [
    (["--tasks", "no_such_task"], "unknown task 'no_such_task'; local tasks: "),
    (["--tasks", "tiny_next_line", "--tp", "3"],
     "parallel.tp=3 must divide model.num_attention_heads=4"),
    (["--tasks", "tiny_next_line", "--tokenizer-type", "hf", "--tokenizer", "TOK"],
     "has 300 tokens but the model's vocabulary is model.vocab_size=512"),
])
def test_bad_input_is_one_line_and_exit_2(eval_models, hf_tiny_data, tiny_data, bpe_tokenizer,
                                          tmp_path, capsys, args, message):
    ckpt, _ = eval_models["dense"]
    if "TOK" in args:
        other = bpe_tokenizer(tiny_data["dir"] / "code-train.jsonl", tmp_path / "tok", 300)
        args = [str(other) if a == "TOK" else a for a in args]
    code = main(["eval", "--ckpt", str(ckpt), "--include-path", hf_tiny_data["tasks"],
                 "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and message in err[-1], err
    assert not (tmp_path / "out").exists()


def test_a_task_file_without_a_field_is_named(hf_tiny_data, tmp_path):
    from engine.config.errors import ConfigError
    from engine.eval.harness import load_tasks

    bad = tmp_path / "tasks"
    bad.mkdir()
    (bad / "broken.yaml").write_text("task: broken\ndataset_path: json\noutput_type: "
                                     "multiple_choice\ndoc_to_text: x\ndoc_to_target: 0\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: task 'broken' has no 'doc_to_choice'"):
        load_tasks(["broken"], [bad])
