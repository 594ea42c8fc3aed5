"""Layout-independent random init: each tensor is a function of (seed, key, layer/expert index),
the rules give megatron-core's distributions, and a rank's slices (plain and SwiGLU-factory
shards, built with megatron's own sharding helpers, no process group) put back together equal the
one-process draw exactly."""

import math

import pytest
import torch

from engine.config.recipe import ModelConfig
from engine.models import FAMILIES
from engine.models.initialize import InitSpec, draw_full, init_spec, initialize_weights, key_seed
from engine.models.weights import INIT_RULES, init_rule

SPEC = InitSpec(seed=7, std=0.02, scaled_std=0.02 / math.sqrt(8), vocab_size=10)
QKV = "decoder.layers.self_attention.linear_qkv.weight"
FC1 = "decoder.layers.mlp.linear_fc1.weight"


def test_key_seed_is_stable_and_separates_seed_key_and_index():
    assert key_seed(7, QKV, (0,)) == key_seed(7, QKV, (0,))
    seeds = {key_seed(7, QKV, (0,)), key_seed(8, QKV, (0,)), key_seed(7, FC1, (0,)),
             key_seed(7, QKV, (1,)), key_seed(7, QKV, (0, 1))}
    assert len(seeds) == 5 and all(0 <= s < 2**63 for s in seeds)


def test_draws_follow_megatron_distributions():
    assert torch.equal(draw_full("decoder.final_layernorm.weight", (), (64,), SPEC),
                       torch.ones(64))
    assert torch.equal(draw_full("decoder.layers.self_attention.linear_qkv.bias", (2,), (6,),
                                 SPEC), torch.zeros(6))
    normal = draw_full(QKV, (0,), (256, 256), SPEC)
    scaled = draw_full("decoder.layers.mlp.linear_fc2.weight", (0,), (256, 256), SPEC)
    assert normal.std().item() == pytest.approx(SPEC.std, rel=0.02)
    assert scaled.std().item() == pytest.approx(SPEC.scaled_std, rel=0.02)
    assert abs(normal.mean().item()) < 1e-3 and normal.dtype == torch.float32


def test_a_tensor_depends_on_its_key_and_index_only():
    a = draw_full(QKV, (1,), (8, 4), SPEC)
    assert torch.equal(a, draw_full(QKV, (1,), (8, 4), SPEC))
    assert not torch.equal(a, draw_full(QKV, (2,), (8, 4), SPEC))
    assert not torch.equal(a, draw_full(FC1, (1,), (8, 4), SPEC))


def test_vocab_rows_do_not_depend_on_the_padding():
    """Padding rows (more at a larger tp) are zero; the token rows are the same values."""
    emb = "embedding.word_embeddings.weight"
    at_tp1, at_tp8 = draw_full(emb, (), (16, 4), SPEC), draw_full(emb, (), (32, 4), SPEC)
    assert torch.equal(at_tp1[:10], at_tp8[:10])
    assert not at_tp1[10:].any() and not at_tp8[10:].any() and at_tp1[:10].all()


def test_init_spec_scales_the_output_projections_by_two_layers():
    model = ModelConfig(num_layers=8, hidden_size=16, ffn_hidden_size=32, num_attention_heads=2,
                        vocab_size=10, init_method_std=0.01)
    spec = init_spec(model, seed=3, vocab_size=10)
    assert spec.std == 0.01 and spec.scaled_std == pytest.approx(0.01 / 4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_weight_has_an_init_rule(family):
    """Every engine tensor name of every family table (state-dict spelling; the checkpoint
    spelling of norms is TE's `layer_norm_weight`, covered by its own rule)."""
    for weight_map in FAMILIES[family].weights:
        name = weight_map.engine.format(i=0, e=0)
        kind = init_rule(name)
        if "layernorm" in name:
            assert kind == "ones", name
        elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            assert kind == "scaled", name
    assert init_rule("decoder.layers.self_attention.linear_qkv.layer_norm_weight") == "ones"
    assert init_rule("decoder.layers.mlp.router.weight") == "normal"
    assert {kind for _, kind in INIT_RULES} == {"vocab", "ones", "zeros", "normal", "scaled"}


def test_a_key_without_a_rule_is_refused():
    with pytest.raises(KeyError, match="core_attention.softmax_offset.*INIT_RULES"):
        init_rule("decoder.layers.self_attention.core_attention.softmax_offset")


class FakeChunk(torch.nn.Module):
    """One rank's share of layer 3 of a model: linear_qkv split on rows over `tp` ranks
    (offsets of a TP shard) and a SwiGLU fc1 [gate; up] split like megatron's MLP (each half
    split separately: a ShardedTensorFactory), both behind a prepended layer axis."""

    def __init__(self, tp: int, rank: int, extra: bool = False):
        super().__init__()
        self.tp, self.rank = tp, rank
        self.qkv = torch.nn.Parameter(torch.empty(8 // tp, 4))
        self.fc1 = torch.nn.Parameter(torch.empty(12 // tp, 4))
        self.register_buffer("bias_buffer", torch.full((3,), 5.0))
        self.extra = torch.nn.Parameter(torch.empty(2)) if extra else None

    def sharded_state_dict(self):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        layer = (0, 3, 4)  # axis 0: layer 3 of 4
        qkv = ShardedTensor.from_rank_offsets(QKV, self.qkv, layer, (1, self.rank, self.tp),
                                              prepend_axis_num=1)
        fc1 = ShardedTensor.from_rank_offsets(FC1, self.fc1, layer, (1, self.rank, self.tp),
                                              prepend_axis_num=1)
        buffer = ShardedTensor.from_rank_offsets("decoder.layers.mlp.router.weight",
                                                 self.bias_buffer)
        return {"qkv": qkv, "fc1": apply_swiglu_sharded_factory(fc1, (layer,)),
                "buffer": buffer}


def test_tensor_parallel_slices_put_together_equal_the_one_process_draw():
    whole = FakeChunk(1, 0)
    initialize_weights([whole], SPEC)
    ranks = [FakeChunk(2, r) for r in range(2)]
    for chunk in ranks:
        initialize_weights([chunk], SPEC)
    assert torch.equal(whole.qkv, torch.cat([c.qkv for c in ranks]))
    assert torch.equal(whole.qkv, draw_full(QKV, (3,), (8, 4), SPEC))
    gate, up = whole.fc1.detach().chunk(2)  # TP=2 rank r holds [gate_r; up_r]
    for r, chunk in enumerate(ranks):
        assert torch.equal(chunk.fc1, torch.cat([gate.chunk(2)[r], up.chunk(2)[r]]))
    assert torch.equal(whole.fc1, draw_full(FC1, (3,), (12, 4), SPEC))
    assert torch.equal(whole.bias_buffer, torch.full((3,), 5.0))  # buffers are not weights


def test_a_parameter_no_checkpoint_key_covers_is_an_error():
    with pytest.raises(RuntimeError, match=r"no checkpoint key covers \['extra'\]"):
        initialize_weights([FakeChunk(1, 0, extra=True)], SPEC)
