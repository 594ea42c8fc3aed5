"""Training metrics: one fixed-format console line per log step and the same scalars in TensorBoard.

Tag names are the console names: `train/loss`, `train/lr`, `train/grad_norm`, `train/tokens_per_s`,
`train/tflops_per_device`, `valid/<name>/loss`, `valid/<name>/ppl`, and the task probes'
`tasks/<task>/acc`, `tasks/<task>/acc_norm` (engine.eval). Token accounting:
`tokens/total` (this stage), `tokens/total_all_stages` (with the stages before it: an x axis for
several stages), `tokens/source/<source>` (this stage) and `tokens/fraction/<source>` (the share of
the tokens since the previous log step); the totals are also written at evaluation steps. A stage
that starts at step 0 writes the text `stage` and the scalar `stage/index` (its place in the
pipeline of stages) there. Only rank 0 writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass(frozen=True, slots=True)
class TrainRecord:
    """What one log step reports."""

    step: int
    steps: int
    loss: float
    """Mean training loss over the log interval."""
    lr: float
    grad_norm: float | None
    """None when the step was skipped (fp16 overflow)."""
    tokens_per_s: float
    tflops_per_device: float
    eta_s: float

    def line(self) -> str:
        gn = "skipped" if self.grad_norm is None else f"{self.grad_norm:.3f}"
        return (
            f"step {self.step}/{self.steps} | loss {self.loss:.4f} | lr {self.lr:.2e} | "
            f"grad_norm {gn} | tok/s {self.tokens_per_s:,.0f} | "
            f"tflops/device {self.tflops_per_device:.3f} | eta {_duration(self.eta_s)}"
        )

    def scalars(self) -> dict[str, float | None]:
        return {"train/loss": self.loss, "train/lr": self.lr, "train/grad_norm": self.grad_norm,
                "train/tokens_per_s": self.tokens_per_s,
                "train/tflops_per_device": self.tflops_per_device}


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))  # capped: an untrained model's exp(loss) overflows nothing


class Metrics:
    """Console + TensorBoard sink; a no-op on ranks other than 0."""

    def __init__(self, tensorboard_dir: str | None, *, enabled: bool,
                 purge_step: int | None = None):
        self.enabled = enabled
        self.writer = None
        self._totals_step: int | None = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events beyond a resumed step, so a resumed run's curves don't fork.
            self.writer = SummaryWriter(tensorboard_dir, purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(tag, value, step)

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def train(self, record: TrainRecord) -> None:
        self.line(record.line())
        self.scalars(record.step, record.scalars())

    def valid(self, step: int, losses: dict[str, float]) -> None:
        parts = [f"{name} {loss:.4f} (ppl {_ppl(loss):.2f})" for name, loss in losses.items()]
        self.line(f"valid step {step} | " + " | ".join(parts))
        for name, loss in losses.items():
            self.scalars(step, {f"valid/{name}/loss": loss, f"valid/{name}/ppl": _ppl(loss)})

    def tasks(self, step: int, figures: dict[str, dict[str, float]]) -> None:
        """Task probes: {task: {acc, acc_norm, ...}} as `tasks/<task>/<metric>`."""
        parts = [f"{task} " + " ".join(f"{m} {v:.3f}" for m, v in metrics.items())
                 for task, metrics in figures.items()]
        self.line(f"tasks step {step} | " + " | ".join(parts))
        for task, metrics in figures.items():
            self.scalars(step, {f"tasks/{task}/{m}": v for m, v in metrics.items()})

    def tokens(self, counts) -> None:
        """Token accounting at a log step (engine.train.stage.TokenCounts); a console line only
        when there is more than one source."""
        interval = sum(counts.interval.values())
        fractions = {n: t / interval if interval else 0.0 for n, t in counts.interval.items()}
        if len(counts.stage) > 1:
            parts = [f"{n} {f:.3f}" for n, f in fractions.items()]
            self.line(f"tokens step {counts.step} | total {counts.total:,} | all stages "
                      f"{counts.total_all_stages:,} | " + " | ".join(parts))
        self.token_totals(counts)
        self.scalars(counts.step, {f"tokens/source/{n}": t for n, t in counts.stage.items()})
        self.scalars(counts.step, {f"tokens/fraction/{n}": f for n, f in fractions.items()})

    def token_totals(self, counts) -> None:
        """`tokens/total` and `tokens/total_all_stages`, once per step."""
        if counts.step == self._totals_step:
            return
        self._totals_step = counts.step
        self.scalars(counts.step, {"tokens/total": counts.total,
                                   "tokens/total_all_stages": counts.total_all_stages})

    def stage(self, step: int, text: str, index: int, *, show: bool = True) -> None:
        """The stage boundary: a text and the stage's index among all stages; `show` prints the
        text too."""
        if show:
            self.line(text)
        if self.writer is not None:
            self.writer.add_text("stage", text, step)
        self.scalars(step, {"stage/index": index})

    def moe(self, step: int, report) -> None:
        self.line(report.line())
        self.scalars(step, report.scalars())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
