"""Long-context evaluation beyond lm-eval tasks: loss by position on long held-out documents
(`engine eval --per-position`), and the summaries of long-context runs (`engine tasks summary`):
the passkey accuracy table and heat-map, and per-position loss curves side by side.

Loss by position: every document of at least `seq_length + 1` tokens gives its first
`seq_length + 1` tokens; position i is the loss of predicting token i+1 from tokens 0..i, in
nats, averaged over the documents; positions are grouped in equal buckets. Whether far
positions improve after a long-context stage shows in the last buckets (Xiong et al. 2023,
"Effective Long-Context Scaling of Foundation Models", arXiv 2309.16039, Fig. 2 plots the same
curve). The model side is `Scorer.token_losses`; everything here is numbers in, numbers or PNG
files out.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np


def long_rows(documents: Iterable[Sequence[int]], seq_length: int, limit: int) -> list[list[int]]:
    """The first seq_length + 1 tokens of the first `limit` documents that have that many."""
    rows = []
    for doc in documents:
        if len(doc) > seq_length:
            rows.append([int(t) for t in doc[:seq_length + 1]])
            if len(rows) == limit:
                break
    return rows


def position_buckets(losses: np.ndarray, buckets: int) -> dict:
    """{starts, ends, loss} of `buckets` equal position ranges [start, end) over the mean loss
    per position of `losses` [documents, positions]; also the per-position mean."""
    losses = np.asarray(losses, dtype=np.float64)
    positions = losses.shape[1]
    if not 1 <= buckets <= positions:
        raise ValueError(f"buckets={buckets}: expected 1..{positions}")
    per_position = losses.mean(axis=0)
    edges = np.linspace(0, positions, buckets + 1).round().astype(int)
    return {"starts": edges[:-1].tolist(), "ends": edges[1:].tolist(),
            "loss": [float(per_position[a:b].mean()) for a, b in zip(edges, edges[1:])],
            "per_position": per_position.tolist()}


def per_position_report(losses: np.ndarray, buckets: int, **about) -> dict:
    """The JSON of `engine eval --per-position`: the buckets, the document count, `about`."""
    return {**about, "documents": int(np.asarray(losses).shape[0]),
            "positions": int(np.asarray(losses).shape[1]), **position_buckets(losses, buckets)}


# --- summaries ------------------------------------------------------------------------------

def format_passkey(grids: dict[str, dict[int, dict[float, float]]]) -> str:
    """One accuracy table (%) per labelled grid: a row per length, a column per depth."""
    out = []
    for label, grid in grids.items():
        depths = sorted({d for row in grid.values() for d in row})
        out.append(f"{label}: passkey accuracy (%) by length (tokens) and depth")
        out.append(f"{'length':>8}" + "".join(f"{d:>8.2f}" for d in depths) + f"{'mean':>8}")
        for length, row in grid.items():
            cells = "".join(f"{100 * row[d]:>8.0f}" if d in row else f"{'-':>8}" for d in depths)
            out.append(f"{length:>8}{cells}{100 * np.mean(list(row.values())):>8.0f}")
    return "\n".join(out)


def format_positions(reports: dict[str, dict]) -> str:
    """Loss per position bucket, one column per labelled report."""
    first = next(iter(reports.values()))
    lines = [f"{'positions':>12}" + "".join(f"{label[:12]:>13}" for label in reports)]
    for i, (a, b) in enumerate(zip(first["starts"], first["ends"])):
        lines.append(f"{f'{a}-{b - 1}':>12}" + "".join(f"{r['loss'][i]:>13.4f}"
                                                       for r in reports.values()))
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install '.[bench]')", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_passkey(grids: dict[str, dict[int, dict[float, float]]], path: Path) -> Path | None:
    """Heat-maps of accuracy (length x depth), one per labelled grid, side by side."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids) + 0.8, 3.4),
                             squeeze=False, layout="constrained")
    for ax, (label, grid) in zip(axes[0], grids.items()):
        lengths = list(grid)
        depths = sorted({d for row in grid.values() for d in row})
        acc = np.array([[grid[n].get(d, np.nan) for d in depths] for n in lengths])
        image = ax.imshow(acc, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for (i, j), value in np.ndenumerate(acc):
            if not np.isnan(value):
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("depth of the key")
        ax.set_ylabel("length (tokens)")
        ax.set_title(f"passkey: {label}")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    return _save(plt, fig, path)


def plot_positions(reports: dict[str, dict], path: Path) -> Path | None:
    """Loss by position bucket, one line per labelled report."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, r in reports.items():
        middles = [(a + b - 1) / 2 for a, b in zip(r["starts"], r["ends"])]
        ax.plot(middles, r["loss"], marker="o", markersize=3, label=label)
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("loss (nats)")
    ax.set_title("loss by position on long held-out documents")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)
