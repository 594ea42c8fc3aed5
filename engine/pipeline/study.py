"""The growth study of a pipeline report: does growing a trained model reach the loss of the
same shape trained from scratch for fewer tokens and less compute (G_stack, Du et al. 2024,
arXiv 2405.15319; bert2BERT, LEMON, HyperCloning report 33-75 % savings)?

Read from what the report already has (engine.pipeline.report.Curve), no new files:
- a *variant* is a train stage that starts from the weights of a scale_up stage; a best_of stage
  repeating it (another seed) joins its runs;
- its *baseline* is the random-init train stages of the same model shape: the learning rate
  the tuning chose (the best_of stages' pick, or the lowest final loss) and the best_of repeats
  of it; the target is their mean final validation loss, per validation set.
Per variant and validation set: the tokens after growth to reach the target (linear between
evaluations; engine.pipeline.report.tokens_to_reach) over the baseline's tokens, the total FLOPs
(the source's training included) over the baseline's, and the total tokens over the baseline's,
each as mean and spread (half the range) over the runs. The goal the issue set (tokens after
growth <= 0.5, total FLOPs < 1.0) is printed beside them; nothing here is tuned towards it.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import mean

from engine.pipeline.config import Pipeline

GOAL_TOKENS, GOAL_FLOPS = 0.5, 1.0


@dataclass
class Group:
    """Runs of one setting: the stage and its best_of repeats (other seeds)."""

    name: str
    runs: list[str]
    shape: dict
    source_tokens: int = 0
    source_flops: float = 0.0


def _spread(xs: list[float]) -> float:
    return (max(xs) - min(xs)) / 2 if len(xs) > 1 else 0.0


def _model(pipe: Pipeline, name: str) -> dict:
    from engine.config.loader import read_recipe_yaml

    return read_recipe_yaml(pipe.stage_dir(name) / "recipe.yaml").get("model", {})


def groups(pipe: Pipeline, curves: dict) -> tuple[list[Group], dict[str, dict]]:
    """(grown variants with their runs and source cost, {variant: its baseline description})."""
    from engine.pipeline.report import _resolved, ancestry
    from engine.pipeline.select import chosen

    repeats: dict[str, list[str]] = {}
    for s in pipe.stages:
        pick = chosen(pipe, s)
        if pick is not None and s.name in curves:
            repeats.setdefault(pick, []).append(s.name)
    variants, randoms = [], []
    for s in pipe.stages:
        if s.kind != "train" or s.best_of or s.name not in curves:
            continue
        r = _resolved(pipe, s)
        if r.init == "random" and r.source is not None:
            randoms.append(s.name)
        elif r.source is not None and pipe.stage(r.source).kind == "scale_up":
            chain = ancestry(pipe, s)[:-1]
            variants.append(Group(s.name, [s.name, *repeats.get(s.name, [])],
                                  _model(pipe, s.name),
                                  sum(curves[a.name].tokens for a in chain if a.name in curves),
                                  sum(curves[a.name].tokens * curves[a.name].flops_per_token
                                      for a in chain if a.name in curves)))
    shapes = {n: _model(pipe, n) for n in randoms}
    baselines = {}
    for v in variants:
        same = [n for n in randoms if shapes[n] == v.shape]
        if not same:
            continue
        picked = [p for p in same if repeats.get(p)]
        best = picked[0] if picked else min(same, key=lambda n: _final(curves[n]))
        baselines[v.name] = {"tuned": same, "chosen": best, "runs": [best, *repeats.get(best, [])]}
    return [v for v in variants if v.name in baselines], baselines


def _final(curve) -> float:
    from engine.pipeline.select import mean_final_loss

    loss = mean_final_loss(curve.valid)
    return float("inf") if loss is None else loss


def growth_study(pipe: Pipeline, curves: dict, grouped: tuple) -> dict:
    """{"rows": per variant and validation set, "lr": the baselines' tuning} (module
    docstring) of `grouped` (what `groups` found); empty lists when the pipeline has no grown
    stage with a same-shape baseline."""
    from engine.config.loader import load_recipe
    from engine.pipeline.report import tokens_to_reach

    variants, baselines = grouped
    rows, tuning = [], []
    for shape_runs in {tuple(b["tuned"]): b for b in baselines.values()}.values():
        for n in shape_runs["tuned"]:
            tuning.append({"stage": n, "lr": load_recipe(pipe.stage_dir(n) /
                                                         "recipe.yaml").optim.lr,
                           "final_loss": _final(curves[n]),
                           "chosen": n == shape_runs["chosen"]})
    for v in variants:
        b = baselines[v.name]
        base = [curves[n] for n in b["runs"]]
        for valid in sorted(base[0].valid):
            finals = [c.valid[valid][-1][1] for c in base if c.valid.get(valid)]
            if not finals:
                continue
            target = mean(finals)
            b_tokens, b_flops = base[0].tokens, base[0].tokens * base[0].flops_per_token
            reached = []
            for n in v.runs:
                c = curves[n]
                t = tokens_to_reach(c.valid.get(valid, []), target, c.tokens_per_step)
                reached.append(None if t is None else (t, c.flops_per_token))
            hit = [r for r in reached if r is not None]
            tok = [t / b_tokens for t, _ in hit]
            flops = [(v.source_flops + t * f) / b_flops for t, f in hit]
            total = [(v.source_tokens + t) / b_tokens for t, _ in hit]
            v_final = [curves[n].valid[valid][-1][1] for n in v.runs if curves[n].valid.get(valid)]
            rows.append({
                "variant": v.name, "runs": len(v.runs), "reached": len(hit),
                "valid_set": valid, "baseline": b["chosen"], "baseline_runs": len(b["runs"]),
                "target_loss": target, "target_spread": _spread(finals),
                "variant_final": mean(v_final), "variant_final_spread": _spread(v_final),
                "tokens_after_growth": mean(tok) if tok else None,
                "tokens_after_growth_spread": _spread(tok) if tok else None,
                "total_flops": mean(flops) if flops else None,
                "total_flops_spread": _spread(flops) if flops else None,
                "total_tokens": mean(total) if total else None,
                "total_tokens_spread": _spread(total) if total else None,
                "meets_goal": bool(tok) and len(hit) == len(v.runs) and
                mean(tok) <= GOAL_TOKENS and mean(flops) < GOAL_FLOPS})
    return {"rows": rows, "lr": tuning}


def _pm(x: float | None, spread: float | None, spec: str = ".2f") -> str:
    if x is None:
        return "not reached"
    return format(x, spec) + (f" ± {format(spread, spec)}" if spread else "")


def study_lines(study: dict) -> list[str]:
    """The report.md section."""
    if not study["rows"]:
        return []
    lines = ["", "## Growth study", "",
             "Each grown variant against the same shape trained from random init at the tuned "
             "learning rate (mean ± half range over seeds). Tokens after growth = tokens the "
             "variant needed to reach the baseline's mean final loss / the baseline's tokens; "
             "total FLOPs and total tokens count the source's training too. Goal: tokens after "
             f"growth <= {GOAL_TOKENS} and total FLOPs < {GOAL_FLOPS}.", "",
             "| variant | runs | valid set | baseline (runs) | target loss | variant final | "
             "tokens after growth | total FLOPs | total tokens | goal |", "|" + "---|" * 10]
    for r in study["rows"]:
        lines.append(
            f"| {r['variant']} | {r['reached']}/{r['runs']} reached | {r['valid_set']} | "
            f"{r['baseline']} ({r['baseline_runs']}) | "
            f"{_pm(r['target_loss'], r['target_spread'], '.4f')} | "
            f"{_pm(r['variant_final'], r['variant_final_spread'], '.4f')} | "
            f"{_pm(r['tokens_after_growth'], r['tokens_after_growth_spread'])} | "
            f"{_pm(r['total_flops'], r['total_flops_spread'])} | "
            f"{_pm(r['total_tokens'], r['total_tokens_spread'])} | "
            f"{'met' if r['meets_goal'] else 'not met'} |")
    lines += ["", "Learning rate of the baselines (final validation loss, mean over sets):", "",
              "| stage | lr | final loss | chosen |", "|---|---|---|---|"]
    lines += [f"| {t['stage']} | {t['lr']:g} | {t['final_loss']:.4f} | "
              f"{'yes' if t['chosen'] else ''} |" for t in study["lr"]]
    return lines


def draw_study(pipe: Pipeline, curves: dict, grouped: tuple, path):
    """growth_study.png: validation loss against total training FLOPs (the source's included),
    one panel per validation set: each variant's runs, its baseline's runs, the sources."""
    import matplotlib.pyplot as plt

    from engine.pipeline.report import _save

    variants, baselines = grouped
    names = sorted({v for c in curves.values() for v in c.valid})
    fig, axes = plt.subplots(1, len(names), figsize=(7 * len(names), 5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, valid in zip(axes[0], names):
        for i, v in enumerate(variants):
            for k, n in enumerate(v.runs):
                c = curves[n]
                pts = c.valid.get(valid, [])
                ax.plot([v.source_flops + st * c.tokens_per_step * c.flops_per_token
                         for st, _ in pts], [x for _, x in pts], color=colors[i % len(colors)],
                        linewidth=1.4 if k == 0 else 0.7, label=v.name if k == 0 else None)
        for j, b in enumerate(sorted({tuple(b["runs"]) for b in baselines.values()})):
            for k, n in enumerate(b):
                c = curves[n]
                pts = c.valid.get(valid, [])
                ax.plot([st * c.tokens_per_step * c.flops_per_token for st, _ in pts],
                        [x for _, x in pts], color="black", linestyle=("--", ":", "-.")[j % 3],
                        linewidth=1.4 if k == 0 else 0.7,
                        label=f"{n} (from scratch)" if k == 0 else None)
        sources = {a for v in variants for a in _sources(pipe, v.name)}
        for n in sorted(sources):
            c = curves[n]
            pts = c.valid.get(valid, [])
            ax.plot([st * c.tokens_per_step * c.flops_per_token for st, _ in pts],
                    [x for _, x in pts], color="grey", linewidth=2, label=f"{n} (source)")
        ax.set(title=f"growth study: {valid}", xlabel="training FLOPs (source included)",
               ylabel="validation loss")
        ax.legend(fontsize=7)
    return _save(fig, path)


def _sources(pipe: Pipeline, name: str) -> list[str]:
    from engine.pipeline.report import ancestry

    return [s.name for s in ancestry(pipe, pipe.stage(name))[:-1]]
