"""`report.md` (its figures also in `report.json`) and PNG plots of a pipeline run, from what
the stages left on disk: TensorBoard events (losses, task probe accuracies), stage recipes
(tokens per step), upcycle reports (step-0 losses) and stage.json (wall time). Reading and
arithmetic are separate from drawing so tests can check the numbers."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from engine.analyze.runs import read_scalars
from engine.analyze.stability import stability_gap
from engine.files import write_atomic
from engine.pipeline.config import Pipeline, Stage
from engine.pipeline.stages import done, output


@dataclass
class Curve:
    """A stage's losses by step, with the tokens one step consumes."""

    stage: Stage
    tokens_per_step: int
    flops_per_token: float
    steps: int
    train: list[tuple[int, float]] = field(default_factory=list)
    valid: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    tasks: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """Task probe accuracy (`tasks/<task>/acc`, eval.tasks) by step."""
    token_shares: dict[tuple[int, int], list[tuple[int, float]]] = field(default_factory=dict)
    """MoE stages: each (layer, expert)'s share of its layer's tokens by log step
    (`moe/layer<L>/expert<E>/token_share`, engine.train.moe_metrics)."""
    collapse_intervals: int = 3
    """The recipe's logging.moe_collapse_intervals."""
    seconds: float | None = None

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step


def read_curve(pipe: Pipeline, stage: Stage) -> Curve:
    from engine.checkpoint import find_checkpoint, read_train_state
    from engine.config.loader import load_recipe
    from engine.models.vocab import padded_vocab_size
    from engine.train.flops import flops_per_token

    d = pipe.stage_dir(stage.name)
    r = load_recipe(d / "recipe.yaml")
    seq = r.data.seq_length
    # samples per step from what the run consumed (the global batch depends on the DP size)
    ckpt = find_checkpoint(output(pipe, stage))
    state = read_train_state(ckpt) if ckpt is not None else None
    samples = state.consumed_samples // state.step if state and state.step else \
        r.train.global_batch_size or r.train.micro_batch_size
    vocab = r.model.vocab_size or _tokenizer_vocab(r)
    rows = padded_vocab_size(vocab, r.model.make_vocab_size_divisible_by, r.parallel.tp)
    curve = Curve(stage, samples * seq, flops_per_token(r.model, rows, seq), r.train.steps)
    scalars = read_scalars(d / "tensorboard") if (d / "tensorboard").is_dir() else {}
    curve.train = scalars.get("train/loss", [])
    for tag, points in scalars.items():
        parts = tag.split("/")
        if len(parts) == 3 and parts[0] == "valid" and parts[2] == "loss":
            curve.valid[parts[1]] = points
        if len(parts) == 3 and parts[0] == "tasks" and parts[2] == "acc":
            curve.tasks[parts[1]] = points
        if len(parts) == 4 and parts[0] == "moe" and parts[3] == "token_share":
            curve.token_shares[int(parts[1][5:]), int(parts[2][6:])] = points
    curve.collapse_intervals = r.logging.moe_collapse_intervals
    record = d / "stage.json"
    if record.is_file():
        curve.seconds = sum(run["seconds"] for run in json.loads(record.read_text())["runs"])
    return curve


def router_collapse(curve: Curve) -> list[dict]:
    """The streaks in which an expert got under 1/(4E) of its layer's tokens for at least
    `collapse_intervals` consecutive log steps (the rule of engine.train.moe_metrics' warning):
    {stage, layer, expert, from_step, to_step, min_share}, by layer and expert."""
    from engine.train.moe_metrics import collapse_threshold

    experts: dict[int, int] = {}
    for layer, expert in curve.token_shares:
        experts[layer] = max(experts.get(layer, 0), expert + 1)
    rows = []
    for (layer, expert), points in sorted(curve.token_shares.items()):
        low = collapse_threshold(experts[layer])
        streak: list[tuple[int, float]] = []
        for step, share in [*points, (None, 1.0)]:  # a sentinel ends the last streak
            if share < low:
                streak.append((step, share))
                continue
            if len(streak) >= curve.collapse_intervals:
                rows.append({"stage": curve.stage.name, "layer": layer, "expert": expert,
                             "from_step": streak[0][0], "to_step": streak[-1][0],
                             "min_share": min(v for _, v in streak), "threshold": low})
            streak = []
    return rows


def _exactness(g: dict) -> str:
    if not g["expected_exact"]:
        return "not exact by construction"
    return "exact (holds)" if g["holds"] else "exact expected: FAILED"


def _tokenizer_vocab(recipe) -> int:
    from engine.data.tokenizer import load_tokenizer

    return load_tokenizer(recipe.tokenizer.type, recipe.tokenizer.path).vocab_size


def tokens_to_reach(points: list[tuple[int, float]], target: float,
                    tokens_per_step: int) -> float | None:
    """Tokens after which the loss curve first reaches `target`, interpolated linearly between
    the two evaluations around the crossing; None if it never does."""
    prev = None
    for step, loss in points:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return step * tokens_per_step
            s0, l0 = prev
            return (s0 + (l0 - target) / (l0 - loss) * (step - s0)) * tokens_per_step
        prev = (step, loss)
    return None


def ancestry(pipe: Pipeline, stage: Stage) -> list[Stage]:
    """The train stages whose weights flow into `stage` (oldest first), itself last."""
    chain = []
    s: Stage | None = stage
    while s is not None:
        if s.kind == "train":
            s = _resolved(pipe, s)
            chain.append(s)
        if s.kind == "train" and s.init == "random":
            break
        s = pipe.stage(s.source) if s.source else None
    return chain[::-1]


def _resolved(pipe: Pipeline, stage: Stage) -> Stage:
    """A best_of / lr_from stage as chosen; as written while its candidates are not done."""
    from engine.config.errors import ConfigError
    from engine.pipeline.select import resolved

    try:
        return resolved(pipe, stage)
    except ConfigError:
        return stage


@dataclass
class Comparison:
    stage: str
    baseline: str
    valid_set: str
    baseline_tokens: int
    baseline_final: float
    stage_final: float
    tokens_to_reach: float | None
    """Tokens the stage needed to reach the baseline's final loss (None: it did not)."""
    ancestry_flops: float
    """FLOPs spent on the stage's ancestors (smaller models it was grown from)."""
    baseline_flops: float
    """FLOPs of the baseline, its own ancestors included."""
    stage_flops_per_token: float
    baseline_random: bool

    @property
    def token_ratio(self) -> float | None:
        return None if self.tokens_to_reach is None else self.tokens_to_reach / \
            self.baseline_tokens

    @property
    def compute_ratio(self) -> float | None:
        """(ancestors' FLOPs + the stage's FLOPs to reach) / (the baseline's FLOPs, with its
        ancestors')."""
        if self.tokens_to_reach is None:
            return None
        spent = self.ancestry_flops + self.tokens_to_reach * self.stage_flops_per_token
        return spent / self.baseline_flops


def _ancestry_flops(pipe: Pipeline, curve: Curve, curves: dict[str, Curve]) -> float:
    """Training FLOPs of the stages before `curve`'s whose weights it starts from."""
    return sum(curves[s.name].tokens * curves[s.name].flops_per_token
               for s in ancestry(pipe, curve.stage)[:-1] if s.name in curves)


def _tokenizer(pipe: Pipeline, name: str):
    from engine.config.loader import read_recipe_yaml

    return read_recipe_yaml(pipe.stage_dir(name) / "recipe.yaml").get("tokenizer")


def comparisons(pipe: Pipeline, curves: dict[str, Curve]) -> list[Comparison]:
    """Each stage against its baselines, per validation set; pairs on different tokenizers (a
    vocab stage between them) are left out: their per-token losses count different tokens."""
    out = []
    for b in pipe.stages:
        if b.baseline_for is None or b.name not in curves or b.baseline_for not in curves:
            continue
        if _tokenizer(pipe, b.name) != _tokenizer(pipe, b.baseline_for):
            continue
        base, main = curves[b.name], curves[b.baseline_for]
        anc_flops = _ancestry_flops(pipe, main, curves)
        base_flops = _ancestry_flops(pipe, base, curves) + base.tokens * base.flops_per_token
        for name, points in sorted(base.valid.items()):
            if not points or not main.valid.get(name):
                continue
            final = points[-1][1]
            out.append(Comparison(
                main.stage.name, b.name, name, base.tokens, final, main.valid[name][-1][1],
                tokens_to_reach(main.valid[name], final, main.tokens_per_step), anc_flops,
                base_flops, main.flops_per_token, b.init == "random"))
    return out


def growth_steps(pipe: Pipeline) -> list[dict]:
    """Per upcycle stage: the loss on the same tokens before and after (its report.json; for a
    vocab stage the tokens have old ids only and the change is KL(p_old || p_new))."""
    rows = []
    for s in pipe.stages:
        if s.kind not in ("scale_up", "scale_out", "vocab"):
            continue
        path = output(pipe, s) / "report.json"
        if not path.is_file():
            continue
        rep = json.loads(path.read_text())
        v, o = rep["invariant"], rep["options"]
        if v is None:  # measured with --eval-samples 0
            continue
        method = {"scale_up": lambda: f"scale-up {o['width_method']}/{o['depth_method']}",
                  "scale_out": lambda: f"scale-out {o['num_experts']} experts top-{o['topk']}",
                  "vocab": lambda: f"vocab +{rep['added']} tokens, {o['init']}"}[s.kind]()
        rows.append({"stage": s.name, "method": method, "before": v["loss_source"],
                     "after": v["loss_target"], "change": v["loss_change"],
                     "rel_logit_diff": v["max_rel"], "expected_exact": v["expected_exact"],
                     "holds": v.get("holds")})
    return rows


def step0_continuity(pipe: Pipeline, curves: dict[str, Curve]) -> list[dict]:
    """Per train stage that starts from an upcycled model: its step-0 evaluation next to the
    last evaluation of the train stage before the growth (same weights when growth preserves
    the function, same validation sets)."""
    rows = []
    for s in pipe.stages:
        if s.kind != "train" or s.init != "pretrained" or s.name not in curves or not s.source:
            continue
        up = pipe.stage(s.source)
        if up.kind not in ("scale_up", "scale_out") or up.source not in curves:
            continue
        before, after = curves[up.source], curves[s.name]
        for name, points in sorted(after.valid.items()):
            if points and points[0][0] == 0 and before.valid.get(name):
                rows.append({"stage": s.name, "growth": up.name, "valid_set": name,
                             "before": before.valid[name][-1][1], "after": points[0][1]})
    return rows


def stability_gaps(pipe: Pipeline, curves: dict[str, Curve]) -> list[dict]:
    """Per train stage that starts from earlier weights, per validation set and task probe
    evaluated at its step 0: the stability gap (engine.analyze.stability: the value before,
    the worst in the stage and its step, the step it is regained or None)."""
    rows = []
    for s in pipe.stages:
        c = curves.get(s.name)
        if c is None or s.init == "random" or not s.source:
            continue
        series = [("valid", name, pts, False) for name, pts in sorted(c.valid.items())]
        series += [("task", name, pts, True) for name, pts in sorted(c.tasks.items())]
        for kind, name, pts, higher in series:
            if len(pts) < 2 or pts[0][0] != 0:
                continue
            gap = stability_gap([st for st, _ in pts], [v for _, v in pts],
                                higher_is_better=higher)
            rows.append({"stage": s.name, "kind": kind, "name": name, **gap.as_dict()})
    return rows


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def write_report(pipe: Pipeline) -> Path:
    """Write `<out>/report.md`, the same figures as `report.json`, and the plots; returns the
    report's path."""
    out = Path(pipe.out)
    curves = {s.name: read_curve(pipe, s) for s in pipe.stages
              if s.kind == "train" and (pipe.stage_dir(s.name) / "recipe.yaml").is_file()}
    growth = growth_steps(pipe)
    comps = comparisons(pipe, curves)
    plots = draw(pipe, curves, growth, comps, out)
    names, tasks = _valid_names(curves), _task_names(curves)
    columns = [f"valid {v}" for v in names] + [f"acc {t}" for t in tasks]
    lines = [f"# {pipe.name}", "",
             "| stage | kind | from | status | steps | tokens | wall time | train loss | "
             + " | ".join(columns) + " |",
             "|" + "---|" * (8 + len(columns))]
    for s in pipe.stages:
        c = curves.get(s.name)
        status = "done" if done(pipe, s) else "not done"
        src = (s.source or "") + (" (shape only)" if s.init == "random" and s.source else "")
        if c is None:
            lines.append(f"| {s.name} | {s.kind} | {s.source or ''} | {status} |||||"
                         + "|" * len(columns))
            continue
        valids = [_fmt(c.valid[v][-1][1]) if c.valid.get(v) else "—" for v in names]
        valids += [_fmt(c.tasks[t][-1][1], ".3f") if c.tasks.get(t) else "—" for t in tasks]
        lines.append(f"| {s.name} | train | {src} | {status} | {c.steps} | {c.tokens:,} | "
                     f"{_fmt(c.seconds, '.0f')} s | "
                     f"{_fmt(c.train[-1][1]) if c.train else '—'} | " + " | ".join(valids) + " |")
    lines += ["", "## Growth steps: loss on the same tokens before and after", "",
              "| stage | method | function | loss before | loss after | change | "
              "max rel logit diff |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {g['stage']} | {g['method']} | {_exactness(g)} | {g['before']:.5f} | "
              f"{g['after']:.5f} | {g['change']:+.2e} | {_fmt(g['rel_logit_diff'], '.1e')} |"
              for g in growth]
    lines += ["", "Validation sets: the last evaluation before each growth and the first (step 0) "
              "of the stage after it.", "", "| stage | after growth | valid set | before | "
              "step 0 | change |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['growth']} | {r['valid_set']} | {r['before']:.5f} | "
              f"{r['after']:.5f} | {r['after'] - r['before']:+.2e} |"
              for r in step0_continuity(pipe, curves)]
    gaps = stability_gaps(pipe, curves)
    lines += ["", "## Stability gap", "", "Per stage from earlier weights: each validation loss "
              "and probe accuracy at step 0 (before), its worst value in the stage, and the "
              "first step it is back (Guo et al. 2024).", "",
              "| stage | series | before | worst | at step | gap | regained at |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {g['stage']} | {g['kind']} {g['name']} | {g['before']:.4f} | "
              f"{g['worst']:.4f} | {g['worst_step']} | {g['gap']:+.4f} | "
              f"{g['regained_step'] if g['regained'] else 'not regained'} |" for g in gaps]
    lines += ["", "## Against the baselines", "",
              "Tokens to reach = tokens the stage needed for its validation loss to reach the "
              "baseline's final loss (linear between evaluations); token ratio = that / the "
              "baseline's tokens. Compute ratio counts training FLOPs on both sides, including "
              "the stages each one's weights came from (the small model the grown one started "
              "as), so it is the honest price of growing. A stage and a baseline on different "
              "tokenizers are not listed: their per-token losses count different tokens "
              "(compare bits per character, `engine bpc`).", "",
              "| stage | baseline | valid set | baseline final (tokens) | stage final | "
              "tokens to reach | token ratio | compute ratio |", "|" + "---|" * 8]
    for c in comps:
        lines.append(f"| {c.stage} | {c.baseline}{' (random init)' if c.baseline_random else ''}"
                     f" | {c.valid_set} | {c.baseline_final:.4f} ({c.baseline_tokens:,}) | "
                     f"{c.stage_final:.4f} | {_fmt(c.tokens_to_reach, ',.0f')} | "
                     f"{_fmt(c.token_ratio, '.2f')} | {_fmt(c.compute_ratio, '.2f')} |")
    from engine.pipeline.study import draw_study, groups, growth_study, study_lines

    grouped = groups(pipe, curves)
    study = growth_study(pipe, curves, grouped)
    lines += study_lines(study)
    if study["rows"]:
        plots.append(draw_study(pipe, curves, grouped, out / "growth_study.png"))
    moe = [c for c in curves.values() if c.token_shares]
    collapse = [row for c in moe for row in router_collapse(c)]
    if moe:
        lines += ["", "## MoE routing: router collapse", "",
                  "Experts under 1/(4E) of their layer's tokens for at least "
                  "logging.moe_collapse_intervals consecutive log steps "
                  f"(stages: {', '.join(c.stage.name for c in moe)}).", ""]
        lines += ["| stage | layer | expert | log steps | min share | threshold |",
                  "|---|---|---|---|---|---|"] + [
            f"| {r['stage']} | {r['layer']} | {r['expert']} | {r['from_step']}-{r['to_step']} | "
            f"{r['min_share']:.4f} | {r['threshold']:.4f} |" for r in collapse] \
            if collapse else ["None collapsed."]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    figures = {"stages": [{"stage": s.name, "kind": s.kind, "source": s.source,
                           "done": done(pipe, s), **_curve_figures(curves.get(s.name))}
                          for s in pipe.stages],
               "growth": growth, "step0": step0_continuity(pipe, curves),
               "stability_gap": gaps, "router_collapse": collapse,
               "comparisons": [dataclasses.asdict(c) for c in comps],
               "growth_study": study}
    write_atomic(out / "report.json", json.dumps(figures, indent=1) + "\n")
    return write_atomic(out / "report.md", "\n".join(lines) + "\n")


def _curve_figures(c: Curve | None) -> dict:
    """A train stage's figures for report.json (the numbers behind report.md's tables)."""
    if c is None:
        return {}
    return {"steps": c.steps, "tokens": c.tokens, "seconds": c.seconds,
            "train_loss": c.train[-1][1] if c.train else None,
            "valid_loss": {v: pts[-1][1] for v, pts in c.valid.items() if pts},
            "task_acc": {t: pts[-1][1] for t, pts in c.tasks.items() if pts}}



def _valid_names(curves: dict[str, Curve]) -> list[str]:
    return sorted({v for c in curves.values() for v in c.valid})


def _task_names(curves: dict[str, Curve]) -> list[str]:
    return sorted({t for c in curves.values() for t in c.tasks})


def main_chain(pipe: Pipeline) -> list[Stage]:
    """The train stages that are nobody's baseline, in file order: one time axis."""
    return [s for s in pipe.stages if s.kind == "train" and s.baseline_for is None]


def draw(pipe: Pipeline, curves: dict[str, Curve], growth: list[dict],
         comps: list[Comparison], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    names = _valid_names(curves)
    # 1. losses (and probe accuracies) of the main chain on one token axis, stages marked
    paths.append(_all_stages(pipe, curves, "valid", names or [""],
                             "validation loss", "loss", out / "loss_all_stages.png"))
    tasks = _task_names(curves)
    if tasks:  # the stability gap shows in accuracy
        paths.append(_all_stages(pipe, curves, "tasks", tasks, "probe accuracy", "acc",
                                 out / "tasks_all_stages.png"))
    # 2. growth continuity
    if growth:
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = range(len(growth))
        ax.bar([x - 0.2 for x in xs], [g["before"] for g in growth], 0.4, label="before")
        ax.bar([x + 0.2 for x in xs], [g["after"] for g in growth], 0.4, label="after (step 0)")
        ax.set_xticks(list(xs), [g["stage"] for g in growth])
        ax.set(ylabel="loss on the same tokens", title="loss across each growth step")
        ax.legend()
        paths.append(_save(fig, out / "growth_step0.png"))
    # 3. each stage against its baselines, on the stage's own tokens
    pairs = sorted({(c.stage, c.baseline) for c in comps})
    for stage in sorted({p[0] for p in pairs}):
        fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
        for ax, v in zip(axes[0], names):
            for name in [stage] + [b for s, b in pairs if s == stage]:
                c = curves[name]
                pts = c.valid.get(v, [])
                ax.plot([st * c.tokens_per_step for st, _ in pts], [x for _, x in pts],
                        marker=".", label=name)
            ax.set(title=f"{stage} vs baselines: {v}", xlabel="tokens in this stage",
                   ylabel="validation loss")
            ax.legend(fontsize=8)
        paths.append(_save(fig, out / f"baselines_{stage}.png"))
    return paths


def _all_stages(pipe: Pipeline, curves: dict[str, Curve], field: str, names: list[str],
                title: str, ylabel: str, path: Path) -> Path:
    """One panel per name: `field` ("valid" or "tasks") of the main chain's stages on one token
    axis, the stage boundaries dotted."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4), squeeze=False)
    offset = 0
    for s in main_chain(pipe):
        c = curves.get(s.name)
        if c is None:
            continue
        for ax, name in zip(axes[0], names):
            pts = getattr(c, field).get(name, [])
            ax.plot([offset + st * c.tokens_per_step for st, _ in pts], [x for _, x in pts],
                    marker=".", label=s.name)
            ax.axvline(offset, color="grey", linestyle=":", linewidth=0.8)
        offset += c.tokens
    for ax, name in zip(axes[0], names):
        ax.set(title=f"{title}: {name}", xlabel="tokens (all stages)", ylabel=ylabel)
        ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
