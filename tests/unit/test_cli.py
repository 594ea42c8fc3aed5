"""`engine --help` lists every command with one line; each group does the same for its own."""

import pytest

from engine.cli import COMMANDS, main


def test_help_lists_every_command_with_a_description(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, (_, about) in COMMANDS.items():
        assert f"  {name}" in out and about in out


@pytest.mark.parametrize("group, commands", [
    ("upcycle", ["scale-up", "scale-out", "vocab"]),
    ("convert", ["hf-to-engine", "engine-to-hf", "verify"]),
    ("bench", ["train", "compare", "kernels", "sweep", "collect"]),
    ("tokenizer", ["train"]),
    ("data", ["split-length", "lengths"]),
])
def test_a_group_without_a_command_lists_its_commands_and_exits_2(group, commands, capsys):
    assert main([group]) == 2
    err = capsys.readouterr().err
    assert all(f"  {c}" in err for c in commands)
    assert main([group, "nope"]) == 2 and "unknown command 'nope'" in capsys.readouterr().err
