"""The report's arithmetic: tokens to reach a loss, ratios, the stage ancestry."""

import pytest

from engine.pipeline.config import pipeline_from_dict
from engine.pipeline.report import Comparison, ancestry, tokens_to_reach


def test_tokens_to_reach_interpolates_between_evaluations():
    points = [(0, 6.0), (10, 5.0), (20, 4.0), (30, 3.5)]
    assert tokens_to_reach(points, 4.5, 100) == pytest.approx(1500.0)
    assert tokens_to_reach(points, 5.0, 100) == 1000  # reached exactly at an evaluation
    assert tokens_to_reach(points, 7.0, 100) == 0  # already below at the start
    assert tokens_to_reach(points, 3.0, 100) is None


def test_ratios_count_the_ancestors_compute():
    c = Comparison("cpt", "rand", "domain", baseline_tokens=1000, baseline_final=4.0,
                   stage_final=3.8, tokens_to_reach=400.0, ancestry_flops=2.0e6,
                   baseline_flops=1000 * 1e4, stage_flops_per_token=1e4, baseline_random=True)
    assert c.token_ratio == pytest.approx(0.4)
    assert c.compute_ratio == pytest.approx((2.0e6 + 400 * 1e4) / 1e7)
    none = Comparison("cpt", "rand", "d", 1000, 4.0, 4.2, None, 0.0, 1e7, 1e4, True)
    assert none.token_ratio is None and none.compute_ratio is None


def test_ancestry_follows_weights_not_shapes():
    pipe = pipeline_from_dict({"name": "p", "out": "o", "recipe": "r", "stages": [
        {"name": "pre", "kind": "train"},
        {"name": "grow", "kind": "scale_up", "source": "pre"},
        {"name": "cpt", "kind": "train", "source": "grow"},
        {"name": "moe", "kind": "scale_out", "source": "cpt",
         "args": {"num_experts": 4, "topk": 2}},
        {"name": "cpt_moe", "kind": "train", "source": "moe"},
        {"name": "moe_rand", "kind": "train", "source": "moe", "init": "random"},
    ]}, "p.yaml")
    assert [s.name for s in ancestry(pipe, pipe.stage("cpt_moe"))] == ["pre", "cpt", "cpt_moe"]
    assert [s.name for s in ancestry(pipe, pipe.stage("moe_rand"))] == ["moe_rand"]


def test_router_collapse_finds_streaks_under_a_quarter_of_the_fair_share():
    """4 experts: the threshold is 1/16; expert 3 of layer 2 is under it at log steps 20-40
    (3 intervals: collapsed), expert 1 of layer 1 only twice in a row (not)."""
    from engine.pipeline.config import Stage
    from engine.pipeline.report import Curve, _exactness, router_collapse

    steps = [10, 20, 30, 40, 50]
    fair = [(s, 0.25) for s in steps]
    shares = {(1, e): fair for e in range(4)}
    shares[1, 1] = list(zip(steps, [0.25, 0.05, 0.05, 0.25, 0.25], strict=True))
    shares[2, 0], shares[2, 1], shares[2, 2] = fair, fair, fair
    shares[2, 3] = list(zip(steps, [0.2, 0.06, 0.01, 0.03, 0.2], strict=True))
    curve = Curve(Stage(name="moe_cpt", kind="train"), 100, 1.0, 50, token_shares=shares,
                  collapse_intervals=3)
    assert router_collapse(curve) == [{"stage": "moe_cpt", "layer": 2, "expert": 3,
                                       "from_step": 20, "to_step": 40, "min_share": 0.01,
                                       "threshold": 0.0625}]
    curve.collapse_intervals = 2
    assert [(r["layer"], r["expert"]) for r in router_collapse(curve)] == [(1, 1), (2, 3)]
    assert _exactness({"expected_exact": True, "holds": True}) == "exact (holds)"
    assert _exactness({"expected_exact": True, "holds": False}) == "exact expected: FAILED"
    assert _exactness({"expected_exact": False, "holds": None}) == "not exact by construction"
