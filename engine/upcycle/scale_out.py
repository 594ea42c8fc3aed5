"""Scale-Out: a dense model's FFNs become mixture-of-experts layers (sparse upcycling).

Sources: Komatsuzaki et al. 2023, "Sparse Upcycling" (every expert starts as the dense FFN);
He et al. 2024, "Upcycling Large Language Models into Mixture of Experts", arXiv 2410.07524
(granular upcycling, virtual groups, weight scaling; megatron-core's upcycling_utils.py);
AquilaMoE, arXiv 2408.06567 (the EfficientScale Scale-Out stage). Pure: a state dict in (megatron
GPTModel keys at TP=1), a state dict out; no modules, files or process groups.

Notation: E experts, granularity G (each dense FFN of width f is cut into G shards of width f/G),
R = E/G copies of the dense FFN ("virtual groups"), top-T routing.

- Shards (SwiGLU): gate and up are cut separately, down_proj on its input dimension:
  shard s = (gate[s*f/G:(s+1)*f/G], up[same rows], down[:, same columns]); expert e holds shard
  e mod G, so experts {kG, ..., kG+G-1} form copy k of the dense FFN.
- Router (virtual groups): R rows r_k drawn at init; expert e gets row r_(e div G). The G
  experts of a group tie exactly, so with T = mG a token's top-T is m whole groups: every shard
  exactly m times (once when T = G). Requires T % G == 0 when G > 1.
- Output at init: with top-k-then-softmax (router_pre_softmax=false) the weights of the chosen
  experts sum to 1 and a group's G members share theirs, so the MoE output is dense(x) / G. With
  softmax-then-top-k and router logits near 0 each chosen expert weighs about 1/E; the T chosen
  experts are T/G whole groups, so the output is about (T/G)(1/E) dense(x) = dense(x) / (R G²/T).
  He et al. call the factor to undo the "activation scale" a: a = R·G²/T (pre-softmax), a = G
  (otherwise).
- Weight scaling (--weight-scaling):
  auto (He et al., eq. for gated units): multiply fc1 (gate and up) and fc2 by a^(1/3), since a
       SwiGLU expert scales like the cube of its weights for small inputs (a^(1/2) for a plain
       activation, degree 2). This restores the activation *scale*, not the function: SiLU is
       not homogeneous.
  exact: multiply fc2 alone by a. The expert's output is linear in fc2, so with
       router_pre_softmax=false the MoE output equals dense(x) exactly, for any G dividing T.
  none: no scaling.
- Drop-Upcycling (--drop-upcycling r; Nakamura et al. 2025, arXiv 2502.19261, best r = 0.5):
  after the copy, the scaling and the noise, each expert independently draws round(r·f/G) of
  its own f/G intermediate units (without replacement) and re-initializes them: the rows of the
  gate and of the up half of fc1 and the columns of fc2, from N(mean, std) of the whole dense
  source matrix (W_gate, W_up, W_down of that layer), times that expert's fc1/fc2 scale. The
  other units are bit for bit those of r = 0. Not function preserving.
- Invariant (tested): coarse upcycling (G=1) with top-k-then-softmax gives the dense model's
  logits for any router seed (a = 1: every scaling mode is exact); granular upcycling with
  `exact` scaling likewise; r = 0 gives today's state dict bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.config.recipe import ModelConfig
from engine.models.weights import EXPERT_FC1, EXPERT_FC2, FC1, FC2, ROUTER, is_moe_layer, layer_key
from engine.upcycle import UpcycleError

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True, kw_only=True, slots=True)
class ScaleOutSpec:
    granularity: int = 1
    """G: shards per dense FFN."""
    router_init: str = "normal"
    """normal (std router_std) | zeros (all experts tie: routing by index order at step 0)."""
    router_std: float = 0.02
    weight_scaling: str = "auto"
    """auto (He et al. 2024, a^(1/3) on fc1 and fc2) | exact (a on fc2) | none."""
    noise: float = 0.0
    """Std of Gaussian noise added to each expert's weights, relative to the std of the tensor
    (0.01 = 1%; Scale-Up's `noise` likewise), to break the symmetry between copies; 0 keeps the
    invariant."""
    drop_upcycling: float = 0.0
    """r in [0, 1): the fraction of each expert's intermediate units re-initialized from the
    dense matrices' statistics (Drop-Upcycling, arXiv 2502.19261; 0.5 is the paper's best);
    0 keeps the copy (and the invariant)."""
    seed: int = 0


# Drop-Upcycling draws from its own generator, seeded spec.seed + this offset (the paper's arXiv
# number), so the router and noise stream of `seed` stays what it was without the option (r = 0
# is bit for bit the old output, and r > 0 changes only the dropped units), and a run with seed
# s does not drop by the router stream of a run with seed s + 1.
DROP_SEED_OFFSET = 2502_19261


def activation_scale(moe_cfg, granularity: int) -> float:
    """a (He et al. 2024): how much smaller the upcycled MoE output is than the dense output."""
    replicas = moe_cfg.num_experts // granularity
    if moe_cfg.router_pre_softmax:
        return replicas * granularity**2 / moe_cfg.topk
    return float(granularity)


def weight_scales(spec: ScaleOutSpec, moe_cfg, *, gated: bool = True) -> tuple[float, float]:
    """(fc1 factor, fc2 factor) for the chosen weight-scaling mode."""
    a = activation_scale(moe_cfg, spec.granularity)
    if spec.weight_scaling == "none":
        return 1.0, 1.0
    if spec.weight_scaling == "exact":
        return 1.0, a
    if spec.weight_scaling == "auto":
        root = a ** (1 / 3) if gated else math.sqrt(a)
        return root, root
    raise UpcycleError(f"--weight-scaling {spec.weight_scaling}: expected auto|exact|none")


def check(src: ModelConfig, dst: ModelConfig, spec: ScaleOutSpec) -> None:
    """Refuse shapes that cannot be upcycled, naming the numbers."""
    moe, g = dst.moe, spec.granularity
    if moe is None:
        raise UpcycleError("the target model has no model.moe section")
    if src.moe is not None:
        raise UpcycleError("the source is already a mixture of experts")
    if src.ffn_hidden_size % g:
        raise UpcycleError(f"--granularity {g} must divide the dense ffn_hidden_size "
                           f"{src.ffn_hidden_size}")
    if moe.num_experts % g:
        raise UpcycleError(f"--granularity {g} must divide --num-experts {moe.num_experts}")
    width = moe.ffn_hidden_size or dst.ffn_hidden_size
    if width != src.ffn_hidden_size // g:
        raise UpcycleError(f"expert width {width} must be ffn_hidden_size/G = "
                           f"{src.ffn_hidden_size // g}")
    if not 0 <= spec.drop_upcycling < 1:
        raise UpcycleError(f"--drop-upcycling {spec.drop_upcycling}: expected a fraction in "
                           "[0, 1) of each expert's units to re-initialize")
    if g > 1 and moe.topk % g:
        raise UpcycleError(f"--topk {moe.topk} must be a multiple of --granularity {g}: a "
                           "token's top-k must take whole virtual groups to cover every shard")


def _router(num_experts: int, hidden: int, spec: ScaleOutSpec, gen: torch.Generator):
    groups = num_experts // spec.granularity
    if spec.router_init == "zeros":
        rows = torch.zeros(groups, hidden)
    elif spec.router_init == "normal":
        rows = torch.randn(groups, hidden, generator=gen, dtype=torch.float64) * spec.router_std
    else:
        raise UpcycleError(f"--router-init {spec.router_init}: expected normal|zeros")
    return rows.repeat_interleave(spec.granularity, dim=0)  # expert e -> row e // G


def _noisy(t: torch.Tensor, spec: ScaleOutSpec, gen: torch.Generator) -> torch.Tensor:
    if spec.noise == 0:
        return t
    noise = torch.randn(t.shape, generator=gen, dtype=torch.float64)
    return (t.double() + noise * spec.noise * t.double().std()).to(t.dtype)


def _statistics(t: torch.Tensor) -> tuple[float, float]:
    t = t.double()
    return t.mean().item(), t.std().item()


def _fresh(shape, stats: tuple[float, float], scale: float, gen: torch.Generator,
           dtype: torch.dtype) -> torch.Tensor:
    """N(mean, std) values of a dense matrix, times the expert's scale, in its dtype."""
    mean, std = stats
    return ((torch.randn(shape, generator=gen, dtype=torch.float64) * std + mean) *
            scale).to(dtype)


def _drop(fc1: torch.Tensor, fc2: torch.Tensor, stats: dict, scales: tuple[float, float],
          k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's (fc1 [2w, h], fc2 [h, w]) with k of its w units re-initialized (Drop-Upcycling).

    Units: round(r·w) of the expert's own w = f/G (a shard's units, not the dense FFN's). Values:
    the dense source matrix's statistics times the expert's weight scale, so a fresh unit has the
    magnitude the copied units of that expert got (with exact or auto scaling an unscaled unit
    would be a or a^(1/3) times too small against them; a = 1 in the paper's setting, G = 1 with
    top-k-then-softmax, where this is the paper's method). Draws, in order: the units, the gate
    rows, the up rows, the fc2 columns."""
    w = fc2.shape[1]
    units = torch.randperm(w, generator=gen)[:k].sort().values
    fc1, fc2 = fc1.clone(), fc2.clone()
    h = fc2.shape[0]
    fc1[units] = _fresh((k, h), stats["gate"], scales[0], gen, fc1.dtype)
    fc1[w + units] = _fresh((k, h), stats["up"], scales[0], gen, fc1.dtype)
    fc2[:, units] = _fresh((h, k), stats["down"], scales[1], gen, fc2.dtype)
    return fc1, fc2


def scale_out(state: StateDict, src: ModelConfig, dst: ModelConfig, *,
              spec: ScaleOutSpec) -> tuple[StateDict, dict]:
    """The MoE state dict and a record of what went where (for the report)."""
    check(src, dst, spec)
    moe, g = dst.moe, spec.granularity
    fc1_scale, fc2_scale = weight_scales(spec, moe)
    gen = torch.Generator().manual_seed(spec.seed)
    drop_gen = torch.Generator().manual_seed(spec.seed + DROP_SEED_OFFSET)
    width = src.ffn_hidden_size // g
    k = round(spec.drop_upcycling * width)  # units re-initialized per expert
    moe_layers = [i for i in range(src.num_layers) if is_moe_layer(dst, i)]
    dense_ffn = {layer_key(i, name) for i in moe_layers for name in (FC1, FC2)}
    # attention, norms, embeddings, the MLPs of dense layers: copied
    out = {key: tensor.clone() for key, tensor in state.items() if key not in dense_ffn}
    layers = {}
    for i in moe_layers:
        gate, up = state[layer_key(i, FC1)].chunk(2, dim=0)
        down = state[layer_key(i, FC2)]
        gates, ups, downs = gate.chunk(g, 0), up.chunk(g, 0), down.chunk(g, 1)
        # (mean, std) of the whole dense matrices, for the dropped units (only when some are)
        stats = {"gate": _statistics(gate), "up": _statistics(up),
                 "down": _statistics(down)} if k else None
        for e in range(moe.num_experts):
            s = e % g
            fc1 = _noisy(torch.cat([gates[s], ups[s]]) * fc1_scale, spec, gen).contiguous()
            fc2 = _noisy(downs[s] * fc2_scale, spec, gen).contiguous()
            if k:
                fc1, fc2 = _drop(fc1, fc2, stats, (fc1_scale, fc2_scale), k, drop_gen)
            out[layer_key(i, EXPERT_FC1, e=e)] = fc1
            out[layer_key(i, EXPERT_FC2, e=e)] = fc2
        out[layer_key(i, ROUTER)] = _router(moe.num_experts, src.hidden_size, spec,
                                            gen).to(gate.dtype)
        layers[i] = {"experts": {e: {"shard": e % g, "virtual_group": e // g}
                                 for e in range(moe.num_experts)}}
        if k:
            layers[i]["dense_statistics"] = stats
    record = {"granularity": g, "virtual_groups": moe.num_experts // g,
              "activation_scale": activation_scale(moe, g),
              "weight_scaling": {"mode": spec.weight_scaling, "fc1": fc1_scale, "fc2": fc2_scale},
              "router": {"init": spec.router_init, "std": spec.router_std, "seed": spec.seed},
              "noise": spec.noise,
              "drop_upcycling": {"fraction": spec.drop_upcycling, "units_per_expert": k,
                                 "expert_units": width,
                                 "seed": spec.seed + DROP_SEED_OFFSET if k else None},
              "moe_layers": layers}
    return out, record
