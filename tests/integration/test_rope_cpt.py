"""A long-context CPT stage by recipe alone: from a pretrained checkpoint, RoPE's base x50 (ABF,
Xiong et al. 2023) and twice the sequence length, or a new RoPE scaling; RoPE has no weights,
so the weights-only start allows it and says so in one log line, while a resume refuses it."""

import logging
import math

import pytest

from engine.checkpoint import CheckpointError
from engine.config.loader import recipe_from_dict
from engine.train.loop import train

pytestmark = pytest.mark.slow  # 200 pretraining steps, then four short stages

BASE, SEQ = 10000.0, 32  # the tiny recipe's RoPE base and sequence length
PRETRAIN_STEPS = 200  # the tiny model uses positions after ~150 steps (bigrams), not at 100


class _Capture(logging.Handler):
    """The session's log lines at INFO (what `engine train` shows) while the context is open."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        logger = logging.getLogger("engine.train.session")
        self.level = logger.level
        logger.setLevel(logging.INFO)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        logger = logging.getLogger("engine.train.session")
        logger.removeHandler(self)
        logger.setLevel(self.level)

    def text(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture(scope="module")
def pretrained(make_recipe, tmp_path_factory):
    save = tmp_path_factory.mktemp("rope-pretrain") / "ckpt"
    train(recipe_from_dict(make_recipe(train={"steps": PRETRAIN_STEPS},
                                       checkpoint={"save": str(save)})))
    return save


def long_stage(make_recipe, pretrained, save, **model):
    """One step at twice the sequence length from the pretrained weights, same data and seed."""
    return recipe_from_dict(make_recipe(
        model=model, data={"seq_length": 2 * SEQ}, train={"steps": 1, "eval_interval": None},
        checkpoint={"save": str(save), "pretrained": str(pretrained)}))


@pytest.fixture(scope="module")
def stages(make_recipe, pretrained, tmp_path_factory):
    """{name: (TrainResult, log text)} of the long stage with the base kept and with ABF."""
    tmp = tmp_path_factory.mktemp("rope-cpt")
    out = {}
    for name, base in (("kept", BASE), ("abf", 50 * BASE)):
        with _Capture() as log:
            result = train(long_stage(make_recipe, pretrained, tmp / name, rotary_base=base))
        out[name] = (result, log.text())
    return out


def test_abf_stage_runs_and_its_first_loss_differs_from_the_kept_base(stages):
    kept, abf = stages["kept"][0].losses[1], stages["abf"][0].losses[1]
    # step 1's loss is the pretrained weights' loss on the same batch and seed: the runs are
    # bit-identical but for RoPE. 1e-4 relative is ten times the float32 rounding of a mean over
    # the batch's 512 tokens (sqrt(512) eps32); measured: 4.6e-4
    assert math.isfinite(kept) and math.isfinite(abf)
    assert abs(abf - kept) > 1e-4 * kept, (kept, abf)


def test_the_change_is_one_log_line_and_only_when_there_is_one(stages, pretrained):
    _, abf_log = stages["abf"]
    [line] = [x for x in abf_log.splitlines() if x.startswith("RoPE changed")]
    assert line.endswith(": model.rotary_base 10000.0 -> 500000.0"), line
    assert str(pretrained) in line
    assert "RoPE changed" not in stages["kept"][1]


def test_a_new_rope_scaling_at_a_cpt_stage_trains(make_recipe, pretrained, tmp_path):
    with _Capture() as log:
        result = train(long_stage(make_recipe, pretrained, tmp_path / "yarn", rotary_scaling={
            "type": "yarn", "factor": 2.0, "original_max_position_embeddings": SEQ}))
    assert math.isfinite(result.losses[1])
    assert log.text().endswith(
        ": model.rotary_scaling null -> yarn(factor=2.0, original_max_position_embeddings=32)")


def test_resuming_with_another_rope_is_refused(make_recipe, stages, tmp_path):
    # the ABF stage's own checkpoint, resumed with the old base
    abf_ckpt = stages["abf"][0].checkpoint.parent
    recipe = recipe_from_dict(make_recipe(
        data={"seq_length": 2 * SEQ}, train={"steps": 2},
        checkpoint={"save": str(tmp_path / "x"), "load": str(abf_ckpt)}))
    with pytest.raises(CheckpointError) as info:
        train(recipe)
    message = str(info.value)
    assert "\n" not in message and message.endswith(
        "resuming with model.rotary_base 500000.0 -> 10000.0; a RoPE change starts a new stage "
        "(checkpoint.pretrained)"), message
