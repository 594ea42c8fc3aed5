"""Reading training runs for the analyses (the I/O edge of engine.analyze): a run's TensorBoard
scalars, its recipe, its checkpoint's train state, and what the earlier stages' schedules were.

A run is a directory given on the command line, one of:
- a pipeline stage directory (engine.pipeline): `recipe.yaml` and `tensorboard/` side by side;
- a checkpoint save directory or an `iter_*` checkpoint (`recipe.yaml` beside the weights);
  the TensorBoard directory is then the recipe's `logging.tensorboard_dir`;
- a bare TensorBoard directory (event files directly in it): no recipe, so the learning rates
  come from the logged `train/lr` and the mixture ratio must be given.
Paths inside recipes are taken as written (relative ones from the current directory, where
training ran). Tags (engine.train.metrics): `valid/<name>/loss`, `tasks/<task>/acc`,
`train/lr`, `tokens/total`.

Learning rates of the run's own stage: the recipe's schedule, the exact LR of every update
(`engine.train.schedule.lr_at`, with the checkpoint's decay_file_step), unless `train/lr`, which
the engine logs at every step, is there for every step and differs (train.override_schedule
changed the schedule mid-stage): then the logged values (float32). Without a recipe, `train/lr`,
interpolated linearly between logged steps when only every log_interval-th step has it (exact
for linear warmup and decay, approximate for a cosine).

The earlier stages: S1_pt, S2_pt and the last LR come from the checkpoint's stage history when
every earlier stage recorded its learning rates (`earlier_stages[i]["lr"]`,
engine.train.lr_record; joined with loss_law.join_areas); otherwise (checkpoints from before
those records) they are rebuilt from the schedules: `checkpoint.pretrained` of the recipe names
the checkpoint the stage started from; its recipe and train state give that stage's schedule
and step count, and its own `checkpoint.pretrained` the stage before it; an upcycled step-0
checkpoint leads on to the source named in its report.json. Followed to the first stage; when
the chain does not account for every earlier step of the train state's stage history, S1_pt is
unknown and the fit estimates it. The chain is followed in both cases: it finds the earlier
stage's run. The earlier stage's validation curves join the loss-law fit only when there was
one earlier stage and no upcycle since (the same model's pretraining curve).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.analyze.loss_law import Curve, PretrainAreas, join_areas, lr_areas
from engine.config.errors import ConfigError

log = logging.getLogger(__name__)


def read_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] sorted by step; a step written twice (a resumed run) keeps the
    last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: sorted({e.step: e.value for e in acc.Scalars(tag)}.items())
            for tag in acc.Tags()["scalars"]}


@dataclass(frozen=True, kw_only=True)
class Run:
    """One training stage's records."""

    path: Path
    tensorboard: Path
    recipe: object | None = None
    """engine.config.recipe.Recipe, when the run has its recipe."""
    checkpoint: Path | None = None
    """Its latest checkpoint (train state: decay_file_step, stage history)."""
    scalars: dict = field(default_factory=dict)

    def series(self, tag: str) -> list[tuple[int, float]]:
        return self.scalars.get(tag, [])

    def names(self, prefix: str, suffix: str) -> list[str]:
        """The <name>s of the tags `prefix/<name>/suffix`."""
        return sorted(t[len(prefix) + 1:-len(suffix) - 1] for t in self.scalars
                      if t.startswith(prefix + "/") and t.endswith("/" + suffix))

    def valid(self, name: str) -> list[tuple[int, float]]:
        """The validation loss curve `valid/<name>/loss`; a one-line error naming the run and
        its validation sets when it has none of that name."""
        points = self.series(f"valid/{name}/loss")
        if not points:
            have = ", ".join(self.names("valid", "loss")) or "none"
            raise ConfigError(f"{self.path}: no validation set {name!r} in {self.tensorboard} "
                              f"(it has: {have})")
        return points


def _events_in(d: Path) -> bool:
    return d.is_dir() and any(p.name.startswith("events.out.tfevents") for p in d.iterdir())


def _load_recipe(path: Path):
    from engine.config.loader import load_recipe

    return load_recipe(path)


def _checkpoint_of(path: Path) -> Path | None:
    from engine.checkpoint import find_checkpoint

    for candidate in (path, path / "checkpoints"):
        if candidate.is_dir():
            found = find_checkpoint(candidate)
            if found is not None:
                return found
    return None


def open_run(path: str | Path) -> Run:
    """The run at `path` (module docstring for the layouts), its scalars read."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory (expected a run: a pipeline stage, a "
                          "checkpoint or a TensorBoard directory)")
    ckpt = _checkpoint_of(path)
    recipe_file = path / "recipe.yaml" if (path / "recipe.yaml").is_file() else \
        (ckpt / "recipe.yaml" if ckpt is not None and (ckpt / "recipe.yaml").is_file() else None)
    recipe = _load_recipe(recipe_file) if recipe_file is not None else None
    if ckpt is None and recipe is not None and recipe.checkpoint.save:
        ckpt = _checkpoint_of(Path(recipe.checkpoint.save))
    looked = [path / "tensorboard", path]
    if recipe is not None and recipe.logging.tensorboard_dir:
        looked.append(Path(recipe.logging.tensorboard_dir))
    tb = next((d for d in looked if _events_in(d)), None)
    if tb is None:
        raise ConfigError(f"{path}: no TensorBoard events (looked in "
                          f"{', '.join(map(str, dict.fromkeys(looked)))})")
    return Run(path=path, tensorboard=tb, recipe=recipe, checkpoint=ckpt,
               scalars=read_scalars(tb))


def mixture_ratio(run: Run) -> float:
    """R = the domain data's share of the tokens: 1 − data.replay.fraction (1 without
    replay)."""
    if run.recipe is None:
        raise ConfigError(f"{run.path}: no recipe.yaml to read data.replay.fraction from; "
                          "give the ratio as RATIO=DIR")
    replay = run.recipe.data.replay
    return 1.0 if replay is None else 1.0 - replay.fraction


def _decay_file_step(ckpt: Path | None) -> int | None:
    if ckpt is None or not (ckpt / "train_state.json").is_file():
        return None
    from engine.checkpoint import read_train_state

    return read_train_state(ckpt).decay_file_step


def schedule_lrs(recipe, steps: int, decay_file_step: int | None = None) -> list[float]:
    """η_1..η_steps of a recipe's schedule."""
    from engine.train.schedule import lr_at

    return [lr_at(i, recipe.train.schedule, peak_lr=recipe.optim.lr,
                  total_steps=recipe.train.steps, decay_file_step=decay_file_step)
            for i in range(steps)]


def stage_lrs(run: Run, steps: int) -> list[float]:
    """η_1..η_steps of the run: its recipe's schedule, or the logged train/lr of every step
    where they differ, else the logged train/lr interpolated (module docstring)."""
    logged = run.series("train/lr")
    if run.recipe is not None:
        planned = schedule_lrs(run.recipe, steps, _decay_file_step(run.checkpoint))
        every = dict(logged)
        if all(t in every for t in range(1, steps + 1)) and any(
                abs(every[t] - planned[t - 1]) > 1e-6 * abs(planned[t - 1]) + 1e-12
                for t in range(1, steps + 1)):
            log.warning("%s: the logged train/lr differs from the recipe's schedule "
                        "(train.override_schedule?): using the logged learning rates", run.path)
            return [every[t] for t in range(1, steps + 1)]
        return planned
    if not logged:
        raise ConfigError(f"{run.path}: neither a recipe nor logged train/lr to take the "
                          "learning rates from")
    if len(logged) == 1:
        return [logged[0][1]] * steps
    at, lr = zip(*logged)
    grid = torch.arange(1, steps + 1, dtype=torch.float64)
    xs, ys = torch.tensor(at, dtype=torch.float64), torch.tensor(lr, dtype=torch.float64)
    pos = torch.searchsorted(xs, grid).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[pos - 1], xs[pos], ys[pos - 1], ys[pos]
    w = ((grid - x0) / (x1 - x0)).clamp(0.0, 1.0)  # held constant outside the logged steps
    return (y0 + w * (y1 - y0)).tolist()


def tokens_at(run: Run, steps: list[int]) -> torch.Tensor:
    """T (tokens/total, this stage) at `steps`: the logged counts, linear in the step between
    them (a fixed batch reads the same tokens every step)."""
    logged = [(0, 0.0)] + [(s, v) for s, v in run.series("tokens/total") if s > 0]
    if len(logged) < 2:
        raise ConfigError(f"{run.path}: no tokens/total logged in {run.tensorboard}")
    xs = torch.tensor([s for s, _ in logged], dtype=torch.float64)
    ys = torch.tensor([v for _, v in logged], dtype=torch.float64)
    grid = torch.tensor(steps, dtype=torch.float64)
    pos = torch.searchsorted(xs, grid).clamp(1, len(xs) - 1)
    x0, x1, y0, y1 = xs[pos - 1], xs[pos], ys[pos - 1], ys[pos]
    return y0 + (grid - x0) * (y1 - y0) / (x1 - x0)  # beyond the last log: extrapolated


@dataclass(frozen=True, kw_only=True)
class History:
    """What came before a run: the areas of all earlier updates and, when there was a single
    earlier stage, that stage's run (its curves join the fit)."""

    pt: PretrainAreas
    final_lr: float | None
    """The last earlier LR (η_0 of the run); None when unknown."""
    earlier: Run | None = None
    earlier_lrs: list[float] = field(default_factory=list)


def _upcycle_source(path: Path) -> str | None:
    """The source checkpoint an upcycled checkpoint was grown from (its report.json)."""
    import json

    for d in (path, path.parent):
        if (d / "report.json").is_file():
            try:
                return json.loads((d / "report.json").read_text())["source"]["checkpoint"]
            except (ValueError, KeyError, TypeError):
                return None
    return None


def history(run: Run) -> History:
    """Follow checkpoint.pretrained (and upcycles' sources) back to the first stage (module
    docstring)."""
    from engine.checkpoint import read_train_state

    stages, grown = [], False  # newest first while walking
    link = run.recipe.checkpoint.pretrained if run.recipe is not None else None
    while link:
        ckpt = _checkpoint_of(Path(link))
        if ckpt is None or not (ckpt / "recipe.yaml").is_file() or \
                not (ckpt / "train_state.json").is_file():
            break
        state, recipe = read_train_state(ckpt), _load_recipe(ckpt / "recipe.yaml")
        if state.step > 0:
            stages.append((recipe, state))
            link = recipe.checkpoint.pretrained
        else:  # an upcycled (or imported) step-0 checkpoint: continue at its source
            source = _upcycle_source(Path(link))
            grown = grown or source is not None
            link = source or recipe.checkpoint.pretrained
    stages.reverse()
    lrs = [lr for r, s in stages for lr in schedule_lrs(r, s.step, s.decay_file_step)]
    expected, earlier = None, []
    if run.checkpoint is not None and (run.checkpoint / "train_state.json").is_file():
        earlier = read_train_state(run.checkpoint).earlier_stages
        expected = sum(s["steps"] for s in earlier)
    if earlier and all((s.get("lr") or {}).get("steps") == s["steps"] for s in earlier):
        joined = join_areas([s["lr"] for s in earlier])  # what the updates used
        single = len(earlier) == 1 and len(stages) == 1 and \
            stages[0][1].step == earlier[0]["steps"]
        return History(pt=PretrainAreas(s1=joined.s1, s2=joined.s2), final_lr=joined.final_lr,
                       earlier=_earlier_run(stages, grown) if single else None,
                       earlier_lrs=lrs if single else [])
    if not lrs or (expected is not None and expected != len(lrs)):
        if expected:
            log.warning("%s: the earlier stages' schedules account for %d of %d earlier steps; "
                        "S1_pt will be fitted", run.path, len(lrs), expected)
        return History(pt=PretrainAreas(s1=None), final_lr=None)
    s1, s2 = lr_areas(lrs)
    return History(pt=PretrainAreas(s1=float(s1[-1]), s2=float(s2[-1])), final_lr=lrs[-1],
                   earlier=_earlier_run(stages, grown), earlier_lrs=lrs)


def _earlier_run(stages: list, grown: bool) -> Run | None:
    """The earlier stage's run, whose curve joins the fit only when it is the same model's
    single stage."""
    if len(stages) == 1 and not grown and stages[0][0].logging.tensorboard_dir:
        tb = Path(stages[0][0].logging.tensorboard_dir)
        if _events_in(tb):
            return Run(path=tb, tensorboard=tb, recipe=stages[0][0], scalars=read_scalars(tb))
    return None


def loss_curve(points: list[tuple[int, float]], lrs: list[float],
               lr_before: float | None) -> Curve:
    """The law's view of a validation curve: its points with the areas of `lrs` (η_1.. of the
    stage, enough for the last point) at each step."""
    s1, s2 = lr_areas(lrs, lr_before=lr_before)
    steps = torch.tensor([s for s, _ in points])
    return Curve(steps=steps.double(), s1=s1[steps], s2=s2[steps],
                 loss=torch.tensor([v for _, v in points], dtype=torch.float64))
