"""Scale-Out math (pure): shards, virtual-group routers, weight scaling (He et al. 2024)."""

import pytest
import torch

from engine.config.recipe import ModelConfig, MoEConfig
from engine.upcycle import UpcycleError
from engine.upcycle.scale_out import ScaleOutSpec, activation_scale, scale_out, weight_scales

H, F, L = 8, 12, 2


def configs(experts=4, topk=2, g=1, pre_softmax=False, layer_freq=1):
    dense = ModelConfig(num_layers=L, hidden_size=H, ffn_hidden_size=F, num_attention_heads=2,
                        vocab_size=16)
    moe = MoEConfig(num_experts=experts, topk=topk, ffn_hidden_size=F // g,
                    router_pre_softmax=pre_softmax, layer_freq=layer_freq)
    from dataclasses import replace
    return dense, replace(dense, moe=moe)


def dense_state(seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = {"embedding.word_embeddings.weight": torch.randn(16, H, generator=gen)}
    for i in range(L):
        p = f"decoder.layers.{i}"
        state[f"{p}.mlp.linear_fc1.weight"] = torch.randn(2 * F, H, generator=gen)
        state[f"{p}.mlp.linear_fc2.weight"] = torch.randn(H, F, generator=gen)
        state[f"{p}.input_layernorm.weight"] = torch.rand(H, generator=gen)
    return state


def test_he_et_al_example_e8g8t8_scales_weights_by_4():
    """arXiv 2410.07524: expansion 8, granularity 8, top-8, softmax before top-k -> (E G^2/T)^(1/3)
    = (8 * 64 / 8)^(1/3) = 4 on fc1 and fc2 of a gated FFN."""
    _, moe = configs(experts=64, topk=8, g=8, pre_softmax=True)
    assert activation_scale(moe.moe, 8) == 64
    assert weight_scales(ScaleOutSpec(granularity=8), moe.moe) == pytest.approx((4.0, 4.0))
    assert weight_scales(ScaleOutSpec(granularity=8, weight_scaling="exact"), moe.moe) == (1.0, 64)
    _, topk_first = configs(experts=64, topk=8, g=8)
    assert activation_scale(topk_first.moe, 8) == 8  # a = G after top-k-then-softmax


def test_coarse_experts_equal_the_dense_ffn():
    dense, moe = configs()
    state = dense_state()
    out, record = scale_out(state, dense, moe, spec=ScaleOutSpec())
    for i in range(L):
        for e in range(4):
            expert = f"decoder.layers.{i}.mlp.experts.local_experts.{e}"
            assert torch.equal(out[f"{expert}.linear_fc1.weight"],
                               state[f"decoder.layers.{i}.mlp.linear_fc1.weight"])
            assert torch.equal(out[f"{expert}.linear_fc2.weight"],
                               state[f"decoder.layers.{i}.mlp.linear_fc2.weight"])
        assert f"decoder.layers.{i}.mlp.linear_fc1.weight" not in out
        assert out[f"decoder.layers.{i}.mlp.router.weight"].shape == (4, H)
    assert torch.equal(out["decoder.layers.0.input_layernorm.weight"],
                       state["decoder.layers.0.input_layernorm.weight"])
    assert record["weight_scaling"]["fc1"] == 1.0


def test_granular_shards_split_gate_and_up_separately():
    dense, moe = configs(experts=4, topk=2, g=2)
    state = dense_state()
    out, _ = scale_out(state, dense, moe, spec=ScaleOutSpec(granularity=2, weight_scaling="none"))
    gate, up = state["decoder.layers.0.mlp.linear_fc1.weight"].chunk(2)
    down = state["decoder.layers.0.mlp.linear_fc2.weight"]
    for e in range(4):
        s = e % 2
        fc1 = out[f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.weight"]
        assert torch.equal(fc1, torch.cat([gate[6 * s:6 * s + 6], up[6 * s:6 * s + 6]]))
        fc2 = out[f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc2.weight"]
        assert torch.equal(fc2, down[:, 6 * s:6 * s + 6])


@pytest.mark.parametrize("g, topk", [(2, 2), (4, 4), (2, 4)])
def test_virtual_groups_make_every_top_k_cover_each_shard(g, topk):
    dense, moe = configs(experts=8, topk=topk, g=g)
    out, _ = scale_out(dense_state(), dense, moe,
                       spec=ScaleOutSpec(granularity=g, seed=3, router_std=1.0))
    router = out["decoder.layers.0.mlp.router.weight"]
    tokens = torch.randn(1000, H, generator=torch.Generator().manual_seed(5))
    chosen = (tokens @ router.T).topk(topk, dim=-1).indices  # [tokens, topk]
    shards = chosen % g
    counts = torch.stack([(shards == s).sum(-1) for s in range(g)], -1)
    assert (counts == topk // g).all()  # each shard exactly topk/G times per token


def test_layer_freq_leaves_other_layers_dense():
    dense, moe = configs(layer_freq=2)
    out, record = scale_out(dense_state(), dense, moe, spec=ScaleOutSpec())
    assert "decoder.layers.1.mlp.linear_fc1.weight" in out
    assert "decoder.layers.0.mlp.router.weight" in out and list(record["moe_layers"]) == [0]


def test_noise_differs_per_expert_and_is_seeded():
    dense, moe = configs()
    a, _ = scale_out(dense_state(), dense, moe, spec=ScaleOutSpec(noise=0.01, seed=1))
    b, _ = scale_out(dense_state(), dense, moe, spec=ScaleOutSpec(noise=0.01, seed=1))
    key = "decoder.layers.0.mlp.experts.local_experts.{}.linear_fc1.weight"
    assert torch.equal(a[key.format(0)], b[key.format(0)])
    assert not torch.equal(a[key.format(0)], a[key.format(1)])


@pytest.mark.parametrize("kwargs, g, match", [
    ({"experts": 4, "topk": 2, "g": 5}, 5, "must divide the dense ffn_hidden_size"),
    ({"experts": 6, "topk": 2, "g": 4}, 4, "must divide the dense ffn_hidden_size|must divide"),
    ({"experts": 8, "topk": 3, "g": 2}, 2, "multiple of --granularity"),
])
def test_impossible_shapes_are_refused(kwargs, g, match):
    dense, moe = configs(**{**kwargs, "g": 1})
    from dataclasses import replace
    moe = replace(moe, moe=replace(moe.moe, ffn_hidden_size=max(F // g, 1)))
    with pytest.raises(UpcycleError, match=match):
        scale_out(dense_state(), dense, moe, spec=ScaleOutSpec(granularity=g))
