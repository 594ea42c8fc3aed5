"""Cross-section rules: each error shows its factors; the layout's arithmetic always holds."""

import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from engine.config import ConfigError, Layout, recipe_from_dict, validate


def make(**sections):
    """A small valid recipe with some sections' keys replaced."""
    data = {
        "model": dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=8,
                      num_query_groups=4, vocab_size=1000, max_position_embeddings=256),
        "data": dict(synthetic=True, seq_length=128),
        "train": dict(steps=10),
    }
    for name, keys in sections.items():
        data[name] = {**data.get(name, {}), **keys}
    return recipe_from_dict(data)


def error(recipe, world_size) -> str:
    with pytest.raises(ConfigError) as info:
        validate(recipe, world_size)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_layout_of_a_valid_recipe():
    recipe = make(parallel=dict(tp=2, pp=2, vpp=2),
                  train=dict(micro_batch_size=2, global_batch_size=16))
    assert validate(recipe, 8) == Layout(
        world_size=8, tp=2, pp=2, vpp=2, cp=1, ep=1, dp=2, micro_batch_size=2,
        global_batch_size=16, num_microbatches=4)


def test_global_batch_defaults_to_one_microbatch_per_rank():
    layout = validate(make(train=dict(micro_batch_size=3)), 4)
    assert (layout.dp, layout.global_batch_size, layout.num_microbatches) == (4, 12, 1)


@pytest.mark.parametrize("sections, world_size, message", [
    (dict(parallel=dict(tp=2, pp=2)), 6,
     "world_size=6 is not divisible by tp*pp*cp=4 (tp=2, pp=2, cp=1)"),
    (dict(parallel=dict(tp=2, pp=2, dp=3)), 8,
     "parallel.dp=3 but world_size/(tp*pp*cp)=2 (world_size=8, tp=2, pp=2, cp=1)"),
    (dict(parallel=dict(ep=3)), 4,
     "parallel.ep=3 must divide dp=4 (dp = world_size/(tp*pp*cp) = 4/(1*1*1))"),
    (dict(parallel=dict(tp=3), model=dict(num_attention_heads=32, num_query_groups=None,
                                          hidden_size=96)), 3,
     "parallel.tp=3 must divide model.num_attention_heads=32"),
    (dict(parallel=dict(tp=4), model=dict(num_attention_heads=32, num_query_groups=2)), 4,
     "parallel.tp=4 must divide model.num_query_groups=2"),
    (dict(parallel=dict(tp=2), model=dict(ffn_hidden_size=129)), 2,
     "parallel.tp=2 must divide model.ffn_hidden_size=129"),
    (dict(parallel=dict(pp=2, vpp=2), model=dict(num_layers=5)), 2,
     "model.num_layers=5 must be divisible by pp*vpp=4 (pp=2, vpp=2)"),
    (dict(parallel=dict(pp=2), model=dict(num_layers=5)), 2,
     "model.num_layers=5 must be divisible by parallel.pp=2"),
    (dict(train=dict(micro_batch_size=2, global_batch_size=10)), 2,
     "train.global_batch_size=10 must be divisible by micro_batch_size*dp=4 "
     "(micro_batch_size=2, dp=2)"),
    (dict(parallel=dict(pp=2, vpp=2), train=dict(global_batch_size=6)), 4,
     "with parallel.vpp=2, num_microbatches=3 must be a multiple of parallel.pp=2 "
     "(num_microbatches = global_batch_size/(micro_batch_size*dp) = 6/(1*2))"),
    (dict(parallel=dict(tp=4, sequence_parallel=True), data=dict(seq_length=130)), 4,
     "data.seq_length/cp=130 must be divisible by parallel.tp=4 with parallel.sequence_parallel "
     "(seq_length=130, cp=1)"),
    (dict(parallel=dict(cp=3), data=dict(seq_length=128)), 3,
     "data.seq_length=128 must be divisible by 2*parallel.cp=6 (the load-balanced split into "
     "2*cp chunks; cp=3)"),
    (dict(parallel=dict(cp=2, tp=2), data=dict(seq_length=128)), 6,
     "world_size=6 is not divisible by tp*pp*cp=4 (tp=2, pp=1, cp=2)"),
    (dict(parallel=dict(cp=4, tp=4, cp_comm_type="a2a"), data=dict(seq_length=128)), 16,
     "parallel.cp_comm_type=a2a: attention heads per tensor-parallel rank 2 "
     "(model.num_attention_heads=8 / parallel.tp=4) must be divisible by parallel.cp=4"),
    (dict(parallel=dict(cp=2), eval=dict(tasks=["t"]), train=dict(eval_interval=5),
          tokenizer=dict(type="hf", path="x")), 2,
     "eval.tasks=['t'] with parallel.cp=2: the task probes run whole sequences (cp=1); run "
     "engine eval on the checkpoint instead"),
    (dict(parallel=dict(cp=2, tp=4, sequence_parallel=True), data=dict(seq_length=132)), 8,
     "data.seq_length/cp=66 must be divisible by parallel.tp=4 with parallel.sequence_parallel "
     "(seq_length=132, cp=2)"),
    (dict(data=dict(synthetic=False, blend=[{"path": "a"}], reset_attention_mask=True)), 1,
     "data.reset_attention_mask=true needs the tokenizer's end-of-document id, but "
     "tokenizer.type is none"),
    (dict(data=dict(synthetic=False, blend=[{"path": "a"}], eod_mask_loss=True)), 1,
     "data.eod_mask_loss=true needs the tokenizer's end-of-document id, but tokenizer.type is "
     "none"),
    (dict(data=dict(seq_length=512)), 1,
     "data.seq_length=512 exceeds model.max_position_embeddings=256 and model.rotary_scaling "
     "is not set"),
    (dict(model=dict(vocab_size=None)), 1,
     "model.vocab_size is required when tokenizer.type is 'none'"),
    (dict(train=dict(schedule=dict(min_lr=1e-3)), optim=dict(lr=3e-4)), 1,
     "train.schedule.min_lr=0.001 exceeds optim.lr=0.0003"),
    (dict(train=dict(eval_interval=5), data=dict(synthetic=False, blend=[{"path": "a"}])), 1,
     "train.eval_interval=5 needs data.valid or eval.tasks (none given)"),
    (dict(train=dict(spike=dict(action="rewind"))), 1,
     "train.spike.action=rewind needs checkpoint.save (the checkpoints it rewinds to)"),
    (dict(train=dict(spike=dict(action="rewind")), checkpoint=dict(save="ck")), 1,
     "train.spike.action=rewind needs data.blend: synthetic data has no position to skip"),
])
def test_each_rule_names_its_factors(sections, world_size, message):
    assert error(make(**sections), world_size) == message


@pytest.mark.parametrize("kind", ["linear", "llama3", "yarn", "ntk"])
def test_rope_scaling_allows_sequences_past_max_position_embeddings(kind):
    recipe = make(model=dict(rotary_scaling={"type": kind, "factor": 4.0}),
                  data=dict(seq_length=512))
    assert validate(recipe, 1).world_size == 1


def test_context_parallel_divides_the_world_with_the_other_degrees():
    layout = validate(make(parallel=dict(tp=2, cp=2), data=dict(seq_length=128)), 8)
    assert (layout.tp, layout.cp, layout.dp) == (2, 2, 2)


def test_source_prefixes_the_error():
    with pytest.raises(ConfigError) as info:
        validate(make(parallel=dict(tp=3)), 3, source="configs/cpt.yaml")
    assert str(info.value) == (
        "configs/cpt.yaml: parallel.tp=3 must divide model.num_attention_heads=8")


def test_world_size_must_be_positive():
    assert error(make(), 0) == "world_size: expected >= 1, got 0"


@settings(max_examples=300, deadline=None)
@given(
    tp=st.sampled_from([1, 2, 3, 4, 8]),
    pp=st.sampled_from([1, 2, 3, 4]),
    cp=st.sampled_from([1, 2, 3, 4]),
    dp=st.integers(1, 8),
    heads=st.sampled_from([1, 2, 4, 6, 8, 12, 16, 32]),
    micro_batch_size=st.integers(1, 4),
    accumulation=st.integers(1, 6),
    world_size=st.one_of(st.none(), st.integers(1, 128)),
    vpp=st.sampled_from([None, 2]),
)
def test_valid_layouts_multiply_out(tp, pp, cp, dp, heads, micro_batch_size, accumulation,
                                    world_size, vpp):
    """Whenever validate accepts, the degrees factor the world and the batches add up."""
    assume(vpp is None or pp > 1)
    world_size = tp * pp * cp * dp if world_size is None else world_size
    recipe = make(
        model=dict(num_layers=24, hidden_size=heads * 8, ffn_hidden_size=96 * tp,
                   num_attention_heads=heads, num_query_groups=None),
        parallel=dict(tp=tp, pp=pp, cp=cp, vpp=vpp, sequence_parallel=tp > 1),
        train=dict(micro_batch_size=micro_batch_size,
                   global_batch_size=micro_batch_size * dp * accumulation),
    )
    try:
        layout = validate(recipe, world_size)
    except ConfigError:
        event("rejected")
        return
    event("accepted")
    assert layout.tp * layout.pp * layout.dp * layout.cp == world_size
    assert layout.num_microbatches * layout.micro_batch_size * layout.dp == layout.global_batch_size
    assert heads % layout.tp == 0 and 24 % (layout.pp * (layout.vpp or 1)) == 0
    assert 128 % (2 * layout.cp) == 0  # the load-balanced CP split (seq_length 128)


@pytest.mark.parametrize("spike, message", [
    (dict(factor=1.0), "train.spike.factor: expected a value above 1, got 1.0"),
    (dict(action="restart"), "train.spike.action"),
    (dict(window=0), "train.spike.window"),
    (dict(skip_batches=0), "train.spike.skip_batches"),
])
def test_spike_section_checks_its_fields(spike, message):
    with pytest.raises(ConfigError) as info:
        make(train=dict(spike=spike))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_aux_free_balancing_needs_sigmoid_routing():
    moe = dict(num_experts=4, topk=2, load_balancing="aux_free")
    with pytest.raises(ConfigError) as info:
        make(model=dict(moe=moe))
    assert str(info.value).endswith("model.moe.load_balancing=aux_free needs "
                               "model.moe.router_score_function=sigmoid (megatron-core's expert "
                               "bias), got 'softmax'")
    recipe = make(model=dict(moe={**moe, "router_score_function": "sigmoid"}))
    from engine.models.build import moe_kwargs

    kwargs = moe_kwargs(recipe.model.moe)
    assert kwargs["moe_router_enable_expert_bias"] and \
        kwargs["moe_router_load_balancing_type"] == "none"
    assert kwargs["moe_router_bias_update_rate"] == 1e-3
