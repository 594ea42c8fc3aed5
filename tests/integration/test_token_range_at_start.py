"""Training refuses data whose token ids do not fit the model's vocabulary (the tokenizer's
size, not the padded rows) at start, through the CLI: one line naming the file and the id, exit
code 2, nothing trained or saved."""

import yaml

from engine.cli import main
from engine.data.token_range import max_token_id


def test_data_from_a_bigger_tokenizer_is_refused_in_one_line(make_recipe, tiny_data, tmp_path,
                                                             capsys):
    top = max_token_id(tiny_data["train"])
    vocab = top - 10  # e.g. the model's base vocabulary, data tokenized after an extension
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(make_recipe(
        model={"vocab_size": vocab}, tokenizer={"type": "none"},
        checkpoint={"save": str(tmp_path / "ckpt")})))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tiny_data['train']}.bin: token id {top} >= model.vocab_size={vocab} "
                   "(the data was tokenized with another tokenizer?)"]
    assert not (tmp_path / "ckpt").exists()


def test_a_vocabulary_padded_past_the_largest_id_is_not_enough(make_recipe, tiny_data, tmp_path,
                                                               capsys):
    """vocab_size top (the largest id itself) pads to 128 rows or more that would hold the id:
    the check is against the tokens, not the rows."""
    top = max_token_id(tiny_data["valid"])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(make_recipe(
        model={"vocab_size": top}, tokenizer={"type": "none"},
        data={"blend": [{"path": tiny_data["valid"], "weight": 1.0}], "valid": {}})))
    assert main(["train", "--config", str(path)]) == 2
    assert f"token id {top} >= model.vocab_size={top}" in capsys.readouterr().err
