"""engine.data.streams: a source's sample k depends on the data and the seed only, epochs after
the first are permutations of the first, a blend's prefix does not depend on its length, and
offsets continue each source where an earlier mixture stopped."""

import numpy as np
import pytest

from engine.data.streams import Blend, EpochStream, blending_indices


class Samples:
    """A one-epoch dataset whose sample p is (name, p)."""

    def __init__(self, name: str, n: int):
        self.name, self.n = name, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, p: int):
        assert 0 <= p < self.n
        return (self.name, p)


def test_epochs_are_permutations_of_the_first_and_depend_on_the_seed_only():
    stream = EpochStream(Samples("a", 7), seed=3, index=0)
    epochs = [[stream[k][1] for k in range(e * 7, (e + 1) * 7)] for e in range(4)]
    assert epochs[0] == list(range(7))  # megatron's own one-epoch order
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 4  # each epoch reads them in another order
    again = EpochStream(Samples("a", 7), seed=3, index=0)
    assert [again[k] for k in range(28)] == [stream[k] for k in range(28)]
    other = EpochStream(Samples("a", 7), seed=4, index=0)
    assert [other[k] for k in range(7, 28)] != [stream[k] for k in range(7, 28)]


def test_blending_prefix_does_not_depend_on_the_size_and_follows_the_weights():
    short_source, short_within = blending_indices([0.7, 0.2, 0.1], 100)
    long_source, long_within = blending_indices([0.7, 0.2, 0.1], 10_000)
    assert (long_source[:100] == short_source).all() and (long_within[:100] == short_within).all()
    counts = np.bincount(long_source, minlength=3)
    assert np.abs(counts - np.array([7000, 2000, 1000])).max() <= 1
    for s in range(3):  # each source is read in its own order, without gaps
        assert (long_within[long_source == s] == np.arange(counts[s])).all()


def test_a_blend_grows_as_it_is_read_and_offsets_continue_each_source():
    sources = [EpochStream(Samples(n, 50), seed=0, index=i) for i, n in enumerate("ab")]
    blend = Blend(sources, [0.5, 0.5], size=4)
    read = [blend[i] for i in range(60)]  # past the computed size, past an epoch of neither
    assert len(blend) >= 60 and read == [Blend(sources, [0.5, 0.5])[i] for i in range(60)]
    seen = {name: [p for n, p in read if n == name] for name in "ab"}
    # a new mixture (other weights) continues each source after what was read
    later = Blend(sources, [0.9, 0.1], offsets=[len(seen["a"]), len(seen["b"])])
    more = [later[i] for i in range(20)]
    for name in "ab":
        new = [p for n, p in more if n == name]
        assert not set(new) & set(seen[name])  # nothing read twice within the epoch
    with pytest.raises(ValueError, match="one weight and one offset per source"):
        Blend(sources, [1.0])
