"""The moments' map of --carry-optimizer (engine.upcycle.moments), proved on its premise: for a
function-preserving growth, the grown model's gradient at every element with a source is
a_j times the source's gradient at that element, and zero on identity blocks. Gradients come
from test_scale_up's fp64 reference forward (autograd), independent of the engine's model; the
maps come from engine.upcycle.moments. A wrong a (a copy taken for a split, the exact method's
s missed) is off by a factor of 2 or sqrt(2), far outside 1e-10."""

import pytest
import torch

from engine.upcycle.moments import carry_moments, element_maps
from engine.upcycle.scale_up import ScaleUpSpec, scale_up
from tests.unit.upcycle.test_scale_up import (
    INTEGER_RATIOS,
    NON_INTEGER,
    TOKENS,
    logits,
    model,
    random_state,
)


def loss_and_grads(state: dict, m) -> dict:
    params = {k: v.clone().requires_grad_(True) for k, v in state.items()}
    out = logits(params, m, TOKENS[:, :-1])
    loss = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                             TOKENS[:, 1:].reshape(-1))
    loss.backward()
    return {k: p.grad for k, p in params.items()}


CASES = {  # function-preserving growths: (src, dst, spec)
    "exact-non-integer": (*NON_INTEGER["groups-2-to-4"], dict(width_method="exact", seed=3)),
    "exact-heads-per-group": (*NON_INTEGER["heads-per-group-2-to-3"],
                              dict(width_method="exact")),
    # (a tied source is left out: its one embedding's gradient sums the input and output uses,
    # which the grown model's separate embedding and output layer each see alone)
    "fpi-x2": (*INTEGER_RATIOS["groups-x2"], dict(width_method="fpi")),
    "fpi-x2-heads-per-group": (*INTEGER_RATIOS["heads-per-group-x2"], dict(width_method="fpi")),
    "identity-depth": (model(), model(layers=5), dict(width_method="exact",
                                                      depth_method="identity")),
    "exact-and-identity": (model(), model(layers=3, hidden=48, ffn=64, heads=6),
                           dict(width_method="exact", depth_method="identity")),
}


@pytest.mark.parametrize("name", CASES)
def test_grown_gradient_is_a_times_the_source_gradient(name):
    src, dst, spec = CASES[name]
    spec = ScaleUpSpec(**spec)
    state = random_state(src)
    grown, smap = scale_up(state, src, dst, spec=spec)
    g_src, g_dst = loss_and_grads(state, src), loss_and_grads(grown, dst)
    keys, maps = element_maps(state, src, dst, spec)
    flat = torch.cat([g_src[k].reshape(-1) for k in keys])
    scale = max(g.abs().max().item() for g in g_src.values())
    identity = {i for i, s in enumerate(smap.layers) if s.identity}
    carried = 0
    for name_, em in maps.items():
        sourced = em.index >= 0
        expected = torch.where(sourced, em.gradient_scale * flat[em.index.clamp(min=0)], 0.0)
        got = torch.where(sourced, g_dst[name_], 0.0)
        assert (got - expected).abs().max().item() <= 1e-10 * scale, name_
        carried += int(sourced.sum())
        layer = name_.split(".")[2] if name_.startswith("decoder.layers.") else None
        if layer is not None and int(layer) in identity:
            assert not sourced.any()  # an identity block starts from zero moments
            if not name_.endswith(("linear_proj.weight", "linear_fc2.weight")):
                assert g_dst[name_].abs().max().item() <= 1e-12 * scale  # and has no gradient
    assert carried == sum(v.numel() for v in state.values()) or identity or \
        spec.width_method == "fpi"  # exact: every source element appears exactly once


def test_carried_moments_follow_the_gradient_scale():
    src, dst = NON_INTEGER["groups-2-to-4"]
    spec = ScaleUpSpec(width_method="exact")
    state = random_state(src)
    m = {k: torch.randn(v.shape, dtype=torch.float64) for k, v in state.items()}
    v = {k: torch.rand(t.shape, dtype=torch.float64) + 0.1 for k, t in state.items()}
    m2, v2, summary = carry_moments(m, v, src, dst, spec)
    s = (dst.hidden_size / src.hidden_size) ** 0.5
    h = src.hidden_size
    emb = "embedding.word_embeddings.weight"  # a writer: W' = s W, so a = 1/s
    assert torch.allclose(m2[emb][:, :h].double(), m[emb] / s, rtol=1e-6)
    assert torch.allclose(v2[emb][:, :h].double(), v[emb] / s**2, rtol=1e-6)
    assert not m2[emb][:, h:].any() and not v2[emb][:, h:].any()
    out = "output_layer.weight"  # a reader: W' = W / s, so a = s
    assert torch.allclose(m2[out][:, :h].double(), m[out] * s, rtol=1e-6)
    norm = "decoder.layers.0.input_layernorm.weight"  # gains: a = 1; the new ones: no source
    assert torch.allclose(m2[norm][:h].double(), m[norm], rtol=1e-6)
    assert not m2[norm][h:].any()
    total = sum(t.numel() for t in m2.values())
    assert summary["carried"] == sum(t.numel() for t in state.values())
    assert summary["carried"] + summary["zero"] == total


def test_stacked_layers_each_carry_their_source_layer():
    """Stacking is not function preserving; each copy starts from its source layer's state."""
    src, dst = model(), model(layers=4)
    state = random_state(src)
    m = {k: torch.randn(t.shape, dtype=torch.float64) for k, t in state.items()}
    m2, _, summary = carry_moments(m, m, src, dst, ScaleUpSpec(depth_method="stack"))
    for target in range(4):
        name = "mlp.linear_fc1.weight"
        assert torch.equal(m2[f"decoder.layers.{target}.{name}"],
                           m[f"decoder.layers.{target % 2}.{name}"].float())
    assert summary["zero"] == 0
