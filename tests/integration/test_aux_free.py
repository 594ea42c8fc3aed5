"""Aux-loss-free load balancing (model.moe.load_balancing=aux_free; megatron-core's expert bias):
after every update each expert's bias moves by exactly bias_update_rate towards balance (up for
an expert that got fewer than the mean of the step's tokens, down for more: the token shares the
engine logs for that step decide it), the engine logs the bias per expert, and a checkpoint
carries it into a resumed run."""

import pytest
import torch

from engine.config.loader import recipe_from_dict
from engine.distributed import destroy_parallel_state, init_distributed
from engine.train.loop import train
from engine.train.session import build_session

pytestmark = pytest.mark.slow

EXPERTS, RATE, STEPS = 4, 0.01, 4


def recipe(make_recipe, tmp_path, steps=STEPS):
    r = make_recipe(train={"steps": steps, "override_schedule": steps != STEPS},
                    checkpoint={"save": str(tmp_path / "ck")},
                    logging={"log_interval": 1, "tensorboard_dir": str(tmp_path / "tb")})
    r["model"]["moe"] = {"num_experts": EXPERTS, "topk": 2, "router_score_function": "sigmoid",
                         "load_balancing": "aux_free", "bias_update_rate": RATE}
    return recipe_from_dict(r)


def biases(session) -> dict[int, torch.Tensor]:
    model = getattr(session.chunks[0], "module", session.chunks[0])
    return {m.layer_number: m.expert_bias.clone() for m in model.modules()
            if getattr(m, "expert_bias", None) is not None}


def test_the_bias_steps_towards_balance_and_is_saved(make_recipe, tmp_path):
    train(recipe(make_recipe, tmp_path))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()

    def series(layer, expert, name):
        return [e.value for e in events.Scalars(f"moe/layer{layer}/expert{expert}/{name}")]

    layers = (1, 2, 3, 4)
    for layer in layers:
        bias = torch.tensor([[0.0] + series(layer, e, "bias") for e in range(EXPERTS)])
        share = torch.tensor([series(layer, e, "token_share") for e in range(EXPERTS)])
        assert bias.shape == share.shape[:1] + (STEPS + 1,)
        step = bias.diff(dim=1)  # [experts, steps]: each update's move
        expected = torch.sign(1.0 / EXPERTS - share) * RATE
        assert torch.allclose(step, expected, atol=1e-6), (layer, step, share)
        assert (step != 0).any()
    try:  # the bias is in the checkpoint: a resumed session starts with it
        more = recipe(make_recipe, tmp_path, steps=STEPS + 2)
        session = build_session(more, init_distributed(more))
        assert session.state.step == STEPS
        loaded = biases(session)
        assert sorted(loaded) == list(layers)
        for layer in layers:
            logged = torch.tensor([series(layer, e, "bias")[-1] for e in range(EXPERTS)])
            assert torch.allclose(loaded[layer], logged, atol=1e-7)
    finally:
        destroy_parallel_state()
