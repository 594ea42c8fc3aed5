"""`engine analyze cmr | predict | gap`: the continual-pretraining analyses on finished runs
(runs.py for what a run directory is). Each command is also a Python function with the same
keywords (`analyze_cmr`, `analyze_predict`, `analyze_gap`) returning what it writes as JSON;
the command prints a short table. User errors are ConfigError: one line, exit code 2."""

from __future__ import annotations

import argparse
import dataclasses
import json
from fractions import Fraction
from pathlib import Path

import torch

from engine.analyze import cmr as cmr_law
from engine.analyze import loss_law
from engine.analyze.plots import plot_cmr, plot_prediction
from engine.analyze.runs import (
    Run,
    history,
    loss_curve,
    mixture_ratio,
    open_run,
    stage_lrs,
    tokens_at,
)
from engine.analyze.stability import stability_gap
from engine.config.errors import ConfigError
from engine.files import write_atomic


def _write_json(path: Path, data: dict) -> Path:
    return write_atomic(path, json.dumps(data, indent=2) + "\n")


def _run_arg(text: str) -> tuple[float | None, str]:
    """`DIR` or `RATIO=DIR` (RATIO a number or a fraction such as 1/3)."""
    ratio, sep, path = text.partition("=")
    if not sep:
        return None, text
    try:
        return float(Fraction(ratio)), path
    except (ValueError, ZeroDivisionError):
        return None, text  # a directory whose name has '='


def expand_runs(runs: list[str]) -> list[str]:
    """A directory that is no run itself but holds runs (a pipeline sweep's directory,
    engine.pipeline.sweep) stands for those runs, in name order."""
    out = []
    for text in runs:
        path = Path(text)
        inner = sorted(d for d in path.iterdir() if (d / "recipe.yaml").is_file()) \
            if path.is_dir() and not (path / "recipe.yaml").is_file() and \
            not (path / "tensorboard").is_dir() else []
        out += [str(d) for d in inner] or [text]
    return out


def _delta(run: Run, name: str) -> dict[int, float]:
    """{step: loss − loss at step 0} of a validation set."""
    points = dict(run.valid(name))
    if 0 not in points:
        raise ConfigError(f"{run.path}: valid/{name}/loss has no value at step 0 (the loss "
                          "before the stage); evaluate there with train.eval_interval_early")
    return {s: v - points[0] for s, v in points.items() if s > 0}


def analyze_cmr(runs: list[str], *, domain: str, general: str,
                epsilon: float = cmr_law.EPSILON, tokens_end: float | None = None,
                replicates: int = 200, seed: int = 0, out: str = ".") -> dict:
    """The critical mixture ratio of a sweep (engine.analyze.cmr); writes cmr.json and
    cmr.png into `out`. Each of `runs` is DIR (R = 1 − the recipe's data.replay.fraction) or
    RATIO=DIR."""
    curves, paths = [], []
    for text in expand_runs(runs):
        ratio, path = _run_arg(text)
        run = open_run(path)
        ratio = mixture_ratio(run) if ratio is None else ratio
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"{text}: the mixture ratio must be in (0, 1], got {ratio}")
        dom, gen = _delta(run, domain), _delta(run, general)
        steps = sorted(set(dom) & set(gen))
        curves.append(cmr_law.RatioCurves(
            ratio=ratio, tokens=tokens_at(run, steps),
            domain=torch.tensor([dom[s] for s in steps], dtype=torch.float64),
            general=torch.tensor([gen[s] for s in steps], dtype=torch.float64)))
        paths.append(str(run.path))
    ratios = [c.ratio for c in curves]
    if len(set(ratios)) != len(ratios):
        raise ConfigError(f"engine analyze cmr: two runs have the same ratio: "
                          f"{dict(zip(paths, ratios))}")
    try:
        result = cmr_law.fit_cmr(curves, epsilon=epsilon, tokens_end=tokens_end,
                                 replicates=replicates, seed=seed)
    except ValueError as e:
        raise ConfigError(f"engine analyze cmr: {e}") from None
    by_ratio, law = dict(zip(ratios, paths)), _power_law_json
    verdict = (f"critical ratio {result.critical_ratio:.4g}" if result.critical_ratio is not None
               else f"none feasible: no ratio has dL_{general} <= {epsilon:g} and dL_{domain} < 0"
                    f" at T_end = {result.tokens_end:,.0f} tokens")
    report = {"epsilon": epsilon, "tokens_end": result.tokens_end, "domain": domain,
              "general": general, "verdict": verdict, "critical_ratio": result.critical_ratio,
              "interpolated": result.interpolated, "interval": result.interval,
              "replicates": replicates, "seed": seed, "defined_share": result.defined_share,
              "runs": [{"ratio": f.ratio, "path": by_ratio[f.ratio], "domain": law(f.domain),
                        "general": law(f.general), "domain_end": f.domain_end,
                        "general_end": f.general_end, "feasible": f.feasible}
                       for f in result.fits]}
    png = plot_cmr(result, curves, Path(out) / "cmr.png", domain=domain, general=general)
    report["png"] = None if png is None else str(png)
    _write_json(Path(out) / "cmr.json", report)
    return report


def _power_law_json(fit: cmr_law.PowerFit) -> dict:
    """A fitted law in the paper's terms (α for T in tokens) and as fitted (on T/scale)."""
    law = fit.law
    return {"alpha": law.coef_tokens, "exponents": law.exponents, "beta": law.offset,
            "coef_on_t_over_scale": law.coef, "scale_tokens": law.scale, "huber": fit.objective}


def _pretrain_curve(hist, name: str) -> loss_law.Curve | None:
    """The earlier stage's curve of the same validation set, after its warmup (the power law
    of S1 does not describe the first updates), or None."""
    if hist.earlier is None:
        return None
    warmup = hist.earlier.recipe.train.schedule.warmup_steps
    points = [(s, v) for s, v in hist.earlier.series(f"valid/{name}/loss")
              if max(warmup, 0) < s <= len(hist.earlier_lrs)]
    return loss_curve(points, hist.earlier_lrs, None) if len(points) >= 3 else None


def _predict_one(r: Run, hist, name: str, fit_fraction: float, replicates: int, seed: int,
                 out: Path) -> dict:
    """The fit, prediction, band and PNG of one validation set (analyze_predict)."""
    points = r.valid(name)
    curve = loss_curve(points, stage_lrs(r, points[-1][0]), hist.final_lr)
    head, pretrain = curve.head(fit_fraction), _pretrain_curve(hist, name)
    if points[-1][0] == 0 or len(head.steps) == 0:
        raise ConfigError(f"{r.path}: valid/{name}/loss has no evaluation in the first "
                          f"{fit_fraction:.0%} or none after step 0 (steps "
                          f"{[s for s, _ in points][:6]})")
    upto = int(head.steps[-1])
    try:
        fit = loss_law.fit_law(head, hist.pt, pretrain=pretrain)
    except ValueError as e:
        raise ConfigError(f"{r.path}: valid/{name}/loss up to step {upto} (--fit-fraction "
                          f"{fit_fraction}): {e}") from None
    pred = loss_law.predict(fit, curve.s1, curve.s2)
    low, high = loss_law.prediction_band(fit, head, hist.pt, curve.s1, curve.s2,
                                         pretrain=pretrain, replicates=replicates, seed=seed)
    rest = curve.steps > upto
    err = (pred - curve.loss)[rest]
    png = plot_prediction(
        curve.steps, curve.loss, upto, pred, (low, high), out / f"predict_{name}.png",
        title=f"{r.path.name}: valid/{name}/loss, CPT law (Wang et al. 2025) fitted on the "
              f"first {fit_fraction:.0%}" + ("" if fit.with_pretrain else
                                             " (no earlier-stage curve)"))
    return {
        "valid": name, "fit_fraction": fit_fraction, "fitted_upto_step": upto,
        "fit_points": fit.fit_points, "with_pretrain_curve": fit.with_pretrain,
        "s1_pt": fit.pt.s1, "s1_pt_fitted": fit.s1_pt_fitted, "s2_pt": fit.pt.s2,
        "params": dataclasses.asdict(fit.params),
        "end": {"step": int(curve.steps[-1]), "truth": float(curve.loss[-1]),
                "prediction": float(pred[-1]), "error": float(pred[-1] - curve.loss[-1]),
                "band": [float(low[-1]), float(high[-1])]},
        "heldout": {"points": int(rest.sum()),
                    "max_abs_error": float(err.abs().max()) if len(err) else None,
                    "rmse": float(err.pow(2).mean().sqrt()) if len(err) else None},
        "curve": {"steps": curve.steps.tolist(), "truth": curve.loss.tolist(),
                  "prediction": pred.tolist(), "low": low.tolist(), "high": high.tolist()},
        "png": None if png is None else str(png)}


def analyze_predict(run: str, *, fit_fraction: float = 0.2, valid: str | None = None,
                    replicates: int = 50, seed: int = 0, out: str = ".") -> dict:
    """Fit the CPT loss law (engine.analyze.loss_law) on the first `fit_fraction` of each
    validation curve (or of `valid` only) and predict the rest; writes predict.json and
    predict_<valid>.png into `out`."""
    if not 0.0 < fit_fraction < 1.0:
        raise ConfigError(f"--fit-fraction: expected a number in (0, 1), got {fit_fraction}")
    r = open_run(run)
    names = [valid] if valid is not None else r.names("valid", "loss")
    if not names:
        raise ConfigError(f"{r.path}: no validation losses in {r.tensorboard}")
    hist = history(r)
    rows = [_predict_one(r, hist, name, fit_fraction, replicates, seed, Path(out))
            for name in names]
    report = {"run": str(r.path), "rows": rows}
    _write_json(Path(out) / "predict.json", report)
    return report


def _before_value(run: Run, tag: str, earlier: Run | None) -> float | None:
    points = run.series(tag)
    if points and points[0][0] == 0:
        return points[0][1]
    last = earlier.series(tag) if earlier is not None else []
    return last[-1][1] if last else None


def analyze_gap(run: str, *, tolerance: float = 0.0, before: str | None = None,
                out: str = ".") -> dict:
    """The stability gap (engine.analyze.stability) of every validation loss and task probe
    accuracy of `run`; the value before the stage is the step-0 evaluation, else the last
    value in `before` (an earlier run), else the earlier stage's records when found. Writes
    gap.json into `out`."""
    r = open_run(run)
    earlier = open_run(before) if before is not None else history(r).earlier
    tags = [(f"valid/{n}/loss", False) for n in r.names("valid", "loss")] + \
           [(f"tasks/{n}/acc", True) for n in r.names("tasks", "acc")]
    if not tags:
        raise ConfigError(f"{r.path}: no validation losses or task accuracies in "
                          f"{r.tensorboard}")
    rows = []
    for tag, higher in tags:
        points = r.series(tag)
        value = _before_value(r, tag, earlier)
        stage = [(s, v) for s, v in points if s > 0]
        if value is None or not stage:
            rows.append({"series": tag, "before": value, "note": "no value before the stage"
                         if value is None else "no value after step 0"})
            continue
        gap = stability_gap([s for s, _ in stage], [v for _, v in stage], before=value,
                            higher_is_better=higher, tolerance=tolerance)
        rows.append({"series": tag, **gap.as_dict()})
    report = {"run": str(r.path), "tolerance": tolerance, "rows": rows}
    _write_json(Path(out) / "gap.json", report)
    return report


# --- the commands ------------------------------------------------------------------------------

def _fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def cmr_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine analyze cmr", description=(
        "Critical mixture ratio (Gu et al. 2024) of a sweep of CPT runs at equal tokens: "
        "per-ratio power-law fits of the domain and general loss changes, the largest ratio "
        "within --epsilon of general loss, a bootstrap interval, cmr.json and cmr.png."))
    p.add_argument("runs", nargs="+", metavar="RUN", help="DIR (ratio = 1 - the recipe's "
                   "data.replay.fraction) or RATIO=DIR (e.g. 1/3=runs/r3); a pipeline sweep's "
                   "directory stands for its members")
    p.add_argument("--domain", required=True, help="the domain validation set (valid/NAME)")
    p.add_argument("--general", required=True, help="the general validation set")
    p.add_argument("--epsilon", type=float, default=cmr_law.EPSILON,
                   help="tolerated general loss increase at T_end, nats (default: 0.05)")
    p.add_argument("--tokens-end", type=float, default=None,
                   help="compare at this many tokens (default: the most every run reached)")
    p.add_argument("--replicates", type=int, default=200, help="bootstrap replicates")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", default=".", help="directory for cmr.json and cmr.png")
    a = p.parse_args(argv)
    rep = analyze_cmr(a.runs, domain=a.domain, general=a.general, epsilon=a.epsilon,
                      tokens_end=a.tokens_end, replicates=a.replicates, seed=a.seed, out=a.out)
    print(f"{'ratio':>8}  {'dL_domain':>10}  {'dL_general':>10}  feasible  run")
    for row in rep["runs"]:
        print(f"{row['ratio']:>8.4f}  {row['domain_end']:>10.4f}  {row['general_end']:>10.4f}"
              f"  {'yes' if row['feasible'] else 'no':<8}  {row['path']}")
    interval = rep["interval"]
    if rep["critical_ratio"] is None:
        print(f"{rep['verdict']} | {Path(a.out) / 'cmr.json'}")
        return 0
    print(f"critical ratio {_fmt(rep['critical_ratio'])} (interpolated "
          f"{_fmt(rep['interpolated'])}, 90% interval "
          f"{'-' if interval is None else f'[{interval[0]:.4f}, {interval[1]:.4f}]'}) at "
          f"T_end {rep['tokens_end']:,.0f} tokens, epsilon {rep['epsilon']:g} | "
          f"{Path(a.out) / 'cmr.json'}")
    return 0


def predict_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine analyze predict", description=(
        "Fit the CPT loss law (Wang et al. 2025) on the first part of a run's validation "
        "curves and predict the rest; predict.json and one PNG per validation set."))
    p.add_argument("run", metavar="RUN", help="a pipeline stage, checkpoint or TensorBoard dir")
    p.add_argument("--fit-fraction", type=float, default=0.2,
                   help="fit on the steps up to this fraction of the last (default: 0.2)")
    p.add_argument("--valid", default=None, help="one validation set (default: all)")
    p.add_argument("--replicates", type=int, default=50, help="bootstrap replicates (band)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", required=True, help="directory for predict.json and the PNGs")
    a = p.parse_args(argv)
    rep = analyze_predict(a.run, fit_fraction=a.fit_fraction, valid=a.valid,
                          replicates=a.replicates, seed=a.seed, out=a.out)
    print(f"{'valid':<16} {'fit to':>7} {'end':>7} {'truth':>8} {'predicted':>9} {'error':>8}"
          f"  90% band")
    for row in rep["rows"]:
        e = row["end"]
        print(f"{row['valid']:<16} {row['fitted_upto_step']:>7} {e['step']:>7} "
              f"{e['truth']:>8.4f} {e['prediction']:>9.4f} {e['error']:>+8.4f}  "
              f"[{e['band'][0]:.4f}, {e['band'][1]:.4f}]")
        if not row["with_pretrain_curve"]:
            print(f"  note: {row['valid']}: no earlier-stage curve joined the fit; the first "
                  "part of one curve determines the rest poorly (engine.analyze.loss_law)")
    print(f"report {Path(a.out) / 'predict.json'}")
    return 0


def gap_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="engine analyze gap", description=(
        "Stability gap (Guo et al. 2024) of a stage: per validation loss and task accuracy, "
        "the value before, the worst, when, and when it was regained; gap.json."))
    p.add_argument("run", metavar="RUN", help="a pipeline stage, checkpoint or TensorBoard dir")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="regained = back within this of the value before (series units)")
    p.add_argument("--before", default=None, help="an earlier run whose last values are the "
                   "values before the stage when it has no step-0 evaluation")
    p.add_argument("--out", default=".", help="directory for gap.json")
    a = p.parse_args(argv)
    rep = analyze_gap(a.run, tolerance=a.tolerance, before=a.before, out=a.out)
    width = max(len(row["series"]) for row in rep["rows"])
    print(f"{'series':<{width}} {'before':>8} {'worst':>8} {'at step':>8} {'gap':>8}  regained")
    for row in rep["rows"]:
        if "note" in row:
            print(f"{row['series']:<{width}} {_fmt(row['before']):>8}  {row['note']}")
            continue
        regained = "no gap" if row["gap"] <= row["tolerance"] else "not regained" \
            if row["regained_step"] is None else f"at step {row['regained_step']}"
        print(f"{row['series']:<{width}} {row['before']:>8.4f} {row['worst']:>8.4f} "
              f"{row['worst_step']:>8} {row['gap']:>+8.4f}  {regained}")
    print(f"report {Path(a.out) / 'gap.json'}")
    return 0


COMMANDS = {
    "cmr": (cmr_main, "critical mixture ratio of a sweep of CPT runs (Gu et al. 2024)"),
    "predict": (predict_main, "fit the CPT loss law on a curve's start, predict the rest"),
    "gap": (gap_main, "stability gap per validation set and task probe (Guo et al. 2024)"),
}


def analyze_main(argv: list[str]) -> int:
    import logging

    from engine.cli import dispatch

    # tensorboard's reader logs every event file it finishes at INFO: not news to the user
    logging.getLogger("tensorboard").setLevel(logging.WARNING)
    return dispatch("engine analyze", COMMANDS, argv)
