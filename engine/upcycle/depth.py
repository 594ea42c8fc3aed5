"""Depth growth (Scale-Up): which source layer each of the L2 target layers copies.

Pure: integers in, a tuple of `LayerSource` out; `scale_up.py` applies it to the (width-grown)
layer tensors. With L1 source layers and L2 >= L1 target layers:

- stack (bert2BERT, arXiv 2110.07143, and StackBERT before it): W'_l = W_(l mod L1), the whole
  model repeated on top of itself.
- interpolate (AquilaMoE, arXiv 2408.06567, the depth step of AKI-Pro):
  W'_l = W_floor(l*L1/L2): every source layer in order, each repeated in place; for L1=3, L2=6
  the map is [0, 0, 1, 1, 2, 2] (the paper's example), for 32 -> 40 eight layers appear twice.
- identity (LLaMA-Pro's block expansion, Wu et al. 2024, arXiv 2401.02415): the L1 source
  layers in order, with E = L2 - L1 identity blocks inserted: block k follows source layer
  ceil((k+1)*L1/E) - 1. For E <= L1 the model is cut into E groups of about L1/E layers and each
  group's last layer is followed by one copy of itself (LLaMA-Pro's 32 -> 40: after layers 3, 7,
  ..., 31). The copy has its attention output projection and MLP down projection zeroed, so the
  pre-norm residual block x -> x + attn(norm(x)) + mlp(norm(.)) computes x + 0 + 0 = x exactly;
  those projections still get gradient (their inputs are not zero), so the block trains.

Stacking and interpolation are not function-preserving (a repeated layer adds its update
twice); the report measures the change.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.models.weights import FC2, PROJ

DEPTH_METHODS = ("stack", "interpolate", "identity")

ZEROED_IN_IDENTITY = (PROJ, FC2)
"""What an identity block zeroes: o_proj and down_proj (LLaMA-Pro)."""


@dataclass(frozen=True, slots=True)
class LayerSource:
    """Target layer <- source layer `source` (width-grown); `identity`: a LLaMA-Pro block."""

    source: int
    identity: bool = False


def depth_map(old: int, new: int, method: str) -> tuple[LayerSource, ...]:
    """The source of each of `new` target layers, for `old` source layers (new >= old)."""
    if method == "stack":
        return tuple(LayerSource(layer % old) for layer in range(new))
    if method == "interpolate":
        return tuple(LayerSource(layer * old // new) for layer in range(new))
    if method == "identity":
        extra = new - old
        after = [-(-(k + 1) * old // extra) - 1 for k in range(extra)]  # ceil((k+1)L1/E) - 1
        plan = []
        for layer in range(old):
            plan.append(LayerSource(layer))
            plan.extend(LayerSource(layer, identity=True) for _ in range(after.count(layer)))
        return tuple(plan)
    raise ValueError(f"depth method {method!r}: expected one of {'|'.join(DEPTH_METHODS)}")
