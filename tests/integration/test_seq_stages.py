"""Sequence-length stages: a pipeline stage from the previous stage's weights at twice the
sequence length keeps the tokens per step (keep_batch_tokens: half the samples), trains, and
when interrupted resumes across the switch (its own checkpoint, not the pretrained one) with the
losses of an uninterrupted run."""

from dataclasses import replace

import pytest
import yaml

from engine.pipeline.config import pipeline_from_dict
from engine.pipeline.stages import stage_recipe
from engine.train.loop import train

pytestmark = pytest.mark.slow


def test_a_long_stage_keeps_batch_tokens_and_resumes_across_the_switch(make_recipe, tmp_path):
    base = make_recipe(train={"steps": 6})  # seq 32, global batch 8: 256 tokens per step
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(base))
    pipe = pipeline_from_dict({"name": "seq", "out": str(tmp_path / "out"),
                               "recipe": str(tmp_path / "tiny.yaml"), "stages": [
                                   {"name": "short", "kind": "train"},
                                   {"name": "long", "kind": "train", "source": "short",
                                    "keep_batch_tokens": True,
                                    "overrides": {"data.seq_length": 64, "train.steps": 4}}]},
                              "seq.yaml")
    train(stage_recipe(pipe, pipe.stage("short")))
    long_ = stage_recipe(pipe, pipe.stage("long"))
    assert (long_.data.seq_length, long_.train.global_batch_size) == (64, 4)
    assert long_.checkpoint.pretrained == str(tmp_path / "out" / "short" / "checkpoints")
    whole = train(long_)
    assert sorted(whole.losses) == [1, 2, 3, 4]

    # the same stage interrupted after step 2 (its own save directory), then started again
    ck = replace(long_.checkpoint, save=str(tmp_path / "interrupted"))
    interrupted = replace(long_, checkpoint=ck, train=replace(long_.train, exit_interval=2))
    first = train(interrupted)
    assert sorted(first.losses) == [1, 2]
    resumed = train(interrupted)  # resumes at step 2 at seq 64; pretrained is not read again
    assert sorted(resumed.losses) == [3, 4]
    for step in (1, 2):
        assert first.losses[step] == pytest.approx(whole.losses[step], rel=1e-6)
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(whole.losses[step], rel=1e-6)
        assert resumed.grad_norms[step] == pytest.approx(whole.grad_norms[step], rel=1e-6)
