"""engine upcycle vocab on a tiny Llama with a byte-level BPE tokenizer, extended by
engine tokenizer extend: the old vocabulary's logits are unchanged bit for bit (float64, any init,
tied or not), `mean` keeps KL(p_old || p_new) under log(1 + k/n) (Hewitt 2021) while zero or
random output rows go far past it, the new tokenizer travels with the model into training and
the HF export (transformers loads both, greedy generation runs), bad input is one line."""

import json
import math
import random

import pytest
import torch
import yaml

from engine.checkpoint.unsharded import evaluate, read_unsharded, write_unsharded
from engine.cli import main as engine_main
from engine.config.loader import recipe_from_dict
from engine.data.extend import extend_tokenizer
from engine.data.preprocess import preprocess
from engine.data.tokenizer import load_tokenizer
from engine.models.weights import EMBEDDING, OUTPUT
from engine.train.loop import train
from engine.upcycle import UpcycleError
from engine.upcycle.commands import vocab_checkpoint
from engine.upcycle.invariant import measurement_tokens
from engine.upcycle.vocab import vocab_shift

ADD = 40
WORDS = ("soubor souboru soubory příručky dokumentace překladu novější nebo jako jsou které "
         "být této Pokud").split()


def _bpe(texts, out, vocab_size):
    """A byte-level BPE tokenizer.json with <|endoftext|> as eos, and its tokenizer_config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out.mkdir(parents=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return out


@pytest.fixture(scope="module")
def setup(tiny_data, make_recipe, tmp_path_factory):
    """{base, base_tied: step-0 checkpoints (random init), tokenizer: the extended one, ...}."""
    tmp = tmp_path_factory.mktemp("vocab")
    code = [json.loads(line)["text"] for line in open(tiny_data["dir"] / "code-train.jsonl")]
    base_tok = _bpe(code[:200], tmp / "base-tok", 700)
    rng = random.Random(0)
    domain = tmp / "cs.jsonl"
    domain.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(50))})
                              + "\n" for _ in range(100)))
    extend_tokenizer(base_tok, [str(domain)], ADD, tmp / "new-tok", progress=False)
    tok = load_tokenizer("hf", base_tok)
    preprocess([str(tiny_data["dir"] / "code-valid.jsonl")], str(tmp / "valid"), tok,
               progress=False)
    out = {"tmp": tmp, "tokenizer": tmp / "new-tok", "base_tokenizer": base_tok,
           "valid": str(tmp / "valid"), "domain": domain, "n": tok.vocab_size}
    for name, tied in (("base", False), ("base_tied", True)):
        recipe = make_recipe(
            model={"share_embeddings_and_output_weights": tied},
            tokenizer={"type": "hf", "path": str(base_tok)},
            data={"blend": [{"path": out["valid"], "weight": 1.0}],
                  "valid": {"code": out["valid"]}},
            train={"steps": 0, "schedule": {"warmup_steps": 0}},
            checkpoint={"save": str(tmp / name)})
        train(recipe_from_dict(recipe))
        out[name] = tmp / name
    return out


RESIZED = {}


def resized(setup, base: str, init: str, **options):
    key = (base, init, tuple(sorted(options.items())))
    if key not in RESIZED:
        out = setup["tmp"] / f"{base}-{init}-{len(RESIZED)}"
        report = vocab_checkpoint(setup[base], out, tokenizer=str(setup["tokenizer"]), init=init,
                                  eval_samples=4, **options)
        RESIZED[key] = out, report
    return RESIZED[key]


@pytest.mark.parametrize("base", ["base", "base_tied"])
@pytest.mark.parametrize("init", ["subtoken-mean", "mean", "normal"])
def test_old_vocabulary_logits_are_unchanged_bit_for_bit(setup, base, init):
    out, report = resized(setup, base, init)
    n = setup["n"]
    v = report["invariant"]
    assert v["tokens"]["source"] == "data.valid.code"  # base-tokenized text: old ids only
    assert v["max_abs"] == 0.0 and v["max_abs_old_logit_change"] == 0.0 and v["holds"]
    assert v["loss_target_old_vocab"] == v["loss_source"]  # softmax over the old tokens
    assert report["old_vocab_size"] == n and report["vocab_size"] == n + ADD
    source, target = read_unsharded(setup[base]), read_unsharded(out)
    tied = base == "base_tied"
    assert (OUTPUT in target.state) is not tied  # tied embeddings stay tied
    for name in (EMBEDDING,) if tied else (EMBEDDING, OUTPUT):
        assert torch.equal(target.state[name][:n], source.state[name][:n])
        assert target.state[name].shape[0] == report["target"]["padded_vocab_size"] == \
            -(-(n + ADD) // 128) * 128  # make_vocab_size_divisible_by x tp
    for name, tensor in source.state.items():
        if name not in (EMBEDDING, OUTPUT):
            assert torch.equal(target.state[name], tensor)
    # the new tokenizer travels with the model: in the checkpoint, and its recipe names it
    assert target.recipe.model.vocab_size == n + ADD
    assert target.recipe.tokenizer.path == str((out / "tokenizer").resolve())
    assert load_tokenizer("hf", out / "tokenizer").vocab_size == n + ADD
    fragment = recipe_from_dict({**yaml.safe_load((out / "recipe-fragment.yaml").read_text()),
                                 "data": {"synthetic": True}}, "fragment")
    assert fragment.model == target.recipe.model and fragment.tokenizer == target.recipe.tokenizer
    assert fragment.checkpoint.pretrained == str(out.resolve())


@pytest.mark.parametrize("base", ["base", "base_tied"])
def test_mean_rows_keep_kl_below_log_1_plus_k_over_n(setup, base):
    """Untied: the output rows of `mean` are the mean of the old output rows. Tied: the output
    rows are the input rows, and `mean` makes them the mean of the old rows, so the new logits
    are again the mean of the old ones: the same bound. The loss on old-only text rises by
    exactly the mean KL (module docstring of engine.upcycle.vocab)."""
    _, report = resized(setup, base, "mean")
    v = report["invariant"]
    bound = math.log1p(ADD / setup["n"])
    assert v["kl_bound"] == pytest.approx(bound) and v["kl_within_bound"] is True
    assert 0.0 < v["kl_max"] <= bound
    assert v["loss_change"] == pytest.approx(v["kl_mean"], rel=1e-9)
    _, sub = resized(setup, base, "subtoken-mean")
    assert sub["invariant"]["kl_within_bound"] is None and sub["invariant"]["kl_mean"] > 0


def shaped_model(setup, out):
    """The untied base with a trained model's shape of logits: a shared direction in every input
    row (coordinate 0, +30) dominates the residual stream, and every old output row points
    against it (-2 there), so the old logits are concentrated around -16 while their partition
    function is small, as in pretrained models where most tokens are far below zero
    (Hewitt 2021)."""
    from dataclasses import replace

    model = read_unsharded(setup["base"])
    state = dict(model.state)
    n = setup["n"]
    state[EMBEDDING] = state[EMBEDDING].clone()
    state[EMBEDDING][:n, 0] += 30.0
    state[OUTPUT] = state[OUTPUT].clone()
    state[OUTPUT][:n, 0] = -2.0
    write_unsharded(out, replace(model, state=state))
    return out


def test_zero_or_random_output_rows_are_far_above_the_bound(setup):
    shaped = shaped_model(setup, setup["tmp"] / "shaped")
    setup = {**setup, "shaped": shaped}
    n, bound = setup["n"], math.log1p(ADD / setup["n"])
    _, mean = resized(setup, "shaped", "mean")
    assert mean["invariant"]["kl_max"] <= bound and mean["invariant"]["holds"]
    _, normal = resized(setup, "shaped", "normal")
    assert normal["invariant"]["kl_mean"] > 50 * bound and normal["invariant"]["holds"]
    # zero rows (a resize that pads with zeros): every new logit is 0, far above the old ones
    source = read_unsharded(shaped)
    tokens, where = measurement_tokens(source.recipe, samples=4, seq_length=512, seed=0)
    assert where["source"] == "data.valid.code"
    _, logits = evaluate(source.recipe, source.state, tokens)
    zero = torch.cat([logits[..., :n], torch.zeros(*logits.shape[:-1], ADD, dtype=logits.dtype)],
                     dim=-1)
    assert vocab_shift(logits, zero, n, n + ADD)["kl_mean"] > 50 * bound


def test_a_moved_base_id_is_one_line_and_nothing_is_written(setup, tmp_path):
    other = _bpe(["completely different text " * 50, "another one"], tmp_path / "other", 300)
    out = tmp_path / "out"
    with pytest.raises(UpcycleError, match=r"other/tokenizer.json: base token '.+' \(id \d+\) "
                                           r"(has id \d+|is missing) in the new tokenizer; base "
                                           r"ids must not move") as err:
        vocab_checkpoint(setup["base"], out, tokenizer=str(other), eval_samples=0)
    assert "\n" not in str(err.value) and not out.exists()
    with pytest.raises(UpcycleError, match="nothing to add"):
        vocab_checkpoint(setup["base"], out, tokenizer=str(setup["base_tokenizer"]))
    assert not out.exists()


def test_cli_resizes_at_another_tp_and_refuses_bad_input(setup, tmp_path, capsys):
    out = tmp_path / "tp2"
    assert engine_main(["upcycle", "vocab", "--ckpt", str(setup["base"]), "--tokenizer",
                        str(setup["tokenizer"]), "--out", str(out), "--init", "mean",
                        "--tp", "2", "--eval-samples", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"{setup['n']} -> {setup['n'] + ADD} tokens" in line and "function preserved" in line
    model = read_unsharded(out)
    assert model.recipe.parallel.tp == 2 and model.padded_vocab_size % 256 == 0
    assert engine_main(["upcycle", "vocab", "--ckpt", str(setup["base"]), "--tokenizer",
                        str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing" in err and "\n" not in err


def test_the_resized_model_trains_and_exports_with_its_tokenizer(setup, make_recipe, tmp_path):
    """Train 2 steps on data tokenized with the new tokenizer (new ids present), export to HF:
    transformers loads the model and the extended tokenizer, the logits match the engine's, and
    greedy generation runs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.convert.exporter import engine_to_hf
    from engine.convert.verify import verify

    ckpt, report = resized(setup, "base", "subtoken-mean")
    new_tok = load_tokenizer("hf", ckpt / "tokenizer")
    preprocess([str(setup["domain"])], str(tmp_path / "cs"), new_tok, progress=False)
    recipe = make_recipe(tokenizer={"type": "hf", "path": str(ckpt / "tokenizer")},
                         model={"vocab_size": report["vocab_size"]},
                         data={"blend": [{"path": str(tmp_path / "cs"), "weight": 1.0}],
                               "valid": {}},
                         train={"steps": 2, "schedule": {"warmup_steps": 0}},
                         checkpoint={"pretrained": str(ckpt), "save": str(tmp_path / "cpt")})
    result = train(recipe_from_dict(recipe))
    assert all(math.isfinite(loss) for loss in result.losses.values())
    hf = engine_to_hf(tmp_path / "cpt", tmp_path / "hf", dtype="fp32", progress=False).path
    tokenizer = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    assert len(tokenizer) == model.config.vocab_size == setup["n"] + ADD
    text = " ".join(WORDS)
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.max().item() >= setup["n"]  # the new tokens are used
    assert ids[0].tolist() == new_tok.encode(text)
    diff = verify(hf, tmp_path / "cpt", seq=64)
    assert diff.holds, diff.line()
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 8
    assert isinstance(tokenizer.decode(generated[0]), str)


def test_bits_per_character_is_the_documents_negative_log_likelihood(setup, tmp_path, capsys):
    """`engine bpc` (lm-eval's rolling loglikelihood through the engine backend, fp32) against
    the model's float64 next-token loss of [eos] + the document's tokens."""
    text = " ".join(WORDS[:6])
    (tmp_path / "doc.jsonl").write_text(json.dumps({"text": text}) + "\n")
    assert engine_main(["bpc", "--ckpt", str(setup["base"]), "--input",
                        str(tmp_path / "doc.jsonl"), "--max-length", "64", "--json",
                        str(tmp_path / "bpc.json")]) == 0
    figures = json.loads((tmp_path / "bpc.json").read_text())
    model = read_unsharded(setup["base"])
    tok = load_tokenizer("hf", setup["base_tokenizer"])
    ids = tok.encode(text)
    loss, _ = evaluate(model.recipe, model.state, torch.tensor([[tok.eod] + ids]))
    assert figures["tokens"] == len(ids) < 64 and figures["characters"] == len(text)
    assert figures["nats"] == pytest.approx(loss * len(ids), rel=1e-5)
    assert figures["bpc"] == pytest.approx(loss * len(ids) / (math.log(2) * len(text)), rel=1e-5)
    assert "bpc " in capsys.readouterr().out
