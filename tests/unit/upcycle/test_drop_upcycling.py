"""Drop-Upcycling (Nakamura et al. 2025, arXiv 2502.19261) in Scale-Out: per expert, a seeded
random fraction r of its own intermediate units re-initialized from the dense matrices'
statistics; r = 0 is plain upcycling bit for bit."""

import argparse
import math
from dataclasses import replace

import pytest
import torch

from engine.config.recipe import ModelConfig, MoEConfig
from engine.options import add_options
from engine.upcycle import UpcycleError
from engine.upcycle.commands import ScaleOutOptions, scale_out_inexact
from engine.upcycle.scale_out import ScaleOutSpec, scale_out, weight_scales

L = 2
FC1 = "decoder.layers.{}.mlp.experts.local_experts.{}.linear_fc1.weight"
FC2 = "decoder.layers.{}.mlp.experts.local_experts.{}.linear_fc2.weight"
ROUTER = "decoder.layers.{}.mlp.router.weight"
# (mean, std) of the dense gate, up and down matrices: distinct, so a mix-up shows
GATE, UP, DOWN = (0.3, 0.5), (-0.2, 1.5), (0.1, 0.02)


def configs(h=8, f=16, experts=8, topk=2, g=1, pre_softmax=False):
    dense = ModelConfig(num_layers=L, hidden_size=h, ffn_hidden_size=f, num_attention_heads=2,
                        vocab_size=16)
    moe = MoEConfig(num_experts=experts, topk=topk, ffn_hidden_size=f // g,
                    router_pre_softmax=pre_softmax)
    return dense, replace(dense, moe=moe)


def dense_state(dense: ModelConfig, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h, f = dense.hidden_size, dense.ffn_hidden_size

    def normal(shape, stats):
        return torch.randn(shape, generator=gen) * stats[1] + stats[0]

    state = {"embedding.word_embeddings.weight": torch.randn(16, h, generator=gen)}
    for i in range(L):
        p = f"decoder.layers.{i}"
        state[f"{p}.mlp.linear_fc1.weight"] = torch.cat([normal((f, h), GATE),
                                                         normal((f, h), UP)])
        state[f"{p}.mlp.linear_fc2.weight"] = normal((h, f), DOWN)
        state[f"{p}.input_layernorm.weight"] = torch.rand(h, generator=gen)
    return state


def changed_units(plain, dropped, i, e):
    """(gate rows, up rows, fc2 columns) of expert e in layer i that differ from plain."""
    fc1, fc1_plain = dropped[FC1.format(i, e)], plain[FC1.format(i, e)]
    w = fc1.shape[0] // 2
    rows = (fc1 != fc1_plain).any(dim=1)
    cols = (dropped[FC2.format(i, e)] != plain[FC2.format(i, e)]).any(dim=0)
    return (set(rows[:w].nonzero().flatten().tolist()), set(rows[w:].nonzero().flatten().tolist()),
            set(cols.nonzero().flatten().tolist()))


@pytest.mark.parametrize("g, noise, pre_softmax", [(1, 0.0, False), (2, 0.01, True),
                                                   (4, 0.0, False)])
def test_zero_is_plain_upcycling_bit_for_bit(g, noise, pre_softmax):
    dense, moe = configs(g=g, topk=4, pre_softmax=pre_softmax)
    state = dense_state(dense)
    spec = ScaleOutSpec(granularity=g, noise=noise, seed=5)
    plain, record = scale_out(state, dense, moe, spec=spec)
    zero, _ = scale_out(state, dense, moe, spec=replace(spec, drop_upcycling=0.0))
    assert plain.keys() == zero.keys() and all(torch.equal(plain[k], zero[k]) for k in plain)
    assert record["drop_upcycling"]["units_per_expert"] == 0
    if noise == 0:  # and that is the copy: expert e = shard e mod G, scaled
        f1, f2 = weight_scales(spec, moe.moe)
        gate, up = state["decoder.layers.0.mlp.linear_fc1.weight"].chunk(2)
        w = dense.ffn_hidden_size // g
        for e in range(moe.moe.num_experts):
            s = slice((e % g) * w, (e % g + 1) * w)
            assert torch.equal(plain[FC1.format(0, e)], torch.cat([gate[s], up[s]]) * f1)
            assert torch.equal(plain[FC2.format(0, e)],
                               state["decoder.layers.0.mlp.linear_fc2.weight"][:, s] * f2)


@pytest.mark.parametrize("g, r, noise", [(1, 0.5, 0.0), (2, 0.5, 0.0), (2, 0.5, 0.01),
                                         (4, 0.3, 0.0)])
def test_each_expert_reinitializes_round_r_of_its_own_units(g, r, noise):
    dense, moe = configs(g=g, topk=4)
    state = dense_state(dense)
    spec = ScaleOutSpec(granularity=g, noise=noise, seed=1)
    plain, _ = scale_out(state, dense, moe, spec=spec)
    dropped, record = scale_out(state, dense, moe, spec=replace(spec, drop_upcycling=r))
    k = round(r * (dense.ffn_hidden_size // g))
    assert k > 0 and record["drop_upcycling"]["units_per_expert"] == k
    for i in range(L):
        for e in range(moe.moe.num_experts):
            gate, up, down = changed_units(plain, dropped, i, e)
            # the same k units in all three matrices; every other unit is the plain copy exactly
            assert gate == up == down and len(gate) == k, (i, e)
        assert torch.equal(dropped[ROUTER.format(i)], plain[ROUTER.format(i)])
    others = [key for key in plain if ".local_experts." not in key]
    assert all(torch.equal(plain[key], dropped[key]) for key in others)


def test_subsets_differ_between_experts_and_repeat_with_the_seed():
    dense, moe = configs(g=2, topk=4)
    state = dense_state(dense)
    spec = ScaleOutSpec(granularity=2, drop_upcycling=0.5, seed=3)
    plain, _ = scale_out(state, dense, moe, spec=replace(spec, drop_upcycling=0.0))

    def subsets(out):
        return [[frozenset(changed_units(plain, out, i, e)[0]) for e in range(8)]
                for i in range(L)]

    a, b = scale_out(state, dense, moe, spec=spec)[0], scale_out(state, dense, moe, spec=spec)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for layer in subsets(a):  # 8 experts, C(8, 4) = 70 subsets: all distinct at this seed,
        assert len(set(layer)) == 8  # including experts e, e+2 that hold the same shard
    other = scale_out(state, dense, moe, spec=replace(spec, seed=4))[0]
    assert subsets(other) != subsets(a)


def test_fresh_values_follow_the_dense_statistics_times_the_expert_scale():
    """n values per matrix and layer: the sample mean within 5 standard errors (std/sqrt(n)) of the
    dense matrix's mean, the sample std within 5 of its own (about std/sqrt(2n))."""
    # softmax before top-k, E=8, G=2, T=2: a = R G^2 / T = 8, auto scaling a^(1/3) = 2
    dense, moe = configs(h=64, f=256, experts=8, topk=2, g=2, pre_softmax=True)
    state = dense_state(dense)
    spec = ScaleOutSpec(granularity=2, drop_upcycling=0.5, seed=7)
    f1, f2 = weight_scales(spec, moe.moe)
    assert (f1, f2) == pytest.approx((2.0, 2.0))
    plain, _ = scale_out(state, dense, moe, spec=replace(spec, drop_upcycling=0.0))
    out, record = scale_out(state, dense, moe, spec=spec)
    for i in range(L):
        fresh = {"gate": [], "up": [], "down": []}
        for e in range(8):
            units = sorted(changed_units(plain, out, i, e)[0])
            fc1, fc2 = out[FC1.format(i, e)], out[FC2.format(i, e)]
            w = fc1.shape[0] // 2
            fresh["gate"].append(fc1[units] / f1)
            fresh["up"].append(fc1[[w + u for u in units]] / f1)
            fresh["down"].append(fc2[:, units] / f2)
        gate, up = state[f"decoder.layers.{i}.mlp.linear_fc1.weight"].double().chunk(2)
        down = state[f"decoder.layers.{i}.mlp.linear_fc2.weight"].double()
        for name, source in (("gate", gate), ("up", up), ("down", down)):
            values = torch.cat([v.flatten() for v in fresh[name]]).double()
            n, mean, std = values.numel(), source.mean().item(), source.std().item()
            assert n == 8 * 64 * 64
            assert abs(values.mean().item() - mean) < 5 * std / math.sqrt(n), (i, name)
            assert abs(values.std().item() - std) < 5 * std / math.sqrt(2 * n), (i, name)
            assert record["moe_layers"][i]["dense_statistics"][name] == pytest.approx((mean, std))


@pytest.mark.parametrize("r", [-0.1, 1.0, 1.5, float("nan")])
def test_fraction_outside_zero_one_is_refused(r):
    dense, moe = configs()
    with pytest.raises(UpcycleError, match=r"^--drop-upcycling .*expected a fraction in \[0, 1\)"):
        scale_out(dense_state(dense), dense, moe, spec=ScaleOutSpec(drop_upcycling=r))


def test_flag_and_report_say_not_exact():
    parser = argparse.ArgumentParser()
    add_options(parser, ScaleOutOptions)
    args = parser.parse_args(["--num-experts", "8", "--topk", "2", "--drop-upcycling", "0.5"])
    assert args.drop_upcycling == 0.5
    _, moe = configs()
    assert scale_out_inexact(moe.moe, ScaleOutSpec()) == []
    assert scale_out_inexact(moe.moe, ScaleOutSpec(drop_upcycling=0.5)) == [
        "drop_upcycling 0.5 (re-initialized units)"]
