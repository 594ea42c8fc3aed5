"""Loss spikes (train.spike): a poisoned data window (the samples at some positions of the
training mix replaced by uniformly random tokens, which the model finds far less likely than
text) makes the loss spike at the steps that read it. `warn` logs each and goes on; `rewind`
reloads the checkpoint before the spike, skips `skip_batches` global batches of data (the
poisoned ones among them: never read again), finishes the run with each step logged once, and
records the skip in the checkpoint so that a resume keeps it."""

import numpy as np
import pytest
import torch

from engine.checkpoint import find_checkpoint, read_train_state
from engine.config.loader import recipe_from_dict
from engine.data.mixing import TrainingMix
from engine.distributed import destroy_parallel_state, init_distributed
from engine.train.loop import train
from engine.train.session import build_session
from engine.train.spike import SpikeError

pytestmark = pytest.mark.slow

BATCH = 8  # tiny recipe's global batch
STEPS, SPIKE = 22, 17  # the poisoned batches: those of steps 17 and 18 of an undisturbed run
POISONED = range((SPIKE - 1) * BATCH, (SPIKE + 1) * BATCH)
LABEL = 0  # every label of a poisoned sample: the unknown piece, never a label in the corpus


@pytest.fixture
def poisoned(monkeypatch):
    """Poison the training mix at POISONED; returns the positions read, in order."""
    read: list[int] = []
    getitem = TrainingMix.__getitem__

    def poisoned_getitem(self, i):
        position = int(i) - self.start
        read.append(position)
        sample = getitem(self, i)
        if position in POISONED:
            sample = {**sample, "labels": torch.full_like(sample["labels"], LABEL)}
        return sample

    monkeypatch.setattr(TrainingMix, "__getitem__", poisoned_getitem)
    return read


def recipe(make_recipe, tmp_path, **spike):
    return recipe_from_dict(make_recipe(
        train={"steps": STEPS, "schedule": {"style": "constant", "warmup_steps": 0},
               "spike": {"factor": 1.3, "window": 4, **spike}},
        optim={"lr": 3e-3},
        checkpoint={"save": str(tmp_path / "ck"), "save_interval": 4, "keep_last": 2},
        logging={"log_interval": 1, "tensorboard_dir": str(tmp_path / "tb")}))


def tensorboard_losses(tb) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def test_warn_logs_each_spike_and_goes_on(make_recipe, tmp_path, poisoned, caplog):
    result = train(recipe(make_recipe, tmp_path, action="warn"))
    assert result.spikes == [SPIKE, SPIKE + 1] and result.final_step == STEPS
    assert poisoned == list(range(STEPS * BATCH))  # every batch read once, in order
    normal = np.median([result.losses[s] for s in range(SPIKE - 4, SPIKE)])
    assert min(result.losses[SPIKE], result.losses[SPIKE + 1]) > 1.3 * normal
    assert f"loss spike at step {SPIKE}: " in caplog.text
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/spikes")] == \
        [(SPIKE, 1.0), (SPIKE + 1, 2.0)]


def test_rewind_skips_the_window_and_a_resume_keeps_the_skip(make_recipe, tmp_path, poisoned,
                                                            caplog):
    r = recipe(make_recipe, tmp_path, action="rewind", skip_batches=3)
    result = train(r)
    assert result.spikes == [SPIKE] and result.final_step == STEPS
    # Rewound to the checkpoint of step 16; steps 17.. read the batches after the 3 skipped.
    assert f"rewound to step {SPIKE - 1}" in caplog.text
    first_run, after = poisoned[:SPIKE * BATCH], poisoned[SPIKE * BATCH:]
    assert first_run == list(range(SPIKE * BATCH))  # the spike's batch: read once, dropped
    assert after == list(range((SPIKE + 2) * BATCH, (STEPS + 3) * BATCH))
    assert not set(after) & set(POISONED)
    logged = tensorboard_losses(tmp_path / "tb")
    assert [s for s, _ in logged] == list(range(1, STEPS + 1))  # each once, the spike purged
    assert all(v == pytest.approx(result.losses[s], rel=1e-6) for s, v in logged)
    assert max(result.losses[s] for s in range(SPIKE, STEPS + 1)) < \
        1.3 * np.median([result.losses[s] for s in range(SPIKE - 4, SPIKE)])

    state = read_train_state(find_checkpoint(tmp_path / "ck"))
    assert state.step == STEPS and state.mixture["start"] == -3 * BATCH
    assert [(w["spike_step"], w["to_step"], w["skipped_batches"]) for w in state.rewinds] == \
        [(SPIKE, SPIKE - 1, 3)]
    # A resume (here: 2 more steps) reads on from the moved position.
    more = recipe_from_dict(make_recipe(
        train={"steps": STEPS + 2, "schedule": {"style": "constant", "warmup_steps": 0}},
        optim={"lr": 3e-3}, checkpoint={"save": str(tmp_path / "ck")}))
    try:
        session = build_session(more, init_distributed(more))
        assert session.state.step == STEPS and session.train_data.start == -3 * BATCH
        assert session.state.rewinds == state.rewinds
    finally:
        destroy_parallel_state()


def test_a_spike_past_max_rewinds_stops_in_one_line(make_recipe, tmp_path, poisoned):
    with pytest.raises(SpikeError) as err:
        train(recipe(make_recipe, tmp_path, action="rewind", max_rewinds=0))
    message = str(err.value)
    assert message.startswith(f"loss spike at step {SPIKE} (") and "\n" not in message
    assert "after 0 rewinds: stopping at train.spike.max_rewinds=0" in message
