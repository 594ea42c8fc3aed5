"""Learning-rate schedules as pure functions of the step, and the check of a resumed schedule.

`lr_at(step, ...)` is the learning rate used by optimizer step `step` (0-based: the number of
updates already made in this stage). Warmup is linear from `warmup_init_lr` and reaches the peak on
the last warmup step, so no update is wasted at lr=0 (megatron's scheduler spends its first step at
init_lr). Styles:
- constant: the peak after warmup.
- linear / cosine: decay from the peak to `min_lr` over `decay_steps` after warmup, then hold.
  With `warmup_init_lr` > 0 this is the re-warming of continual pretraining (Gupta et al. 2023,
  arXiv 2308.04014: re-warm to a new peak, then decay).
- wsd (warmup-stable-decay; Hu et al. 2024, MiniCPM, arXiv 2404.06395): the peak, then a linear
  decay to `min_lr` over `wsd_decay_steps`. With `cooldown_steps`/`constant_lr`, a cosine step
  down to a lower constant first: the infinite schedule of Ibrahim et al. 2024 (arXiv 2403.08763
  §7.3: warmup, cooldown, constant, annealing). The decay starts at the earliest of
  `train.steps - wsd_decay_steps`, `decay_start` and the step `decay_file` appeared
  (`decay_file_step`, found by the loop and kept in checkpoints); the run ends with the decay.

Which arguments a resumed run may change silently: none but `decay_file` (a trigger, not a value),
and `train.steps` where it moves no learning rate of a step already taken (`schedule_changes`).
"""

import dataclasses
import math

from engine.config.recipe import ScheduleConfig


def _wsd_decay_steps(s: ScheduleConfig, total_steps: int) -> int:
    return s.wsd_decay_steps if s.wsd_decay_steps is not None else max(1, total_steps // 10)


def wsd_decay_start(s: ScheduleConfig, total_steps: int, decay_file_step: int | None = None) -> int:
    """First step of the wsd decay: the earliest of its three triggers, never before the warmup
    and the cooldown are over."""
    starts = [total_steps - _wsd_decay_steps(s, total_steps)]
    starts += [x for x in (s.decay_start, decay_file_step) if x is not None]
    return max(min(starts), s.warmup_steps + s.cooldown_steps)


def end_step(s: ScheduleConfig, total_steps: int, decay_file_step: int | None = None) -> int:
    """The step the run ends at: `total_steps`, or for wsd the end of its decay (earlier when the
    decay started on demand)."""
    if s.style != "wsd":
        return total_steps
    start = wsd_decay_start(s, total_steps, decay_file_step)
    return min(total_steps, start + _wsd_decay_steps(s, total_steps))


def _cosine(high: float, low: float, frac: float) -> float:
    return low + (high - low) * 0.5 * (1.0 + math.cos(math.pi * frac))


def lr_at(step: int, schedule: ScheduleConfig, *, peak_lr: float, total_steps: int,
          decay_file_step: int | None = None) -> float:
    """The learning rate for optimizer step `step` of a run of `total_steps` steps;
    `decay_file_step` is the step at which wsd's decay_file appeared (None: not yet)."""
    s = schedule
    if step < s.warmup_steps:
        return s.warmup_init_lr + (peak_lr - s.warmup_init_lr) * (step + 1) / s.warmup_steps
    if s.style == "constant":
        return peak_lr
    if s.style == "wsd":
        plateau = peak_lr if s.constant_lr is None else s.constant_lr
        start = wsd_decay_start(s, total_steps, decay_file_step)
        if step < s.warmup_steps + s.cooldown_steps and step < start:
            return _cosine(peak_lr, plateau, (step - s.warmup_steps + 1) / s.cooldown_steps)
        if step < start:
            return plateau
        frac = min(1.0, (step - start + 1) / _wsd_decay_steps(s, total_steps))
        return plateau - (plateau - s.min_lr) * frac
    decay_steps = s.decay_steps if s.decay_steps is not None else total_steps - s.warmup_steps
    frac = min(1.0, (step - s.warmup_steps + 1) / max(1, decay_steps))
    if s.style == "linear":
        return peak_lr - (peak_lr - s.min_lr) * frac
    if s.style == "cosine":
        return _cosine(peak_lr, s.min_lr, frac)
    raise ValueError(f"train.schedule.style: unknown style {s.style!r}")  # config checks first


# --- the schedule's arguments, as saved in checkpoints, and what a resume may change -----------

_TRIGGERS = ("decay_file",)  # when the decay starts is state (decay_file_step), not an argument


def schedule_args(schedule: ScheduleConfig, *, lr: float, steps: int) -> dict:
    """What the learning rate depends on, by recipe key (stored in TrainState.schedule)."""
    args = {"optim.lr": lr, "train.steps": steps}
    for f in dataclasses.fields(schedule):
        if f.name not in _TRIGGERS:
            args[f"train.schedule.{f.name}"] = getattr(schedule, f.name)
    return args


def _dotted(saved: dict) -> dict:
    """Saved arguments by recipe key; checkpoints before the dotted keys stored `lr`, `steps` and
    the bare field names."""
    renamed = {"lr": "optim.lr", "steps": "train.steps"}
    return {key if "." in key else renamed.get(key, f"train.schedule.{key}"): value
            for key, value in saved.items()}


def _schedule(args: dict) -> ScheduleConfig | None:
    prefix = "train.schedule."
    try:
        return ScheduleConfig(**{k[len(prefix):]: v for k, v in args.items()
                                 if k.startswith(prefix)})
    except (TypeError, ValueError):  # arguments of another version, or not valid any more
        return None


def _steps_move_history(old: ScheduleConfig | None, new: ScheduleConfig, old_steps: int,
                        new_steps: int, step: int, decay_file_step: int | None) -> bool:
    """Whether running `new_steps` instead of `old_steps` changes the learning rate of one of
    the `step` steps already taken (an unchanged schedule otherwise)."""
    if old is None or old.style != new.style:
        return True
    if new.style == "constant":
        return False
    if new.style in ("linear", "cosine"):
        return new.decay_steps is None and step > new.warmup_steps
    before = (wsd_decay_start(new, old_steps, decay_file_step), _wsd_decay_steps(new, old_steps))
    after = (wsd_decay_start(new, new_steps, decay_file_step), _wsd_decay_steps(new, new_steps))
    return before != after and min(before[0], after[0]) < step


def schedule_changes(saved: dict, now: dict, *, step: int,
                     decay_file_step: int | None = None) -> list[tuple[str, object, object]]:
    """(recipe key, saved value, new value) of every schedule argument a resume at `step` would
    change; `saved` and `now` as `schedule_args` makes them. Keys the checkpoint predates count
    at their default, keys it has that this version lacks are ignored; an empty `saved` (a
    checkpoint written by an importer) and a resume at step 0 (no step used the saved arguments:
    `train.steps=0` wrote initial weights) change nothing."""
    if not saved or step == 0:
        return []
    saved = _dotted(saved)
    defaults = schedule_args(ScheduleConfig(), lr=now["optim.lr"], steps=now["train.steps"])
    old = {**defaults, **{k: v for k, v in saved.items() if k in defaults}}
    changes = [(k, old[k], v) for k, v in now.items()
               if k != "train.steps" and old[k] != v]
    old_steps, new_steps = old["train.steps"], now["train.steps"]
    if old_steps != new_steps and _steps_move_history(
            _schedule(old), _schedule(now), old_steps, new_steps, step, decay_file_step):
        changes.append(("train.steps", old_steps, new_steps))
    return changes
