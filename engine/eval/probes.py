"""Task probes inside training: the recipe's `eval.tasks` (lm-evaluation-harness multiple-choice
tasks) on the training model, at the steps the validation losses are evaluated.

The tasks are loaded once when the session is built (a missing task or data file stops the run
before it trains); each evaluation runs them through an `EngineLM` over the session's own model
chunks, at whatever layout it trains, with `eval.limit` documents per task, and returns lm-eval's
figures (acc, acc_norm), the same `engine eval` gives on the checkpoint saved at that step.
"""

from __future__ import annotations

from engine.config.recipe import Recipe


class TaskProbes:
    def __init__(self, recipe: Recipe, chunks: list, tokenizer):
        from engine.eval.harness import load_tasks, quiet
        from engine.eval.lm import engine_lm
        from engine.eval.scoring import Scorer

        e, par = recipe.eval, recipe.parallel
        self.config = e
        quiet()  # the figures are the console line of engine.train.metrics
        self.tasks = load_tasks(e.tasks, [e.include_path] if e.include_path else [])
        max_length = recipe.model.max_position_embeddings
        scorer = Scorer(chunks, vocab_size=recipe.model.vocab_size or tokenizer.vocab_size,
                        max_length=max_length, batch_size=e.batch_size,
                        pad_to=par.tp if par.sequence_parallel else 1)
        self.lm = engine_lm(scorer, tokenizer, max_length=max_length)

    def evaluate(self) -> dict[str, dict[str, float]]:
        """{task: {acc, acc_norm}} on the model as it is now (every rank calls this)."""
        from engine.eval.harness import run_tasks, task_metrics

        e = self.config
        return task_metrics(run_tasks(self.lm, self.tasks, limit=e.limit,
                                      num_fewshot=e.num_fewshot, seed=e.seed))
