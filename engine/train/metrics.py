"""Training metrics: one fixed-format console line per log step and the same scalars in TensorBoard.

Tag names are the console names: `train/loss`, `train/lr`, `train/grad_norm`, `train/tokens_per_s`,
`train/tflops_per_device`, `valid/<name>/loss`, `valid/<name>/ppl`. Only rank 0 writes.
"""

from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_train_line(*, step: int, steps: int, loss: float, lr: float, grad_norm: float | None,
                      tokens_per_s: float, tflops: float, eta_s: float) -> str:
    gn = "skipped" if grad_norm is None else f"{grad_norm:.3f}"
    return (f"step {step}/{steps} | loss {loss:.4f} | lr {lr:.2e} | grad_norm {gn} | "
            f"tok/s {tokens_per_s:,.0f} | tflops/device {tflops:.3f} | eta {_duration(eta_s)}")


class Metrics:
    """Console + TensorBoard sink; a no-op on ranks other than 0."""

    def __init__(self, tensorboard_dir: str | None, *, enabled: bool, purge_step: int | None = None):
        self.enabled = enabled
        self.writer = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events beyond a resumed step, so a resumed run's curves don't fork.
            self.writer = SummaryWriter(tensorboard_dir, purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(tag, value, step)

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def train(self, *, step: int, steps: int, loss: float, lr: float, grad_norm: float | None,
              tokens_per_s: float, tflops: float, eta_s: float) -> None:
        self.line(format_train_line(step=step, steps=steps, loss=loss, lr=lr, grad_norm=grad_norm,
                                    tokens_per_s=tokens_per_s, tflops=tflops, eta_s=eta_s))
        self.scalars(step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                            "train/tokens_per_s": tokens_per_s, "train/tflops_per_device": tflops})

    def valid(self, step: int, losses: dict[str, float]) -> None:
        parts = [f"{name} {loss:.4f} (ppl {math.exp(min(loss, 50)):.2f})" for name, loss in losses.items()]
        self.line(f"valid step {step} | " + " | ".join(parts))
        for name, loss in losses.items():
            self.scalars(step, {f"valid/{name}/loss": loss, f"valid/{name}/ppl": math.exp(min(loss, 50))})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
