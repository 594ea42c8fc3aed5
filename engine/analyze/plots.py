"""PNG figures of the analyses (matplotlib, Agg backend; matplotlib is in the `dev` and `bench`
extras): the CMR curves with their fits, and the loss-law fit with its prediction. Each
function takes the numbers it draws, not runs, and returns the path it wrote, or None (saying
so once) when matplotlib is not installed: the JSON results do not need it."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch


@functools.cache
def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install '.[bench]')", file=sys.stderr)
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)  # a failure never leaves half a PNG under the final name
    return path


def plot_cmr(result, curves, out: Path, *, domain: str, general: str) -> Path | None:
    """Two panels, ΔL_domain and ΔL_general against tokens: every ratio's points and fitted
    law, ε and T_end marked, the critical ratio's curves drawn thicker.
    `result`: cmr.CmrResult; `curves`: the cmr.RatioCurves it was fitted on."""
    if not have_matplotlib():
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    by_ratio = {c.ratio: c for c in curves}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, f in enumerate(result.fits):
        c, color = by_ratio[f.ratio], colors[i % len(colors)]
        t = c.tokens.double()
        grid = torch.linspace(float(t.min()), max(float(t.max()), result.tokens_end), 200,
                              dtype=torch.float64)
        width = 2.5 if f.ratio == result.critical_ratio else 1.0
        label = f"R={f.ratio:.3g}" + ("" if f.feasible else " (infeasible)")
        for ax, pts, fit in ((axes[0], c.domain, f.domain), (axes[1], c.general, f.general)):
            ax.plot(t, pts, ".", color=color, markersize=3, alpha=0.6)
            ax.plot(grid, fit.law(grid), "-", color=color, linewidth=width, label=label)
    axes[1].axhline(result.epsilon, color="black", linestyle="--", linewidth=0.8,
                    label=f"ε = {result.epsilon:g}")
    axes[0].axhline(0.0, color="black", linestyle="--", linewidth=0.8)
    for ax in axes:
        ax.axvline(result.tokens_end, color="grey", linestyle=":", linewidth=0.8)
    cmr = "none feasible" if result.critical_ratio is None else (
        f"critical R = {result.critical_ratio:.3g} (interpolated {result.interpolated:.3g}"
        + ("" if result.interval is None else
           f", 90% [{result.interval[0]:.3g}, {result.interval[1]:.3g}]") + ")")
    axes[0].set(title=f"ΔL {domain} (domain)", xlabel="tokens in the stage",
                ylabel="loss − loss before the stage")
    axes[1].set(title=f"ΔL {general} (general); {cmr}", xlabel="tokens in the stage")
    axes[1].title.set_fontsize(9)
    axes[1].legend(fontsize=7)
    return _save(fig, out)


def plot_prediction(steps, truth, fitted_upto: int, prediction, band, out: Path, *,
                    title: str) -> Path | None:
    """The validation curve (truth), the law over the whole stage (solid on the fitted part,
    dashed beyond), the bootstrap band of the prediction, and where the fit ended."""
    if not have_matplotlib():
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    steps = torch.as_tensor(steps, dtype=torch.float64)
    pred = torch.as_tensor(prediction, dtype=torch.float64)
    ax.plot(steps, truth, ".", color="black", markersize=3, label="validation loss (truth)")
    fit = steps <= fitted_upto
    ax.plot(steps[fit], pred[fit], "-", color="C0", label="law, fitted part")
    ax.plot(steps[~fit], pred[~fit], "--", color="C1", label="law, prediction")
    if band is not None:
        ax.fill_between(steps[~fit], band[0][~fit], band[1][~fit], color="C1", alpha=0.2,
                        label="90% bootstrap band")
    ax.axvline(fitted_upto, color="grey", linestyle=":", linewidth=0.8)
    ax.set(title=title, xlabel="step of the stage", ylabel="loss (nats/token)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    return _save(fig, out)
