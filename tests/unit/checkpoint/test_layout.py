"""Which optimizer states can load at which layout (no model needed)."""

import pytest

from engine.checkpoint import CheckpointError, SavedLayout
from engine.checkpoint.layout import check_optimizer_compatible


def layout(tp=1, pp=1, dp=1, distopt=True, sharding="dp_reshardable") -> SavedLayout:
    return SavedLayout(tp=tp, pp=pp, dp=dp, distributed_optimizer=distopt, optim_sharding=sharding)


def test_dp_reshardable_state_loads_at_another_dp_only(tmp_path):
    check_optimizer_compatible(tmp_path, layout(dp=2), layout(dp=1))
    with pytest.raises(CheckpointError, match=r"saved as dp_reshardable at tp=2 pp=1 ep=1 cannot "
                                              r"load at tp=1 pp=1 ep=1.*load_optim=false"):
        check_optimizer_compatible(tmp_path, layout(tp=2), layout(tp=1))


def test_fully_reshardable_and_regular_optimizer_states_load_anywhere(tmp_path):
    check_optimizer_compatible(tmp_path, layout(tp=2, sharding="fully_reshardable"), layout(pp=2))
    check_optimizer_compatible(tmp_path, layout(tp=2, distopt=False), layout(pp=2, distopt=False))
