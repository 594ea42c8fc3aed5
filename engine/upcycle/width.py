"""Width growth (Scale-Up): hidden size, FFN neurons, KV groups and query heads of a Llama decoder.

Pure tensor math on one layer's megatron tensors (`grow_layer`) and on the embedding, final norm
and output layer (`grow_globals`); `scale_up.py` checks the inputs and drives it. Imports neither
megatron-core nor torch.distributed. Head width (kv_channels) never changes: the softmax scale
1/sqrt(head_dim) depends on it, so attention grows by whole heads and whole KV groups.

Notation (the issue's): an `Axis` holds g(j), the source unit that new unit j copies, and
C(i) = |{j : g(j) = i}|, the number of copies of source unit i (the original included). Units
are hidden dimensions (h -> h'), FFN neurons (F -> F'), KV groups (G -> G') and query heads
within a group (P -> P' heads per group); query head (g, p) copies (g(g), g(p)).

- FPI, function-preserving initialization (Net2Net's Net2WiderNet, Chen, Goodfellow and Shlens,
  ICLR 2016, arXiv 1511.05641; bert2BERT, Chen et al., ACL 2022, arXiv 2110.07143, its FPI
  extended to Transformers): output side copies, W'[j, :] = W[g(j), :]; input side
  splits, W'[:, j] = W[:, g(j)] / C(g(j)), so sum_j W'[:, j] x'_j = sum_i W[:, i] x_i whenever
  x'_j = x_g(j). SwiGLU's gate and up rows are copied together and fc2's columns split; q/k/v rows
  of a copied head or group are copied, o_proj's columns split; norm gains are copied, never
  split. With g(j) = j mod n (used here) every unit has C = n'/n copies at an integer ratio, so
  RMSNorm's statistic |x'|^2/h' = sum_i C(i) x_i^2 / h' equals |x|^2/h and FPI is exact; at a
  non-integer ratio some units count twice and the statistic (so the function) changes
  (AquilaMoE, arXiv 2408.06567, Table 2). The report measures that change.
- AKI, advanced knowledge initialization (bert2BERT): inputs split as in FPI,
  but the new output units of layer l take their rows from layer l+1 (split the same way), the
  last layer from itself: W'_l[j, :] = W^_(l+1)[g(j), :] for j >= n. Not function-preserving on
  purpose: new units differ from their siblings from the start.
- AKI-Pro (AquilaMoE's Scale-Up): AKI with GQA; the number of KV groups stays fixed and query heads
  grow inside each group (P -> P'), each group treated as an MHA block sharing its K/V.
- Exact (ours): derived in `grow_layer_exact`'s docstring; exact at any ratio.
- HyperCloning (Samragh et al. 2024, arXiv 2409.12903) compared: its vector cloning
  (x -> [x, x]) and symmetric expansion (W/n blocks) are our FPI at an integer ratio. Where it
  differs is symmetry breaking: its "noisy" variants add noise that cancels over the cloned
  inputs (W/2 + e and W/2 - e read the same x), so the function is kept exactly, and its
  "diagonal" variant zeroes off-diagonal blocks; our `noise` perturbs the added units' input side
  without cancelling, so it changes the function (the report measures it), and our exact method
  breaks symmetry with fresh units that contribute exactly zero instead of clones. We have no
  cancelling-noise variant.
- `noise` (FPI/AKI/AKI-Pro), a relative std: every added unit's input side (q/k/v rows of added
  heads and groups, gate/up rows of added neurons, and the writers of added hidden dimensions:
  embedding columns, o_proj rows, fc2 rows) gets N(0, (noise * std(W))^2) added, std(W) the
  standard deviation of the grown tensor W it sits in (as Scale-Out's `noise`), so copies stop
  receiving equal
  gradients (Net2Net adds noise for the same reason); it changes the function, and the report
  measures by how much.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.models.weights import (
    FC1,
    FC2,
    INPUT_NORM,
    MLP_NORM,
    PROJ,
    QKV,
    QKV_BIAS,
    Shape,
    fuse_qkv,
    split_qkv,
)

LAYER_TENSORS = (INPUT_NORM, QKV, QKV_BIAS, PROJ, MLP_NORM, FC1, FC2)
"""The per-layer tensor names (after `decoder.layers.{i}.`) this module grows; the bias only with
`add_qkv_bias`."""


@dataclass(frozen=True, slots=True)
class Axis:
    """One growing width: `source[j]` = g(j) for each new unit j; None = a fresh unit without a
    source (the exact method)."""

    old: int
    source: tuple[int | None, ...]

    @property
    def size(self) -> int:
        return len(self.source)

    def index(self) -> torch.Tensor:
        return torch.tensor([0 if i is None else i for i in self.source], dtype=torch.long)

    def counts(self) -> torch.Tensor:
        """C(g(j)) for each new unit j."""
        c = torch.bincount(self.index(), minlength=self.old)
        return c[self.index()].to(torch.float64)

    def added(self) -> torch.Tensor:
        return torch.arange(self.size) >= self.old


def copy_axis(old: int, new: int) -> Axis:
    """g(j) = j mod old: every source unit copied new/old times at an integer ratio."""
    return Axis(old, tuple(j % old for j in range(new)))


def fresh_axis(old: int, new: int) -> Axis:
    """Old units keep their index; added units have no source."""
    return Axis(old, tuple(j if j < old else None for j in range(new)))


@dataclass(frozen=True, slots=True)
class WidthPlan:
    """How every width grows, and what fresh units and noise draw from."""

    method: str
    """fpi | aki | aki-pro | exact."""
    hidden: Axis
    ffn: Axis
    groups: Axis
    heads_per_group: Axis
    src: Shape
    """Source shape (heads, groups, head_dim) for megatron's fused QKV layout."""
    dst: Shape
    init_std: float
    """Std of fresh weights (exact): the target model's init_method_std."""
    noise: float = 0.0
    """Std of the symmetry-breaking noise on added units relative to their tensor's std
    (FPI/AKI/AKI-Pro)."""

    @property
    def head_dim(self) -> int:
        return self.src.head_dim

    @property
    def scale(self) -> float:
        """sqrt(h'/h): the exact method's residual-stream scale."""
        return math.sqrt(self.hidden.size / self.hidden.old)


def _along(mask: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = -1
    return mask.view(shape)


def split_in(w: torch.Tensor, dim: int, axis: Axis) -> torch.Tensor:
    """Input side of FPI: W'[.., j, ..] = W[.., g(j), ..] / C(g(j)) along `dim`."""
    return w.index_select(dim, axis.index()) / _along(axis.counts().to(w.dtype), dim, w.dim())


def copy_out(cur: torch.Tensor, nxt: torch.Tensor, dim: int, axis: Axis) -> torch.Tensor:
    """Output side: unit j = cur[g(j)] for an old unit, nxt[g(j)] for an added one (AKI passes
    the next layer as `nxt`; FPI passes `cur` twice)."""
    index = axis.index()
    mask = _along(axis.added(), dim, cur.dim())
    return torch.where(mask, nxt.index_select(dim, index), cur.index_select(dim, index))


def _perturb(w: torch.Tensor, mask: torch.Tensor, relative: float, gen: torch.Generator):
    """`w` + N(0, (relative * std(w))^2) where `mask` is set."""
    if relative == 0.0 or not bool(mask.any()):
        return w
    std = relative * w.double().std().item()
    noise = torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w.dtype) * std
    return w + noise * mask.to(w.dtype)


def extend(w: torch.Tensor, dim: int, size: int, gen: torch.Generator | None = None,
           std: float = 0.0) -> torch.Tensor:
    """`w` grown to `size` along `dim`: new entries zero, or N(0, std^2) when `gen` is given."""
    shape = list(w.shape)
    shape[dim] = size - w.shape[dim]
    if shape[dim] == 0:
        return w
    new = (torch.randn(shape, generator=gen, dtype=torch.float32).to(w.dtype) * std
           if gen is not None else w.new_zeros(shape))
    return torch.cat([w, new], dim=dim)


def _units(t: torch.Tensor, shape: Shape) -> tuple[torch.Tensor, ...]:
    """Fused QKV (weight or bias) -> q [G, P, d, ...], k [G, d, ...], v [G, d, ...]."""
    q, k, v = split_qkv(t, shape)
    g, d, rest = shape.groups, shape.head_dim, t.shape[1:]
    return q.reshape(g, -1, d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)


def _fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: Shape) -> torch.Tensor:
    rest = q.shape[3:]
    return fuse_qkv(q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest), shape)


def _heads(plan: WidthPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of added KV groups [G'] and added query heads [G', P']."""
    groups = plan.groups.added()
    return groups, groups[:, None] | plan.heads_per_group.added()[None, :]


def grow_layer_copying(cur: dict[str, torch.Tensor], nxt: dict[str, torch.Tensor],
                       plan: WidthPlan, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """FPI (`nxt` is `cur`) or AKI/AKI-Pro (`nxt` is layer l+1, or l itself for the last layer).

    Inputs split within each layer first (FPI), then outputs are copied: old units from `cur`,
    added units from `nxt` (bert2BERT's AKI). Norm gains are copied from `cur`, never split."""
    H, F, Gx, Px = plan.hidden, plan.ffn, plan.groups, plan.heads_per_group
    added_groups, added_heads = _heads(plan)
    out = {}
    for name in (INPUT_NORM, MLP_NORM):
        out[name] = cur[name].index_select(0, H.index())
    for name in (QKV, QKV_BIAS):
        if name not in cur:
            continue
        weight = name == QKV
        qc, kc, vc = (split_in(t, -1, H) if weight else t for t in _units(cur[name], plan.src))
        qn, kn, vn = (split_in(t, -1, H) if weight else t for t in _units(nxt[name], plan.src))
        q = copy_out(copy_out(qc, qn, 0, Gx), copy_out(qn, qn, 0, Gx), 1, Px)
        k, v = copy_out(kc, kn, 0, Gx), copy_out(vc, vn, 0, Gx)
        if weight:
            std = plan.noise
            q = _perturb(q, added_heads[:, :, None, None], std, gen)
            k = _perturb(k, added_groups[:, None, None], std, gen)
            v = _perturb(v, added_groups[:, None, None], std, gen)
        out[name] = _fuse(q, k, v, plan.dst)

    def proj_in(w):  # o_proj [h, A*d] -> [h, G', P', d] with split columns -> [h, A'*d]
        w = w.reshape(w.shape[0], plan.src.groups, -1, plan.head_dim)
        return split_in(split_in(w, 1, Gx), 2, Px).reshape(w.shape[0], -1)

    def fc1_in(w):  # [gate; up] [2F, h] -> [2, F, h'] with split columns
        return split_in(w.reshape(2, F.old, -1), -1, H)

    pairs = {PROJ: (proj_in, 0, H),
             FC1: (fc1_in, 1, F),
             FC2: (lambda w: split_in(w, 1, F), 0, H)}
    for name, (inputs, dim, axis) in pairs.items():
        w = copy_out(inputs(cur[name]), inputs(nxt[name]), dim, axis)
        w = _perturb(w, _along(axis.added(), dim, w.dim()), plan.noise, gen)
        out[name] = w.reshape(-1, w.shape[-1])
    return out


def grow_layer_exact(cur: dict[str, torch.Tensor], plan: WidthPlan,
                     gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Exact width growth at any ratio (ours). With s = sqrt(h'/h):

    The residual stream becomes x' = [s*x, 0] (new dimensions exactly zero). RMSNorm then keeps
    its statistic: |x'|^2/h' = s^2 |x|^2/h' = |x|^2/h, so (epsilon included)
    rms(x') = rms(x) and norm(x') = [s*norm(x), 0] with gains [g, 1] (the new gains multiply
    zeros, so any value works; 1 is the usual init).
    - Readers of the normalized stream (q/k/v, gate/up, lm_head): W' = (1/s)[W, R], R ~ N(0, std^2)
      fresh: W' norm(x') = (1/s) W s norm(x) + R*0 = W norm(x). R multiplies exact zeros at step
      0 but gives the new dimensions a gradient path, so they train.
    - Writers into the stream (o_proj, fc2; the embedding E' = s[E, 0]): W' = s[W; 0]: they add
      s*W y to the old dimensions and 0 to the new ones, keeping x' = [s*x, 0] layer after layer.
    - New FFN neurons: fresh gate/up rows, zero fc2 columns: they add 0 at step 0; fc2's new
      columns get gradient delta * silu(gate) up != 0, and once they move, so do gate/up.
    - New heads (in old or new KV groups) and new groups: fresh q (and k/v) rows, zero o_proj
      columns; same argument.
    The logits are exactly the source's (up to float rounding), at any h'/h, F'/F, heads and
    groups, and nothing is a copy of anything, so there is no symmetry to break.
    """
    H, F, Gx, Px, s, std = plan.hidden, plan.ffn, plan.groups, plan.heads_per_group, plan.scale, \
        plan.init_std
    out = {}
    for name in (INPUT_NORM, MLP_NORM):
        g = cur[name]
        out[name] = torch.cat([g, g.new_ones(H.size - H.old)])
    for name in (QKV, QKV_BIAS):
        if name not in cur:
            continue
        q, k, v = _units(cur[name], plan.src)
        if name == QKV:
            q, k, v = (extend(t, -1, H.size, gen, std) / s for t in (q, k, v))
            fresh = gen
        else:
            fresh = None  # new units' biases start at zero
        q = extend(extend(q, 0, Gx.size, fresh, std), 1, Px.size, fresh, std)
        k, v = extend(k, 0, Gx.size, fresh, std), extend(v, 0, Gx.size, fresh, std)
        out[name] = _fuse(q, k, v, plan.dst)
    proj = cur[PROJ]
    proj = proj.reshape(H.old, plan.src.groups, -1, plan.head_dim)
    proj = extend(extend(proj, 1, Gx.size), 2, Px.size).reshape(H.old, -1)
    out[PROJ] = extend(proj, 0, H.size) * s
    fc1 = extend(cur[FC1].reshape(2, F.old, H.old), -1, H.size, gen, std) / s
    out[FC1] = extend(fc1, 1, F.size, gen, std).reshape(2 * F.size, H.size)
    out[FC2] = extend(extend(cur[FC2], 1, F.size),
                                          0, H.size) * s
    return out


def grow_globals(embedding: torch.Tensor, final_norm: torch.Tensor, output: torch.Tensor | None,
                 plan: WidthPlan, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(embedding, final norm gain, output layer or None): the embedding [V, h] writes the
    stream (its columns are hidden units), the output layer [V, h] reads the final norm."""
    H = plan.hidden
    if plan.method == "exact":
        s = plan.scale
        embedding = extend(embedding, 1, H.size) * s
        final_norm = torch.cat([final_norm, final_norm.new_ones(H.size - H.old)])
        if output is not None:
            output = extend(output, 1, H.size, gen, plan.init_std) / s
        return embedding, final_norm, output
    embedding = copy_out(embedding, embedding, 1, H)
    embedding = _perturb(embedding, H.added()[None, :], plan.noise, gen)
    final_norm = final_norm.index_select(0, H.index())
    if output is not None:
        output = split_in(output, 1, H)
    return embedding, final_norm, output
