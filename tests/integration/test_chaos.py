"""The chaos harness (tests/chaos.py) in CI: three kills of a 2-process run at TP=2 and at DP=2
with the distributed optimizer (one rank mid-step, every process mid-step, one inside a
checkpoint save), restarts, and the result equals the uninterrupted run bit for bit: every step
logged once, the same losses, the same final weights, no partial checkpoint, no process left.
`python tests/chaos.py --kills 20` is the long version."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.dist]

spec = importlib.util.spec_from_file_location("chaos", Path(__file__).parents[1] / "chaos.py")
chaos = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chaos)


@pytest.mark.parametrize("layout", ["tp2", "dp2"])
def test_killed_runs_lose_nothing(layout, tmp_path_factory):
    out = tmp_path_factory.getbasetemp() / "chaos"
    assert chaos.main(["--layout", layout, "--kills", "3", "--seed", "1", "--steps", "8",
                       "--out", str(out)]) == 0
    result = json.loads((out / f"chaos-{layout}.json").read_text())
    assert result["problems"] == []
    assert sorted(k["kind"] for k in result["kills"]) == \
        ["all ranks mid-step", "inside a save", "one rank mid-step"]
