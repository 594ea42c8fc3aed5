"""The fused kernels in training: the engine's losses with `model.fused_kernels` on equal those
with it off (megatron-core's local layers) to 1e-5 for 3 steps, and every fused op really ran."""

import pytest
from torch.profiler import ProfilerActivity, profile

from engine.config.loader import recipe_from_dict
from engine.kernels import ops
from engine.train.loop import train

FUSED_OPS = ("engine::rms_norm_fwd", "engine::rms_norm_bwd", "engine::swiglu_fwd",
             "engine::swiglu_bwd", "engine::rope_fwd", "engine::rope_bwd",
             "engine::xent_fwd_bwd_")


def _run(make_recipe, fused: bool):
    recipe = recipe_from_dict(make_recipe(model={"fused_kernels": fused}))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = train(recipe)
    return result, {event.key for event in prof.key_averages()}


@pytest.fixture(scope="module")
def runs(make_recipe):
    return _run(make_recipe, False), _run(make_recipe, True)


def test_losses_with_kernels_equal_losses_without(runs):
    (off, _), (on, _) = runs
    assert sorted(on.losses) == [1, 2, 3]
    for step in off.losses:
        assert abs(on.losses[step] - off.losses[step]) < 1e-5, (step, on.losses, off.losses)
        assert on.grad_norms[step] == pytest.approx(off.grad_norms[step], rel=1e-5)


def test_fused_ops_ran_only_when_on(runs):
    (_, ops_off), (_, ops_on) = runs
    assert not any(name in ops_off for name in FUSED_OPS)
    if not ops.has_kernel("rms_norm_fwd", "cpu"):
        pytest.skip("engine/_C is not built: the references ran (see tests/unit/kernels)")
    assert set(FUSED_OPS) <= ops_on, set(FUSED_OPS) - ops_on
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops_on


def test_tied_embeddings_get_the_fused_loss_gradient_twice(make_recipe):
    """With tied embeddings the fused cross-entropy's weight gradient adds to the embedding's."""
    runs = [train(recipe_from_dict(make_recipe(
        model={"fused_kernels": fused, "share_embeddings_and_output_weights": True})))
        for fused in (False, True)]
    for step, loss in runs[0].losses.items():
        assert abs(runs[1].losses[step] - loss) < 1e-5
        assert runs[1].grad_norms[step] == pytest.approx(runs[0].grad_norms[step], rel=1e-5)
