"""Replay in every global batch: exact counts, every sample used once, the same batches at every
data-parallel layout, and the per-source sample counts token accounting uses."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.config.errors import ConfigError
from engine.config.recipe import BlendEntry, DataConfig, ReplayConfig, source_names
from engine.config.validate import Layout
from engine.data.mixing import TrainingMix, replay_positions
from engine.train.batches import MicrobatchPlan


class Blend:
    """A stand-in for megatron's BlendedDataset: items name their source and their index."""

    def __init__(self, tag: str, dataset_index):
        self.tag, self.dataset_index = tag, np.asarray(dataset_index)

    def __len__(self):
        return len(self.dataset_index)

    def __getitem__(self, i):
        return (self.tag, int(self.dataset_index[i]), i)


class Single(Blend):
    def __init__(self, tag: str, size: int):
        super().__init__(tag, np.zeros(size, dtype=np.int64))
        self.dataset_index = None  # a lone GPTDataset has none

    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        return (self.tag, 0, i)


@given(batch=st.integers(2, 64), data=st.data())
def test_every_batch_holds_exactly_round_fraction_replay_samples(batch, data):
    replay = data.draw(st.integers(1, batch - 1))
    mask = replay_positions(batch, replay)
    assert mask.sum() == replay
    # evenly spread: any window of w positions holds floor or ceil of w * replay / batch
    for w in (1, batch // 2, batch - 1):
        windows = np.convolve(mask, np.ones(w, dtype=int), mode="valid")
        assert windows.max() - windows.min() <= 1


def test_replay_positions_by_hand():
    assert np.flatnonzero(replay_positions(8, 2)).tolist() == [3, 7]
    assert np.flatnonzero(replay_positions(8, 3)).tolist() == [2, 5, 7]


def mix(batch=8, replay_per_batch=2):
    domain = Blend("domain", np.arange(1000) % 2)  # two domain sources, alternating
    return TrainingMix(domain, ("a", "b", "general"), num_domain_sources=2,
                       global_batch_size=batch, replay=Single("replay", 1000),
                       replay_per_batch=replay_per_batch)


def test_domain_and_replay_samples_are_each_used_once_in_order():
    m = mix()
    items = [m[i] for i in range(5 * 8)]
    replay = [i for tag, _, i in items if tag == "replay"]
    domain = [i for tag, _, i in items if tag == "domain"]
    assert replay == list(range(10)) and domain == list(range(30))
    for k in range(5):
        assert sum(tag == "replay" for tag, _, _ in items[8 * k: 8 * k + 8]) == 2
    assert len(m) == min(1000 // 6, 10_000 // 2) * 8


def test_source_counts_per_batch():
    m = mix()
    assert m.source_samples(0, 8) == {"a": 3, "b": 3, "general": 2}
    ids = m.source_ids(np.arange(16))
    assert ids.tolist() == [0, 1, 0, 2, 1, 0, 1, 2] * 2


def test_without_replay_the_mix_is_the_blend():
    domain = Blend("domain", [0, 1, 1, 0])
    m = TrainingMix(domain, ("x", "y"), num_domain_sources=2, global_batch_size=2)
    assert [m[i] for i in range(4)] == [domain[i] for i in range(4)] and len(m) == 4
    assert m.source_samples(0, 4) == {"x": 2, "y": 2}


@pytest.mark.parametrize(("dp", "mbs"), [(1, 8), (2, 2), (4, 1), (8, 1)])
def test_the_global_batch_is_the_same_at_every_data_parallel_layout(dp, mbs):
    m, batch, consumed = mix(batch=8, replay_per_batch=3), 8, 16
    seen = {}
    for rank in range(dp):
        layout = Layout(world_size=dp, tp=1, pp=1, vpp=None, cp=1, ep=1, dp=dp,
                        micro_batch_size=mbs, global_batch_size=batch,
                        num_microbatches=batch // (dp * mbs))
        plan = MicrobatchPlan(layout, rank)
        for micro in range(layout.num_microbatches):
            for i in plan.sample_indices(consumed, micro):
                seen[i] = m[i]
    assert seen == {i: m[i] for i in range(consumed, consumed + batch)}


def test_replay_config_names_and_errors():
    data = DataConfig(blend=(BlendEntry(path="d/domain"), BlendEntry(path="e/code", name="c")),
                      replay=ReplayConfig(blend=(BlendEntry(path="g/general/"),), fraction=0.25))
    assert source_names(data) == ("domain", "c", "general")
    assert data.replay.samples_per_batch(10) == 3  # 2.5 rounds half up
    with pytest.raises(ConfigError, match=r"^data.replay.fraction: expected a value in \(0, 1\)"):
        DataConfig(blend=data.blend, replay=ReplayConfig(blend=data.replay.blend, fraction=1.0))
    with pytest.raises(ConfigError, match="^data.replay.blend\\[0\\]: source name 'domain' is "
                                          "also data.blend\\[0\\]'s"):
        DataConfig(blend=data.blend,
                   replay=ReplayConfig(blend=(BlendEntry(path="x/domain"),), fraction=0.5))


def test_replay_must_round_to_at_least_one_sample_per_batch(tmp_path):
    from engine.config.loader import recipe_from_dict
    from engine.config.validate import validate

    recipe = recipe_from_dict({
        "model": {"num_layers": 2, "hidden_size": 8, "ffn_hidden_size": 16,
                  "num_attention_heads": 2, "vocab_size": 64},
        "data": {"blend": [{"path": "d"}], "replay": {"blend": [{"path": "g"}],
                                                      "fraction": 0.05}},
        "train": {"global_batch_size": 8}})
    with pytest.raises(ConfigError, match=r"^data.replay.fraction=0.05 of "
                                          r"train.global_batch_size=8 rounds to 0 replay samples"):
        validate(recipe, 1)
