"""Imported checkpoints at other layouts: TP=2, PP=2 (and EP=2 for MoE) give the transformers
logits (relative to their scale, engine.models.measure's fp32 tolerance, top-1 equal), at the
layout megatron's parallel state reports; and a round trip through training (import, 2 steps at
TP=2, export) loads in transformers with the engine's TP=1 logits."""

import json
from pathlib import Path

import pytest
import torch

from engine.convert.verify import random_tokens
from engine.models.measure import compare_logits

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = Path(__file__).with_name("convert_worker.py")
TRAIN_WORKER = Path(__file__).with_name("worker.py")
FAMILIES = ["llama2", "llama3", "mistral", "qwen2", "aquila", "mixtral", "qwen2_moe"]
LAYOUTS = {"tp2-pp1-ep1": (2, 1, 1), "tp1-pp2-ep1": (1, 2, 1), "tp1-pp1-ep2": (1, 1, 2)}
MOE = ("mixtral", "qwen2_moe")
CASES = [(f, name) for f in FAMILIES for name, (_, _, ep) in LAYOUTS.items()
         if ep == 1 or f in MOE]  # expert parallelism only for the MoE families


@pytest.fixture(scope="module")
def layout_logits(hf_models, converted, tmp_path_factory, torchrun):
    tmp = tmp_path_factory.mktemp("layouts")
    tokens = tmp / "tokens.pt"
    torch.save(random_tokens(1000, batch=2, seq=256, seed=3), tokens)
    jobs = [{"ckpt": str(converted[f]), "tp": tp, "pp": pp, "ep": ep, "tokens": str(tokens),
             "out": str(tmp / f"{f}-{name}.pt")}
            for f in FAMILIES for name, (tp, pp, ep) in LAYOUTS.items()
            if ep == 1 or f in MOE]
    (tmp / "spec.json").write_text(json.dumps({"jobs": jobs}))
    torchrun(2, WORKER, str(tmp / "spec.json"), timeout=900)
    return (torch.load(tokens, weights_only=True),
            {Path(j["out"]).stem: torch.load(j["out"], weights_only=True) for j in jobs})


@pytest.mark.parametrize("family, layout", CASES)
def test_logits_at_other_layouts(family, layout, hf_models, layout_logits):
    tokens, results = layout_logits
    _, model = hf_models[family]
    with torch.no_grad():
        reference = model(tokens).logits.float()
    result = results[f"{family}-{layout}"]
    tp, pp, ep = LAYOUTS[layout]
    assert {k: result["layout"][k] for k in ("world_size", "tp", "pp", "ep")} == \
        {"world_size": 2, "tp": tp, "pp": pp, "ep": ep}
    diff = compare_logits(reference, result["logits"], vocab_size=reference.shape[-1],
                          dtype=torch.float32)
    assert diff.holds and diff.top1 == 1.0, diff.line()


def test_round_trip_through_training_at_tp2(hf_models, converted, make_recipe, tmp_path,
                                           torchrun):
    import yaml
    from transformers import AutoModelForCausalLM

    from engine.checkpoint.unsharded import (
        assign,
        forward_logits,
        read_unsharded,
        single_process_model,
    )
    from engine.convert.exporter import engine_to_hf

    stored = yaml.safe_load((converted["llama3"] / "iter_0000000" / "recipe.yaml").read_text())
    recipe = make_recipe(parallel={"tp": 2}, train={"steps": 2},
                         checkpoint={"pretrained": str(converted["llama3"]),
                                     "save": str(tmp_path / "trained")})
    recipe["model"] = stored["model"]  # the imported shape; data and tokenizer from the fixture
    (tmp_path / "spec.json").write_text(json.dumps({"runs": [{"name": "cpt", "recipe": recipe}]}))
    torchrun(2, TRAIN_WORKER, str(tmp_path / "spec.json"), str(tmp_path / "out.json"))

    exported = engine_to_hf(tmp_path / "trained", tmp_path / "hf", dtype="fp32",
                            progress=False).path
    hf = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    trained = read_unsharded(tmp_path / "trained")
    vocab = trained.recipe.model.vocab_size
    tokens = random_tokens(vocab, batch=2, seq=256, seed=4)
    with single_process_model(trained.recipe, trained.padded_vocab_size,
                              dtype=torch.float32) as model:
        assign(model, trained.state)
        ours = forward_logits(model, tokens)
    with torch.no_grad():
        exported_logits = hf(tokens).logits.float()
        before = hf_models["llama3"][1](tokens).logits.float()
    diff = compare_logits(exported_logits, ours, vocab_size=vocab, dtype=torch.float32)
    assert diff.holds and diff.top1 == 1.0, diff.line()
    moved = compare_logits(before, ours, vocab_size=vocab, dtype=torch.float32)
    assert not moved.holds  # training moved the weights beyond the conversion tolerance
