"""Scale-Up math, proved in one process in fp64 against a reference Llama forward written from
megatron's semantics (RMSNorm, rotate-half RoPE, GQA with consecutive heads per KV group,
SwiGLU, fused QKV/gate-up layouts): FPI at integer ratios and the exact method at any ratio keep
the logits, identity blocks keep them bit for bit, AKI/AKI-Pro copy from the next layer, and the
depth maps are the papers' examples. Norm gains are random, so a mishandled norm shows."""

import json
import math

import pytest
import torch

from engine.config.recipe import ModelConfig
from engine.models.weights import Shape, split_gate_up, split_qkv
from engine.upcycle import UpcycleError
from engine.upcycle.depth import depth_map
from engine.upcycle.scale_up import ScaleUpSpec, scale_up

VOCAB = 40


def model(layers=2, hidden=32, ffn=48, heads=4, groups=2, **kw) -> ModelConfig:
    return ModelConfig(num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn,
                       num_attention_heads=heads, num_query_groups=groups, vocab_size=VOCAB,
                       **kw)


def random_state(m: ModelConfig, seed=0) -> dict:
    """Weights of `m` with std 0.2 (so the layers matter) and norm gains in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    shape = Shape(m, VOCAB)
    d, heads, groups, h, f = shape.head_dim, m.num_attention_heads, shape.groups, \
        m.hidden_size, m.ffn_hidden_size
    sizes = {"input_layernorm.weight": (h,), "pre_mlp_layernorm.weight": (h,),
             "self_attention.linear_qkv.weight": ((heads + 2 * groups) * d, h),
             "self_attention.linear_proj.weight": (h, heads * d),
             "mlp.linear_fc1.weight": (2 * f, h), "mlp.linear_fc2.weight": (h, f)}
    if m.add_qkv_bias:
        sizes["self_attention.linear_qkv.bias"] = ((heads + 2 * groups) * d,)
    state = {f"decoder.layers.{i}.{k}": s for i in range(m.num_layers) for k, s in sizes.items()}
    state.update({"embedding.word_embeddings.weight": (VOCAB, h),
                  "decoder.final_layernorm.weight": (h,)})
    if not m.share_embeddings_and_output_weights:
        state["output_layer.weight"] = (VOCAB, h)
    return {k: (torch.rand(s, generator=g, dtype=torch.float64) + 0.5 if k.endswith("norm.weight")
                else torch.randn(s, generator=g, dtype=torch.float64) * 0.2)
            for k, s in state.items()}


def _rms(x, gain, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def _rope(x, base):  # x [b, s, n, d], rotate-half
    d, s = x.shape[-1], x.shape[1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=x.dtype) / d)
    angles = torch.arange(s, dtype=x.dtype)[:, None] * inv[None]
    cos, sin = (torch.cat([f(angles)] * 2, -1)[None, :, None] for f in (torch.cos, torch.sin))
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def logits(state: dict, m: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """Reference forward [b, s] -> [b, s, vocab rows], in the state's dtype."""
    shape = Shape(m, VOCAB)
    b, s = tokens.shape
    heads, groups, d, eps = m.num_attention_heads, shape.groups, shape.head_dim, \
        m.layernorm_epsilon
    x = state["embedding.word_embeddings.weight"][tokens]
    causal = torch.full((s, s), float("-inf"), dtype=x.dtype).triu(1)
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        n = _rms(x, state[p + "input_layernorm.weight"], eps)
        ws = split_qkv(state[p + "self_attention.linear_qkv.weight"], shape)
        bs = split_qkv(state[p + "self_attention.linear_qkv.bias"], shape) \
            if m.add_qkv_bias else (0, 0, 0)
        q, k, v = ((n @ w.T + bias).view(b, s, -1, d) for w, bias in zip(ws, bs, strict=True))
        q, k = _rope(q, m.rotary_base), _rope(k, m.rotary_base)
        k, v = (t.repeat_interleave(heads // groups, dim=2) for t in (k, v))  # head -> its group
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d) + causal
        o = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(b, s, heads * d)
        x = x + o @ state[p + "self_attention.linear_proj.weight"].T
        n = _rms(x, state[p + "pre_mlp_layernorm.weight"], eps)
        gate, up = split_gate_up(state[p + "mlp.linear_fc1.weight"], shape)
        x = x + (torch.nn.functional.silu(n @ gate.T) * (n @ up.T)) @ \
            state[p + "mlp.linear_fc2.weight"].T
    out = state.get("output_layer.weight", state["embedding.word_embeddings.weight"])
    return _rms(x, state["decoder.final_layernorm.weight"], eps) @ out.T


TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def grow(src, dst, **spec):
    state = random_state(src)
    grown, source_map = scale_up(state, src, dst, spec=ScaleUpSpec(**spec))
    return state, grown, source_map


INTEGER_RATIOS = {  # hidden, FFN and heads x2, head_dim fixed
    "groups-x2": (model(), model(hidden=64, ffn=96, heads=8, groups=4, kv_channels=8)),
    "heads-per-group-x2": (model(), model(hidden=64, ffn=96, heads=8, groups=2, kv_channels=8)),
    "mha-qkv-bias": (model(groups=4, add_qkv_bias=True),
                     model(hidden=64, ffn=96, heads=8, groups=8, kv_channels=8,
                           add_qkv_bias=True)),
    "tied-source": (model(share_embeddings_and_output_weights=True),
                    model(hidden=64, ffn=96, heads=8, groups=4, kv_channels=8)),
}


@pytest.mark.parametrize("name", INTEGER_RATIOS)
def test_fpi_at_integer_ratios_keeps_the_logits(name):
    src, dst = INTEGER_RATIOS[name]
    state, grown, _ = grow(src, dst, width_method="fpi")
    assert relative_error(logits(grown, dst, TOKENS), logits(state, src, TOKENS)) < 1e-12


def fold(w: torch.Tensor, dim: int, source: tuple, size: int) -> torch.Tensor:
    """Sum `w` along `dim` over the duplicates of each source unit (FPI's split, undone)."""
    shape = list(w.shape)
    shape[dim] = size
    return torch.zeros(shape, dtype=w.dtype).index_add_(dim, torch.tensor(source), w)


def test_fpi_split_columns_sum_back_to_the_source_exactly():
    """Each input-side matrix: columns summed over a unit's copies == the source column, bit for
    bit (x2 splits in halves), with the rows mapped back through the saved map."""
    src, dst = INTEGER_RATIOS["groups-x2"]
    state, grown, smap = grow(src, dst, width_method="fpi")
    h, d = src.hidden_size, 8
    hidden, heads, groups = (torch.tensor(x) for x in (smap.hidden, smap.heads, smap.query_groups))
    ffn = torch.tensor(smap.ffn)
    for i in range(src.num_layers):
        p = f"decoder.layers.{i}."
        new_q, new_k, new_v = split_qkv(grown[p + "self_attention.linear_qkv.weight"],
                                        Shape(dst, VOCAB))
        q, k, v = split_qkv(state[p + "self_attention.linear_qkv.weight"], Shape(src, VOCAB))
        for new, old, units in ((new_q, q, heads), (new_k, k, groups), (new_v, v, groups)):
            folded = fold(new, 1, smap.hidden, h).view(len(units), d, h)
            assert torch.equal(folded, old.view(-1, d, h)[units])
        new_gate, new_up = split_gate_up(grown[p + "mlp.linear_fc1.weight"], None)
        gate, up = split_gate_up(state[p + "mlp.linear_fc1.weight"], None)
        assert torch.equal(fold(new_gate, 1, smap.hidden, h), gate[ffn])
        assert torch.equal(fold(new_up, 1, smap.hidden, h), up[ffn])
        fc2 = grown[p + "mlp.linear_fc2.weight"]
        assert torch.equal(fold(fc2, 1, smap.ffn, src.ffn_hidden_size),
                           state[p + "mlp.linear_fc2.weight"][hidden])
        proj = grown[p + "self_attention.linear_proj.weight"].reshape(dst.hidden_size, -1, d)
        assert torch.equal(fold(proj, 1, smap.heads, src.num_attention_heads).flatten(1),
                           state[p + "self_attention.linear_proj.weight"][hidden])
    assert torch.equal(fold(grown["output_layer.weight"], 1, smap.hidden, h),
                       state["output_layer.weight"])
    assert torch.equal(grown["embedding.word_embeddings.weight"],
                       state["embedding.word_embeddings.weight"][:, hidden])
    for name in ("decoder.final_layernorm.weight", "decoder.layers.0.input_layernorm.weight"):
        assert torch.equal(grown[name], state[name][hidden])  # gains copied, never split


NON_INTEGER = {  # the 1.25x: hidden 64->80, FFN 172->215; 5 heads can't share 2 groups
    "heads-per-group-2-to-3": (model(hidden=64, ffn=172), model(hidden=80, ffn=215, heads=6,
                                                                 kv_channels=16)),
    "mqa-heads-4-to-5": (model(hidden=64, ffn=172, groups=1),
                         model(hidden=80, ffn=215, heads=5, groups=1)),
    "groups-2-to-4": (model(hidden=64, ffn=172), model(hidden=80, ffn=215, heads=8, groups=4,
                                                       kv_channels=16)),
    "qkv-bias-tied-source": (
        model(hidden=64, ffn=172, add_qkv_bias=True, share_embeddings_and_output_weights=True),
        model(hidden=80, ffn=215, heads=6, kv_channels=16, add_qkv_bias=True)),
}


@pytest.mark.parametrize("name", NON_INTEGER)
def test_exact_keeps_the_logits_at_any_ratio(name):
    src, dst = NON_INTEGER[name]
    state, grown, smap = grow(src, dst, width_method="exact", seed=3)
    assert relative_error(logits(grown, dst, TOKENS), logits(state, src, TOKENS)) < 1e-12
    h = src.hidden_size
    s = math.sqrt(dst.hidden_size / h)
    assert torch.equal(grown["embedding.word_embeddings.weight"][:, h:], torch.zeros(VOCAB, 16))
    assert torch.allclose(grown["embedding.word_embeddings.weight"][:, :h],
                          s * state["embedding.word_embeddings.weight"], rtol=1e-15)
    for i in range(dst.num_layers):
        p = f"decoder.layers.{i}."
        proj = grown[p + "self_attention.linear_proj.weight"]
        fc2 = grown[p + "mlp.linear_fc2.weight"]
        assert not proj[h:].any() and not fc2[h:].any()  # writers: new residual rows zero
        assert not fc2[:, src.ffn_hidden_size:].any()  # new neurons: output side zero
        new_heads = torch.tensor([x is None for x in smap.heads]).repeat_interleave(16)
        assert not proj[:, new_heads].any() and new_heads.any()
        assert grown[p + "mlp.linear_fc1.weight"].all()  # input side: fresh, non-zero
        assert torch.equal(grown[p + "input_layernorm.weight"][h:], torch.ones(16))
    assert smap.hidden[h:] == (None,) * 16 and smap.ffn[src.ffn_hidden_size:] == (None,) * 43


def test_fpi_at_a_non_integer_ratio_is_not_exact():
    """The RMSNorm statistic counts the 16 copied dimensions twice (AquilaMoE Table 2's loss
    increase at 1.25x width): the logits move, by an amount the CLI report measures."""
    src, dst = NON_INTEGER["heads-per-group-2-to-3"]
    state, grown, _ = grow(src, dst, width_method="fpi")
    assert relative_error(logits(grown, dst, TOKENS), logits(state, src, TOKENS)) > 1e-4


def test_aki_copies_new_units_from_the_next_layer():
    src, dst = NON_INTEGER["heads-per-group-2-to-3"]
    state, grown, smap = grow(src, dst, width_method="aki")
    _, fpi, _ = grow(src, dst, width_method="fpi")
    h, f, d = src.hidden_size, src.ffn_hidden_size, 16
    counts = torch.bincount(torch.tensor(smap.hidden)).double()[list(smap.hidden)]
    assert smap.new_units_from == (1, 1)  # 2 layers: layer 0 from 1, the last from itself
    for i, nxt in enumerate(smap.new_units_from):
        p, q = f"decoder.layers.{i}.", f"decoder.layers.{nxt}."
        gate, up = split_gate_up(grown[p + "mlp.linear_fc1.weight"], None)
        next_gate, _ = split_gate_up(state[q + "mlp.linear_fc1.weight"], None)
        expected = next_gate[list(smap.ffn[f:])][:, list(smap.hidden)] / counts
        assert torch.equal(gate[f:], expected)  # new neurons: layer l+1's rows, split inputs
        fpi_gate, _ = split_gate_up(fpi[p + "mlp.linear_fc1.weight"], None)
        assert torch.equal(gate[:f], fpi_gate[:f])  # old neurons: layer l's, as FPI
        for name in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
            rows = state[q + name][list(smap.hidden[h:])]
            assert torch.equal(grown[p + name][h:], split_like_fpi(rows, name, smap, src))
        new_q = split_qkv(grown[p + "self_attention.linear_qkv.weight"], Shape(dst, VOCAB))[0]
        next_q = split_qkv(state[q + "self_attention.linear_qkv.weight"], Shape(src, VOCAB))[0]
        for head, source in enumerate(smap.heads):
            if head % 3 == 2:  # the added third head of each group
                expected = next_q.view(-1, d, h)[source][:, list(smap.hidden)] / counts
                assert torch.equal(new_q.view(-1, d, dst.hidden_size)[head], expected)
    # not function-preserving, on purpose
    assert relative_error(logits(grown, dst, TOKENS), logits(state, src, TOKENS)) > 1e-3


def split_like_fpi(rows: torch.Tensor, name: str, smap, src) -> torch.Tensor:
    """Writer rows (o_proj or fc2) with their input columns (heads or neurons) split as FPI."""
    if "linear_fc2" in name:
        units = torch.tensor(smap.ffn)
        return rows[:, units] / torch.bincount(units).double()[units]
    units = torch.tensor(smap.heads)
    per_head = rows.view(rows.shape[0], src.num_attention_heads, -1)[:, units]
    return (per_head / torch.bincount(units).double()[units][:, None]).flatten(1)


def test_aki_pro_keeps_the_kv_groups_and_grows_heads_inside_each():
    src, dst = NON_INTEGER["heads-per-group-2-to-3"]
    state, grown, smap = grow(src, dst, width_method="aki-pro")
    assert smap.query_groups == (0, 1)
    assert smap.heads == (0, 1, 0, 2, 3, 2)  # group g: its 2 heads, then a third from head 2g
    _, k, v = split_qkv(grown["decoder.layers.0.self_attention.linear_qkv.weight"],
                        Shape(dst, VOCAB))
    assert k.shape == v.shape == (2 * 16, dst.hidden_size)
    with pytest.raises(UpcycleError, match="aki-pro keeps the source's 2 KV groups"):
        grow(src, model(hidden=80, ffn=215, heads=8, groups=4, kv_channels=16),
             width_method="aki-pro")
    _, aki, _ = grow(src, dst, width_method="aki")
    assert all(torch.equal(grown[k], aki[k]) for k in aki)  # AKI at fixed groups is AKI-Pro


def test_depth_maps_are_the_papers_examples():
    interp = [s.source for s in depth_map(32, 40, "interpolate")]
    assert interp == sorted(interp) and set(interp) == set(range(32))
    assert sum(interp.count(i) == 2 for i in range(32)) == 8
    assert [s.source for s in depth_map(3, 6, "interpolate")] == [0, 0, 1, 1, 2, 2]
    assert [s.source for s in depth_map(3, 7, "stack")] == [0, 1, 2, 0, 1, 2, 0]
    ident = depth_map(32, 40, "identity")
    assert [i for i, s in enumerate(ident) if s.identity] == [4 + 5 * k for k in range(8)]
    assert [s.source for s in ident if s.identity] == [3, 7, 11, 15, 19, 23, 27, 31]
    assert [(s.source, s.identity) for s in depth_map(2, 7, "identity")] == [
        (0, False), (0, True), (0, True), (1, False), (1, True), (1, True), (1, True)]
    assert depth_map(4, 4, "identity") == depth_map(4, 4, "stack")


def test_identity_blocks_leave_the_logits_bit_identical():
    src = model(layers=3)
    state, grown, smap = grow(src, model(layers=5), depth_method="identity")
    assert [(s.source, s.identity) for s in smap.layers] == [
        (0, False), (1, False), (1, True), (2, False), (2, True)]
    assert torch.equal(logits(grown, model(layers=5), TOKENS), logits(state, src, TOKENS))
    assert not grown["decoder.layers.2.mlp.linear_fc2.weight"].any()
    assert torch.equal(grown["decoder.layers.2.mlp.linear_fc1.weight"],
                       state["decoder.layers.1.mlp.linear_fc1.weight"])


def test_stack_and_interpolate_copy_whole_grown_layers():
    src, wide = INTEGER_RATIOS["groups-x2"]
    dst = model(layers=5, hidden=64, ffn=96, heads=8, groups=4, kv_channels=8)
    _, flat, _ = grow(src, wide, width_method="fpi")
    _, deep, smap = grow(src, dst, width_method="fpi", depth_method="interpolate")
    for target, s in enumerate(smap.layers):
        for name in ("mlp.linear_fc1.weight", "input_layernorm.weight"):
            assert torch.equal(deep[f"decoder.layers.{target}.{name}"],
                               flat[f"decoder.layers.{s.source}.{name}"])
    assert deep["decoder.layers.0.mlp.linear_fc1.weight"].data_ptr() != \
        deep["decoder.layers.1.mlp.linear_fc1.weight"].data_ptr()  # copies, not aliases


def test_noise_perturbs_only_added_units_and_is_seeded():
    src, dst = INTEGER_RATIOS["groups-x2"]
    state, plain, _ = grow(src, dst, width_method="fpi")
    _, noisy, _ = grow(src, dst, width_method="fpi", noise=0.01, seed=5)
    _, again, _ = grow(src, dst, width_method="fpi", noise=0.01, seed=5)
    assert all(torch.equal(noisy[k], again[k]) for k in noisy)
    h, f = src.hidden_size, src.ffn_hidden_size
    emb = "embedding.word_embeddings.weight"
    assert torch.equal(noisy[emb][:, :h], plain[emb][:, :h])
    assert not torch.equal(noisy[emb][:, h:], plain[emb][:, h:])
    # `noise` is a std relative to the tensor's (as in Scale-Out): 0.01 of std 0.2 here, and ten
    # times larger weights get ten times larger noise
    delta = noisy[emb][:, h:] - plain[emb][:, h:]
    assert 0.7 < (delta.std() / (0.01 * plain[emb].std())).item() < 1.3
    big = {k: v * (1 if k.endswith("norm.weight") else 10) for k, v in state.items()}
    loud, _ = scale_up(big, src, dst, spec=ScaleUpSpec(width_method="fpi", noise=0.01, seed=5))
    plain_big, _ = scale_up(big, src, dst, spec=ScaleUpSpec(width_method="fpi", seed=5))
    assert torch.allclose(loud[emb] - plain_big[emb], 10 * (noisy[emb] - plain[emb]),
                          rtol=1e-9, atol=1e-12)
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"
    gate_n, gate_p = split_gate_up(noisy[fc1], None)[0], split_gate_up(plain[fc1], None)[0]
    assert torch.equal(gate_n[:f], gate_p[:f]) and (gate_n[f:] - gate_p[f:]).abs().max() < 0.1
    out = "output_layer.weight"  # input-side splits are not perturbed
    assert torch.equal(noisy[out], plain[out])
    change = relative_error(logits(noisy, dst, TOKENS), logits(plain, dst, TOKENS))
    assert change > 1e-4
    with pytest.raises(UpcycleError, match="exact method copies no unit"):
        ScaleUpSpec(width_method="exact", noise=0.01)


@pytest.mark.parametrize("dst, match", [
    (model(hidden=16), "--hidden-size 16: Scale-Up only grows"),
    (model(layers=1), "--num-layers 1: Scale-Up only grows"),
    (model(groups=1), "--num-query-groups 1: Scale-Up only grows"),
    (model(hidden=64, heads=4), "head width 16 != the source's 8"),
    (model(heads=8, groups=8, kv_channels=8), "1 per group, fewer than the source's 2"),
    (model(add_qkv_bias=True), "model.add_qkv_bias"),
    (model(hidden=64, heads=8, kv_channels=8, share_embeddings_and_output_weights=True),
     "a grown hidden size needs separate input and output embeddings"),
])
def test_impossible_growth_is_refused_in_one_line(dst, match):
    with pytest.raises(UpcycleError, match=match) as err:
        grow(model(), dst)
    assert "\n" not in str(err.value)


def test_unknown_or_misshapen_source_tensors_are_refused():
    src = model()
    state = random_state(src)
    with pytest.raises(UpcycleError, match="unexpected .*q_layernorm"):
        scale_up({**state, "decoder.layers.0.self_attention.q_layernorm.weight": torch.ones(8)},
                 src, src, spec=ScaleUpSpec())
    state["decoder.layers.1.mlp.linear_fc2.weight"] = torch.zeros(32, 40)
    with pytest.raises(UpcycleError, match=r"linear_fc2.weight' is \(32, 40\); expected \(32, 48"):
        scale_up(state, src, src, spec=ScaleUpSpec())
    with pytest.raises(UpcycleError, match="width method 'net2net'"):
        ScaleUpSpec(width_method="net2net")


def test_tied_source_grown_without_width_change_stays_tied():
    src = model(share_embeddings_and_output_weights=True)
    dst = model(layers=3, share_embeddings_and_output_weights=True)
    state, grown, _ = grow(src, dst, depth_method="identity")
    assert "output_layer.weight" not in grown
    assert torch.equal(logits(grown, dst, TOKENS), logits(state, src, TOKENS))


def test_source_map_is_plain_json():
    src, dst = NON_INTEGER["groups-2-to-4"]
    _, _, smap = grow(src, dst, width_method="exact", depth_method="identity")
    plain = json.loads(json.dumps(smap.to_dict()))
    assert plain["query_groups"] == [0, 1, None, None] and len(plain["heads"]) == 8
    assert plain["heads"][:4] == [0, 1, 2, 3] and plain["new_units_from"] == [None, None]
    assert plain["layers"] == [{"source": 0, "identity": False}, {"source": 1, "identity": False}]


def test_dtype_is_kept():
    src, dst = INTEGER_RATIOS["groups-x2"]
    state = {k: v.to(torch.bfloat16) for k, v in random_state(src).items()}
    grown, _ = scale_up(state, src, dst, spec=ScaleUpSpec(width_method="exact"))
    assert {v.dtype for v in grown.values()} == {torch.bfloat16}
