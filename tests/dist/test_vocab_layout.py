"""Vocabulary resize is layout-independent: the same tied-embedding weights saved by a TP=2 run, a
PP=2 run (the output layer a copy of the embedding on the last stage) and a TP=1 run resize into
exactly the same tensors and report; written for TP=2 or PP=2 (rows padded for that layout), the
resized model trains there as it does at TP=1 (same loss to 1e-5, fp32, gloo)."""

import json
import random
from pathlib import Path

import pytest
import torch

from engine.checkpoint.unsharded import read_unsharded
from engine.config.loader import recipe_from_dict, recipe_to_dict
from engine.data.extend import extend_tokenizer
from engine.data.preprocess import preprocess
from engine.data.tokenizer import load_tokenizer
from engine.train.loop import train
from engine.upcycle.commands import vocab_checkpoint

pytestmark = [pytest.mark.dist, pytest.mark.slow]

WORKER = Path(__file__).with_name("worker.py")
WORDS = "soubor souboru příručky dokumentace překladu novější nebo jako jsou které být".split()


def bpe_tokenizers(tiny_data, tmp: Path) -> tuple[Path, Path]:
    """(base, extended by 40 tokens): a byte-level BPE on the stdlib text, then Czech words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    code = [json.loads(line)["text"] for line in open(tiny_data["dir"] / "code-train.jsonl")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(code[:200], trainers.BpeTrainer(
        vocab_size=700, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    (tmp / "base").mkdir()
    tok.save(str(tmp / "base" / "tokenizer.json"))
    (tmp / "base" / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    rng = random.Random(0)
    (tmp / "cs.jsonl").write_text("".join(
        json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(50))}) + "\n"
        for _ in range(100)))
    extend_tokenizer(tmp / "base", [str(tmp / "cs.jsonl")], 40, tmp / "new", progress=False)
    return tmp / "base", tmp / "new"


def launch(torchrun, tmp: Path, runs: dict) -> dict:
    spec, out = tmp / "spec.json", tmp / "out.json"
    spec.write_text(json.dumps({"runs": [{"name": k, "recipe": r} for k, r in runs.items()]}))
    torchrun(2, WORKER, str(spec), str(out), timeout=600)
    return json.loads(out.read_text())


def one_step(resized: Path, save: Path) -> dict:
    plain = recipe_to_dict(read_unsharded(resized).recipe)
    plain["train"].update(steps=1)
    plain["checkpoint"]["save"] = str(save)
    return plain


def test_resize_is_the_same_from_any_saved_layout_and_trains_at_its_target_layout(
        tiny_data, make_recipe, torchrun, tmp_path):
    base_tok, new_tok = bpe_tokenizers(tiny_data, tmp_path)
    preprocess([str(tiny_data["dir"] / "code-valid.jsonl")], str(tmp_path / "valid"),
               load_tokenizer("hf", base_tok), progress=False)

    def recipe(**sections):
        return make_recipe(model={"share_embeddings_and_output_weights": True},
                           tokenizer={"type": "hf", "path": str(base_tok)},
                           data={"blend": [{"path": str(tmp_path / "valid"), "weight": 1.0}],
                                 "valid": {"code": str(tmp_path / "valid")}}, **sections)

    trained = train(recipe_from_dict(recipe(checkpoint={"save": str(tmp_path / "trained")})))
    resave = {"train": {"steps": 0, "schedule": {"warmup_steps": 0}}}
    saved = launch(torchrun, tmp_path, {
        f"save_{name}": recipe(parallel=parallel, **resave, checkpoint={
            "pretrained": str(trained.checkpoint), "save": str(tmp_path / name)})
        for name, parallel in (("tp2", {"tp": 2}), ("pp2", {"pp": 2}))})
    assert saved["save_tp2"]["layout"]["tp"] == 2 and saved["save_pp2"]["layout"]["pp"] == 2
    train(recipe_from_dict(recipe(**resave, checkpoint={
        "pretrained": str(trained.checkpoint), "save": str(tmp_path / "tp1")})))

    reports = {name: vocab_checkpoint(tmp_path / name, tmp_path / f"resized_{name}",
                                      tokenizer=str(new_tok), tp=1, pp=1, eval_samples=2)
               for name in ("tp1", "tp2", "pp2")}
    states = {name: read_unsharded(tmp_path / f"resized_{name}").state for name in reports}
    for name in ("tp2", "pp2"):
        assert reports[name]["examples"] == reports["tp1"]["examples"]
        assert reports[name]["invariant"] == reports["tp1"]["invariant"]
        assert states[name].keys() == states["tp1"].keys()
        assert all(torch.equal(states[name][k], states["tp1"][k]) for k in states["tp1"])
    assert "output_layer.weight" not in states["tp1"]  # tied stays tied
    assert reports["tp1"]["invariant"]["max_abs"] == 0.0

    # written for TP=2 and for PP=2 (tied: the last stage's output layer from the embedding)
    targets = {"tp2": {"tp": 2}, "pp2": {"pp": 2}}
    for name, layout in targets.items():
        vocab_checkpoint(tmp_path / "tp1", tmp_path / f"to_{name}", tokenizer=str(new_tok),
                         eval_samples=0, **layout)
        state = read_unsharded(tmp_path / f"to_{name}").state
        vocab = reports["tp1"]["vocab_size"]
        assert all(torch.equal(state[k][:vocab], states["tp1"][k][:vocab]) for k in state)
    at = launch(torchrun, tmp_path, {name: one_step(tmp_path / f"to_{name}",
                                                    tmp_path / f"trained_{name}")
                                     for name in targets})
    at_tp1 = train(recipe_from_dict(one_step(tmp_path / "resized_tp1", tmp_path / "trained_tp1")))
    for name, layout in targets.items():
        assert at[name]["layout"][next(iter(layout))] == 2
        assert at[name]["losses"]["1"] == pytest.approx(at_tp1.losses[1], rel=1e-5)
        assert at[name]["grad_norms"]["1"] == pytest.approx(at_tp1.grad_norms[1], rel=1e-5)
