"""Layout strings of `engine bench sweep`: parsing, world sizes, overrides, torchrun command."""

from pathlib import Path

import pytest

from engine.bench.sweep import layout_overrides, parse_layout, torchrun_command, world_size


def test_layouts_parse_to_overrides_and_world_sizes():
    layout = parse_layout("tp=2, pp=2,dp=2,sp=1")
    assert layout == {"tp": 2, "pp": 2, "dp": 2, "sp": 1}
    assert world_size(layout) == 8
    assert layout_overrides(layout) == ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2",
                                        "parallel.sequence_parallel=true"]
    assert world_size(parse_layout("vpp=2,ep=2")) == 1  # vpp and ep add no processes


@pytest.mark.parametrize("bad", ["tp2", "xp=2", "tp=two", "tp=-1"])
def test_bad_layouts_name_the_bad_part(bad):
    with pytest.raises(ValueError, match="expected key=int pairs"):
        parse_layout(bad)


def test_each_layout_is_one_torchrun_of_bench_train():
    cmd = torchrun_command("r.yaml", {"tp": 2}, Path("out/rows/tp2.json"), steps=5, warmup=1,
                           data="synthetic", overrides=["train.micro_batch_size=2"])
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    tail = cmd[6:]
    assert tail[:4] == ["-m", "engine", "bench", "train"]
    assert "--json" in tail and tail[-2:] == ["train.micro_batch_size=2", "parallel.tp=2"]
