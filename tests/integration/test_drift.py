"""logging.drift on a tiny Llama, one process: the figures logged at each evaluation equal a
direct computation from the saved weights (W_0 = the stage's start, W_t, W_{t-1}) per layer, for
the embedding, the output side and all parameters; TensorBoard has them; a resumed run measures
against the same W_0 (read back from the checkpoint). TP=2 equals TP=1:
tests/dist/test_mer_parallel.py."""

import math
import re

import pytest

from engine.analyze.runs import read_scalars
from engine.checkpoint.unsharded import read_unsharded
from engine.config.loader import recipe_from_dict
from engine.train.loop import train

pytestmark = pytest.mark.slow  # three short trainings

STEPS = 4


def part(name: str) -> str:
    m = re.match(r"decoder\.layers\.(\d+)\.", name)
    return f"layer{m.group(1)}" if m else "embedding" if name.startswith("embedding.") \
        else "output"


def direct(w0: dict, now: dict, before: dict) -> dict[str, float]:
    """The drift scalars computed from whole state dicts, in float64."""
    sums = {}
    for name in w0:
        a, b, c = (t[name].double() for t in (w0, now, before))
        for key in (part(name), "all"):
            s = sums.setdefault(key, [0.0] * 4)
            for i, v in enumerate(((b - a).square().sum(), a.square().sum(),
                                   (b - c).square().sum(), b.square().sum())):
                s[i] += float(v)
    out = {}
    for key, (diff, start, update, now_) in sums.items():
        out[f"drift/{key}/weight"] = math.sqrt(diff / start)
        out[f"drift/{key}/update"] = math.sqrt(update / now_)
    return out


@pytest.fixture(scope="module")
def base(make_recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("drift") / "base"
    train(recipe_from_dict(make_recipe(train={"steps": 0, "schedule": {"warmup_steps": 0}},
                                       checkpoint={"save": str(out)})))
    return read_unsharded(out)


def recipe(make_recipe, base, tmp_path, **train_):
    return recipe_from_dict(make_recipe(
        train={"steps": STEPS, "eval_interval": 2, "eval_interval_early": 1,
               "eval_early_steps": 1, "eval_steps": 1, **train_},
        logging={"drift": True, "tensorboard_dir": str(tmp_path / "tb")},
        checkpoint={"pretrained": str(base.path), "save": str(tmp_path / "ck"),
                    "save_interval": 1}))


def test_drift_equals_a_direct_computation(make_recipe, base, tmp_path):
    result = train(recipe(make_recipe, base, tmp_path))
    assert sorted(result.drift) == [0, 1, 2, 4]
    assert all(v == 0.0 for k, v in result.drift[0].items() if k.endswith("/weight"))
    assert not any(k.endswith("/update") for k in result.drift[0])  # no step yet
    states = {0: base.state} | {s: read_unsharded(tmp_path / "ck" / f"iter_{s:07d}").state
                                for s in range(1, STEPS + 1)}
    for step in (1, 2, 4):
        want = direct(base.state, states[step], states[step - 1])
        got = result.drift[step]
        assert got.keys() == want.keys()
        assert len(got) == 2 * (4 + 3)  # four layers, the embedding, the output side, all
        for tag, value in want.items():
            assert got[tag] == pytest.approx(value, rel=1e-6), (step, tag)
    logged = read_scalars(tmp_path / "tb")
    assert [s for s, _ in logged["drift/layer3/weight"]] == [0, 1, 2, 4]
    assert logged["drift/all/update"][-1][1] == pytest.approx(result.drift[4]["drift/all/update"],
                                                              rel=1e-6)


def test_a_resumed_run_measures_from_the_same_start(make_recipe, base, tmp_path):
    straight = train(recipe(make_recipe, base, tmp_path / "a"))
    train(recipe(make_recipe, base, tmp_path / "b", exit_interval=3))
    resumed = train(recipe(make_recipe, base, tmp_path / "b"))
    assert resumed.drift[4] == straight.drift[4]
