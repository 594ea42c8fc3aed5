"""The sample order: every layout with the same global batch sees the same samples."""

from hypothesis import given
from hypothesis import strategies as st

from engine.config.validate import Layout
from engine.train.batches import MicrobatchPlan


def layout(dp: int, mbs: int, micro: int) -> Layout:
    return Layout(
        world_size=dp,
        tp=1,
        pp=1,
        vpp=None,
        cp=1,
        ep=1,
        dp=dp,
        micro_batch_size=mbs,
        global_batch_size=dp * mbs * micro,
        num_microbatches=micro,
    )


@given(
    dp=st.integers(1, 4),
    mbs=st.integers(1, 4),
    micro=st.integers(1, 4),
    consumed=st.integers(0, 1000),
)
def test_ranks_and_microbatches_partition_the_global_batch(dp, mbs, micro, consumed):
    lay = layout(dp, mbs, micro)
    seen = [
        i
        for r in range(dp)
        for m in range(micro)
        for i in MicrobatchPlan(lay, r).sample_indices(consumed, m)
    ]
    assert sorted(seen) == list(range(consumed, consumed + lay.global_batch_size))
