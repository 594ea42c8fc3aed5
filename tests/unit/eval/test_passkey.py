"""Passkey tasks (engine.eval.passkey): each prompt fits its length in the tokenizer's tokens and
fills it to within one filler sentence, holds its key once at the stated depth, and the files are
the same byte for byte on a rebuild; lm-eval loads them by pattern."""

import json

import pytest
import yaml

from engine.eval.passkey import (
    FILLER,
    INSTRUCTION,
    KEY_LINE,
    PasskeySpec,
    parse_task_name,
    passkey_docs,
    passkey_grid,
    task_name,
    write_passkey_tasks,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A 400-piece sentencepiece BPE trained on the prompt's own text and some digits."""
    from engine.data.tokenizer import load_tokenizer, train_sentencepiece

    out = tmp_path_factory.mktemp("passkey_tok")
    lines = [INSTRUCTION, *FILLER, "What is the pass key? The pass key is",
             *(KEY_LINE.format(key=k) for k in range(10000, 99999, 997))]
    (out / "text.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines * 20))
    return load_tokenizer("sentencepiece",
                          train_sentencepiece([str(out / "text.jsonl")], str(out / "sp"), 400))


def test_task_names_round_trip():
    assert task_name(512, 0.25) == "passkey_512_d25"
    assert parse_task_name("passkey_512_d25") == (512, 0.25)
    assert parse_task_name("passkey_512_d100") == (512, 1.0)
    assert parse_task_name("next_line") is None


@pytest.mark.parametrize("length", [128, 300, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_prompts_fit_their_length_with_the_key_at_its_depth(tokenizer, length, depth):
    encode = tokenizer.encode
    longest_sentence = max(len(encode(" " + s)) for s in FILLER) + 2
    instruction = len(encode(INSTRUCTION + "\n"))
    docs = passkey_docs(encode, length, depth, PasskeySpec(samples=5, seed=1))
    assert len(docs) == 5 and len({d["key"] for d in docs}) == 5
    for d in docs:
        assert d["target"] == f" {d['key']}" and 10000 <= d["key"] <= 99999
        assert d["context"].count(KEY_LINE.format(key=d["key"])) == 1
        assert d["context"].count(str(d["key"])) == 2  # the key line says it twice
        total = len(encode(d["context"] + d["target"]))
        assert total == d["tokens"] and length - longest_sentence < total <= length
        # lines: instruction, filler before, key line, filler after, question
        lines = d["context"].split("\n")
        assert lines[0] == INSTRUCTION and lines[2] == KEY_LINE.format(key=d["key"])
        before, after = len(encode(lines[1])), len(encode(lines[3]))
        assert abs(before - depth * (before + after)) <= longest_sentence, (before, after)
        assert abs(d["key_token"] - (instruction + before)) <= 2


def test_depth_zero_and_one_put_the_key_at_the_ends(tokenizer):
    first = passkey_docs(tokenizer.encode, 256, 0.0, PasskeySpec(samples=1))[0]
    last = passkey_docs(tokenizer.encode, 256, 1.0, PasskeySpec(samples=1))[0]
    key_line = KEY_LINE.format(key=first["key"])
    assert first["context"].startswith(f"{INSTRUCTION}\n\n{key_line}\n")
    assert last["context"].endswith(
        f"{KEY_LINE.format(key=last['key'])}\n\nWhat is the pass key? The pass key is")


def test_too_short_a_length_and_a_bad_depth_are_refused(tokenizer):
    with pytest.raises(ValueError, match="shorter than the prompt without filler"):
        passkey_docs(tokenizer.encode, 16, 0.5, PasskeySpec(samples=1))
    with pytest.raises(ValueError, match="depth 1.5 is not in"):
        passkey_docs(tokenizer.encode, 256, 1.5, PasskeySpec(samples=1))


def test_files_are_deterministic_and_load_in_lm_eval_by_pattern(tokenizer, tmp_path):
    from engine.eval.harness import load_tasks

    spec = PasskeySpec(samples=3, seed=7)
    names = write_passkey_tasks(tmp_path / "a", tokenizer.encode, [128, 256], [0.0, 0.5], spec,
                                source="sp")
    write_passkey_tasks(tmp_path / "b", tokenizer.encode, [128, 256], [0.0, 0.5], spec,
                        source="sp")
    assert names == ["passkey_128_d0", "passkey_128_d50", "passkey_256_d0", "passkey_256_d50"]
    for name in names:
        for ext in ("jsonl", "yaml"):
            assert (tmp_path / "a" / f"{name}.{ext}").read_bytes() == \
                (tmp_path / "b" / f"{name}.{ext}").read_bytes()
    config = yaml.safe_load((tmp_path / "a" / "passkey_256_d50.yaml").read_text())
    assert config["output_type"] == "loglikelihood" and config["target_delimiter"] == ""
    assert config["metadata"]["length"] == 256 and config["metadata"]["depth"] == 0.5
    tasks = load_tasks(["passkey_*"], [tmp_path / "a"])
    assert sorted(tasks.names) == names


def test_grid_reads_accuracies_from_lm_eval_results():
    results = {"results": {"passkey_256_d0": {"acc,none": 1.0, "acc_stderr,none": 0.0},
                           "passkey_256_d50": {"acc,none": 0.5},
                           "passkey_128_d0": {"acc,none": 0.25},
                           "next_line": {"acc,none": 0.9}}}
    assert passkey_grid(results) == {128: {0.0: 0.25}, 256: {0.0: 1.0, 0.5: 0.5}}
