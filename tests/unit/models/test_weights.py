"""The layout transforms: megatron's fused QKV order, exact inverses, and the driver's checks."""

import pytest
import torch

from engine.config.recipe import ModelConfig
from engine.convert import ConvertError
from engine.convert.mapping import to_engine, to_hf
from engine.models import FAMILIES
from engine.models.weights import Shape, fuse_gate_up, fuse_qkv, split_gate_up, split_qkv


def shape(heads=4, groups=2, head_dim=3, hidden=5, vocab=10, padded=16, **kw) -> Shape:
    model = ModelConfig(num_layers=2, hidden_size=hidden, ffn_hidden_size=7,
                        num_attention_heads=heads, num_query_groups=groups, kv_channels=head_dim,
                        vocab_size=vocab, **kw)
    return Shape(model, padded)


def test_fused_qkv_interleaves_whole_query_groups():
    s = shape()  # 4 heads in 2 groups, head_dim 3
    q = torch.arange(4 * 3).repeat_interleave(1).view(12, 1).float() + 100  # head h: rows 3h..3h+2
    k = torch.arange(2 * 3).view(6, 1).float() + 200
    v = torch.arange(2 * 3).view(6, 1).float() + 300
    qkv = fuse_qkv(q, k, v, s).flatten().tolist()
    group0 = [100, 101, 102, 103, 104, 105, 200, 201, 202, 300, 301, 302]
    group1 = [106, 107, 108, 109, 110, 111, 203, 204, 205, 303, 304, 305]
    assert qkv == group0 + group1


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_qkv_and_gate_up_transforms_invert_exactly(groups):
    s = shape(groups=groups)
    q, k, v = torch.randn(12, 5), torch.randn(groups * 3, 5), torch.randn(groups * 3, 5)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fuse_qkv(q, k, v, s), s), (q, k, v),
                                                strict=True))
    bias = [torch.randn(12), torch.randn(groups * 3), torch.randn(groups * 3)]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fuse_qkv(*bias, s), s), bias,
                                                strict=True))
    gate, up = torch.randn(7, 5), torch.randn(7, 5)
    assert all(torch.equal(a, b) for a, b in zip(split_gate_up(fuse_gate_up(gate, up, s), s),
                                                (gate, up), strict=True))


def hf_state(family_name: str, s: Shape) -> dict:
    """A random HF state dict of the right shapes, made by running the table backwards."""
    family = FAMILIES[family_name]
    engine = {}
    for m in family.weights:
        if not m.applies(s.model):
            continue
        for i in range(s.model.num_layers) if m.per_layer else (None,):
            key = m.engine.format(i=i) if i is not None else m.engine
            out = m.to_engine(*(torch.randn(t) for t in _hf_shapes(m, s)), s)
            engine[key] = out
    return dict(to_hf(family, s, engine.__getitem__)), engine


def _hf_shapes(m, s):
    from engine.convert.mapping import expected_hf_shapes

    return expected_hf_shapes(m, _engine_shape(m, s), s)


def _engine_shape(m, s):
    h, d, heads, g = s.model.hidden_size, s.head_dim, s.model.num_attention_heads, s.groups
    ffn, v = s.model.ffn_hidden_size, s.padded_vocab_size
    table = {"word_embeddings.weight": (v, h), "output_layer.weight": (v, h),
             "linear_qkv.weight": ((heads + 2 * g) * d, h),
             "linear_qkv.bias": ((heads + 2 * g) * d,),
             "linear_proj.weight": (h, heads * d), "linear_fc1.weight": (2 * ffn, h),
             "linear_fc2.weight": (h, ffn)}
    return next((sh for k, sh in table.items() if m.engine.endswith(k)), (h,))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_hf_to_engine_to_hf_is_the_identity(family):
    s = shape(add_qkv_bias=family == "qwen2")
    hf, reference = hf_state(family, s)
    shapes = {k: t.shape for k, t in reference.items()}
    engine = dict(to_engine(FAMILIES[family], s, hf.__getitem__, hf, shapes))
    assert all(torch.equal(engine[k], reference[k]) for k in reference)
    back = dict(to_hf(FAMILIES[family], s, engine.__getitem__))
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)
    assert engine["embedding.word_embeddings.weight"].shape[0] == 16  # padded
    assert back["model.embed_tokens.weight"].shape[0] == 10  # trimmed


def test_missing_and_unexpected_tensors_are_named():
    s = shape()
    hf, reference = hf_state("llama", s)
    shapes = {k: t.shape for k, t in reference.items()}
    missing = {k: t for k, t in hf.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ConvertError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        dict(to_engine(FAMILIES["llama"], s, missing.__getitem__, missing, shapes))
    extra = {**hf, "model.layers.0.self_attn.o_proj.bias": torch.zeros(5)}
    with pytest.raises(ConvertError, match="o_proj.bias"):
        dict(to_engine(FAMILIES["llama"], s, extra.__getitem__, extra, shapes))
