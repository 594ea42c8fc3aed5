"""Learning-rate schedules as pure functions of the step.

`lr_at(step, ...)` is the learning rate used by optimizer step `step` (0-based: the number of
updates already made). Warmup is linear from `warmup_init_lr` and reaches the peak on the last
warmup step, so no update is wasted at lr=0 (megatron's scheduler spends its first step at
init_lr). Styles:
- constant: the peak after warmup.
- linear / cosine: decay from the peak to `min_lr` over `decay_steps` after warmup, then hold.
- wsd (warmup-stable-decay; Hu et al. 2024, MiniCPM, arXiv 2404.06395): the peak until the last
  `wsd_decay_steps` steps, then a linear decay to `min_lr`.
"""

import math

from engine.config.recipe import ScheduleConfig


def lr_at(step: int, schedule: ScheduleConfig, *, peak_lr: float, total_steps: int) -> float:
    """The learning rate for optimizer step `step` of a run of `total_steps` steps."""
    s = schedule
    if step < s.warmup_steps:
        return s.warmup_init_lr + (peak_lr - s.warmup_init_lr) * (step + 1) / s.warmup_steps
    if s.style == "constant":
        return peak_lr
    if s.style == "wsd":
        decay = s.wsd_decay_steps if s.wsd_decay_steps is not None else max(1, total_steps // 10)
        start = total_steps - decay
        if step < start:
            return peak_lr
        frac = min(1.0, (step - start + 1) / decay)
        return peak_lr - (peak_lr - s.min_lr) * frac
    decay_steps = s.decay_steps if s.decay_steps is not None else total_steps - s.warmup_steps
    frac = min(1.0, (step - s.warmup_steps + 1) / max(1, decay_steps))
    if s.style == "linear":
        return peak_lr - (peak_lr - s.min_lr) * frac
    if s.style == "cosine":
        return s.min_lr + (peak_lr - s.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"train.schedule.style: unknown style {s.style!r}")  # config checks first
