"""The import arrows between the engine's packages run one way (every `import`, lazy ones inside
functions included, read from the source):

    commands (engine/cli.py, */cli.py, upcycle/commands.py)
      -> convert, upcycle, pipeline, bench
         -> train -> eval -> checkpoint -> models, data, distributed -> config

convert and upcycle never import each other, train, pipeline or bench; eval (lm-eval on a model,
also the probes inside training) never imports train; analyze (fits on finished runs) sits beside
convert and upcycle and reads runs through checkpoint and train's pure schedule; checkpoint never
imports convert, upcycle, train or eval; models and config never import what is built on them."""

import ast
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[2] / "engine"

FORBIDDEN = {  # package -> the packages its library modules must not import
    "config": {"models", "checkpoint", "convert", "upcycle", "train", "pipeline", "bench",
               "data", "distributed", "kernels", "compat", "eval", "analyze"},
    "models": {"checkpoint", "convert", "upcycle", "train", "pipeline", "bench", "data",
               "distributed", "eval", "analyze"},
    "distributed": {"models", "checkpoint", "convert", "upcycle", "train", "pipeline", "bench",
                    "eval"},
    "checkpoint": {"convert", "upcycle", "train", "pipeline", "bench", "eval", "analyze"},
    "data": {"checkpoint", "convert", "upcycle", "train", "pipeline", "bench", "eval",
             "analyze"},
    "convert": {"upcycle", "train", "pipeline", "bench"},
    "upcycle": {"convert", "train", "pipeline", "bench"},
    "eval": {"convert", "upcycle", "train", "pipeline", "bench", "analyze"},
    "analyze": {"convert", "upcycle", "pipeline", "bench", "eval"},
    "train": {"convert", "upcycle", "pipeline", "bench", "analyze"},
}
COMMANDS = {"cli.py", "commands.py"}
"""Command modules: the edge where a command may combine packages (Scale-Out reads an HF
directory through convert)."""


def engine_imports(path: Path) -> set[str]:
    """The engine packages (first component after `engine.`) that `path` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names
                                     if node.module == "engine"]
        for name in names:
            parts = name.split(".")
            if parts[0] == "engine" and len(parts) > 1:
                found.add(parts[1])
    return found


def _modules(package: str) -> list[Path]:
    single = ENGINE / f"{package}.py"
    return [single] if single.is_file() else sorted((ENGINE / package).rglob("*.py"))


@pytest.mark.parametrize("package", FORBIDDEN)
def test_library_modules_import_only_downwards(package):
    for path in _modules(package):
        if path.name in COMMANDS:
            continue
        wrong = engine_imports(path) & FORBIDDEN[package]
        assert not wrong, f"{path.relative_to(ENGINE.parent)} imports engine.{sorted(wrong)}"


def test_the_checker_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from engine.convert.importer import read_hf\n"
                      "    import engine.train.loop\n    from engine import upcycle\n")
    assert engine_imports(module) == {"convert", "train", "upcycle"}
