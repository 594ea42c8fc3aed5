"""Adam's moments through a Scale-Up (`--carry-optimizer`): the weights' own source maps.

Pure (state dicts in, state dicts out; no files, megatron or process group). Staged Training
(Shen et al. 2022, arXiv 2203.06211) carries the optimizer state across growth; this is the
rule for our growth operators (scale_up.py), derived here.

Scale-Up writes each element j of a grown tensor either from one source element i = g(j),
scaled, W'_j = c_j W_i (a copy: c = 1; an FPI input split: c = 1/C; the exact method's 1/s or
s; products of those in a 2-D tensor), or without a source (the exact method's fresh units and
new norm gains, the zeroed projections of an identity block). When the growth preserves the
function, the C_j elements of the same grown tensor that copy i are symmetric and the grown
model computes the source's function of W_i = sum_j W'_j / (C_j c_j), so its gradient is
g'_j = a_j g_i with a_j = 1 / (C_j c_j): a = 1 for a split, 1/C for a copy, s for the exact
method's readers (W' = W/s reading an s-times larger stream), 1/s for its writers.
Carrying m'_j = a_j m_i and v'_j = a_j^2 v_i makes the grown model's moments the ones it would
hold had it trained all along, so Adam's direction m'/sqrt(v') = m/sqrt(v) (up to eps): every
grown element takes its source element's step, and the first update of the grown model is the
source's first update at the same elements (tests/integration/test_carry_optimizer.py).
Decoupled weight decay moves W'_j by lr wd c_j W_i, the weights' own map. Gradient clipping
sees the grown model's norm, which differs (sum_j a_j^2 g_i^2 per source element).

A tied source grown into an untied model gives both the embedding and the output layer the
tied tensor's moments, which sum the two uses' gradients: a start, not the exact state.
Elements without a source start at zero moments; so do whole identity blocks (LLaMA-Pro),
whose copied tensors get no gradient until their zeroed projections move (their a is 0). Adam's
step count is kept (megatron-core stores one for all parameters), so a zero-moment element's
first updates are (1 - beta1)/sqrt(1 - beta2) of a fresh Adam's (engine.train.freeze's note).
Growths that change the function (AKI, AKI-Pro, stacking, interpolation, noise) get the same
rule: each element starts from the state of the element its weight was copied from.

How g(j) and c_j are found without restating every operator: scale_up is affine in the source
weights (noise off), so three growths of probe weights in float64 give them: zeros (P0: what
does not come from the source), unique ids 1, 2, ... over all source elements (P1 = c * id) and
ones (P2 = c); an element with P0 = 0 and P1 != 0 comes from id round(P1 / P2) scaled by P2.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from engine.config.recipe import ModelConfig
from engine.upcycle import UpcycleError
from engine.upcycle.depth import depth_map
from engine.upcycle.scale_up import ScaleUpSpec, scale_up

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class ElementMap:
    """For one grown tensor: the flat source index of each element (-1: no source) and a_j."""

    index: torch.Tensor
    """int64, the grown tensor's shape; into the concatenation of the source tensors in
    `source_keys` order."""
    gradient_scale: torch.Tensor
    """float64 a_j (0 where there is no source)."""


def _probe(state: StateDict, src: ModelConfig, dst: ModelConfig, spec: ScaleUpSpec,
           fill) -> StateDict:
    probe = {k: fill(k, v) for k, v in state.items()}
    grown, _ = scale_up(probe, src, dst, spec=replace(spec, noise=0.0))
    return grown


def element_maps(state: StateDict, src: ModelConfig, dst: ModelConfig,
                 spec: ScaleUpSpec) -> tuple[list[str], dict[str, ElementMap]]:
    """(source keys in index order, the ElementMap of every grown tensor) of the Scale-Up
    `spec` from `src` to `dst`; `state` supplies the source's tensor shapes."""
    keys = sorted(state)
    offsets, total = {}, 0
    for k in keys:
        offsets[k] = total
        total += state[k].numel()
    if total >= 2**52:
        raise UpcycleError(f"{total} elements: too many to number exactly in float64")
    f64 = torch.float64
    zeros = _probe(state, src, dst, spec, lambda k, v: torch.zeros(v.shape, dtype=f64))
    constant = {k: t != 0 for k, t in zeros.items()}
    del zeros
    ids = _probe(state, src, dst, spec, lambda k, v: (torch.arange(v.numel(), dtype=f64) + 1
                                                      + offsets[k]).reshape(v.shape))
    ones = _probe(state, src, dst, spec, lambda k, v: torch.ones(v.shape, dtype=f64))
    identity_layers = {i for i, s in enumerate(depth_map(src.num_layers, dst.num_layers,
                                                         spec.depth_method)) if s.identity}
    maps = {}
    for name, p1 in ids.items():
        scale = ones.pop(name)
        sourced = ~constant[name] & (p1 != 0) & (scale != 0)
        if _layer_of(name) in identity_layers:
            sourced = torch.zeros_like(sourced)
        found = torch.where(sourced, p1 / torch.where(sourced, scale, 1.0), 0.0)
        index = found.round()
        if not torch.allclose(found, index, rtol=0.0, atol=1e-3):
            raise UpcycleError(f"'{name}': the growth is not a scaled copy of source elements "
                               "(internal: the moments cannot follow it)")
        index = index.to(torch.int64) - 1  # ids start at 1; -1 = no source
        copies = torch.ones(index.shape, dtype=f64)  # C_j: copies of g(j) in this tensor
        if bool(sourced.any()):
            _, inverse, counts = torch.unique(index[sourced], return_inverse=True,
                                              return_counts=True)
            copies[sourced] = counts[inverse].to(f64)
        a = torch.where(sourced, 1.0 / (copies * scale), 0.0)
        maps[name] = ElementMap(index=torch.where(sourced, index, -1), gradient_scale=a)
    return keys, maps


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "decoder" and parts[1] == "layers":
        return int(parts[2])
    return None


def carry_moments(exp_avg: StateDict, exp_avg_sq: StateDict, src: ModelConfig,
                  dst: ModelConfig, spec: ScaleUpSpec) -> tuple[StateDict, StateDict, dict]:
    """Adam's (exp_avg, exp_avg_sq) of the grown model (fp32), and a summary {carried,
    zero: element counts}: m'_j = a_j m_g(j), v'_j = a_j^2 v_g(j), zeros without a source
    (module docstring)."""
    keys, maps = element_maps(exp_avg, src, dst, spec)
    flat_m = torch.cat([exp_avg[k].double().reshape(-1) for k in keys])
    flat_v = torch.cat([exp_avg_sq[k].double().reshape(-1) for k in keys])
    out_m, out_v, carried, zero = {}, {}, 0, 0
    for name, em in maps.items():
        sourced = em.index >= 0
        at = em.index.clamp(min=0)
        a = em.gradient_scale
        out_m[name] = torch.where(sourced, a * flat_m[at], 0.0).float()
        out_v[name] = torch.where(sourced, a * a * flat_v[at], 0.0).float()
        n = int(sourced.sum())
        carried, zero = carried + n, zero + sourced.numel() - n
    return out_m, out_v, {"carried": carried, "zero": zero}
