"""Bad input, one line each: every row of the table runs a real command (`engine.cli.main`
in-process; one row through `python -m engine`) on one bad thing and asserts exit code 2, exactly
one `error: ...` line on stderr naming the bad thing, and nothing written or overwritten (the
test's directory, inputs included, byte-for-byte as before; the output path absent).

Rows: corrupt `.idx` (magic, version, size), `.bin` shorter than its index, token ids >= the
model's vocabulary, an empty dataset, blend weights <= 0 or not numbers, recipe values NaN/inf,
a checkpoint of an unrelated model, HF safetensors with a truncated header, a missing tokenizer
file, outputs on a read-only path (checkpoint.save, convert --out, upcycle --out). And a grep:
no `torch.load(` without `weights_only=True` in engine/ or tests/."""

import ast
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from engine.cli import main

ROOT = Path(__file__).resolve().parents[2]


def snapshot(root: Path) -> dict:
    """Every file and directory under `root`: (size, mtime_ns) of files, None for directories."""
    return {str(p.relative_to(root)): None if p.is_dir() else (p.stat().st_size,
                                                               p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def engine_ckpt(make_recipe, tmp_path_factory):
    """The tiny model's step-0 checkpoint (an input some rows read; never written by them)."""
    from engine.config.loader import recipe_from_dict
    from engine.train.loop import train

    ck = tmp_path_factory.mktemp("bad_input_ckpt") / "ck"
    train(recipe_from_dict(make_recipe(train={"steps": 0, "schedule": {"warmup_steps": 0}},
                                       checkpoint={"save": str(ck)})))
    return ck


@pytest.fixture
def read_only(tmp_path):
    """A directory this process cannot write into: chmod 0555, or, for root (which file modes
    do not stop), /proc/sys (a kernel filesystem root cannot create files in)."""
    if os.geteuid() != 0:
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    ro = Path("/proc/sys")
    if not ro.is_dir() or os.access(ro, os.W_OK):
        pytest.skip("running as root without a read-only directory to write into")
    yield ro


@dataclass
class Case:
    """What a row runs and what its one line must contain."""

    argv: list[str]
    expect: list[str]
    output: Path
    """Where the command would write: must not exist afterwards."""
    subprocess: bool = False
    extra: dict = field(default_factory=dict)


class Rows:
    """Each method builds one row's inputs under `tmp` and returns its Case."""

    def __init__(self, tmp: Path, make_recipe, tiny_data, engine_ckpt, read_only):
        self.tmp, self.make_recipe, self.data = tmp, make_recipe, tiny_data
        self.engine_ckpt, self.read_only = engine_ckpt, read_only

    def train(self, expect, *overrides, save=None, **sections) -> Case:
        """`engine train` on the tiny recipe with `sections` changed; it would save to `save`."""
        save = save or self.tmp / "ckpt"
        sections["checkpoint"] = {"save": str(save), **sections.get("checkpoint", {})}
        recipe = self.tmp / "recipe.yaml"
        recipe.write_text(yaml.safe_dump(self.make_recipe(**sections)))
        return Case(["train", "--config", str(recipe), *overrides], expect, save)

    def copy_data(self) -> Path:
        prefix = self.tmp / "bad"
        for ext in (".bin", ".idx"):
            shutil.copy(self.data["train"] + ext, f"{prefix}{ext}")
        return prefix

    def blend(self, prefix, weight=1.0) -> dict:
        return {"blend": [{"path": str(prefix), "weight": weight}]}

    def idx_bad_magic(self):
        prefix = self.copy_data()
        idx = Path(f"{prefix}.idx")
        idx.write_bytes(b"NOTANIDX!" + idx.read_bytes()[9:])
        return self.train([f"{idx}: not a megatron"], data=self.blend(prefix))

    def idx_bad_version(self):
        prefix = self.copy_data()
        idx = Path(f"{prefix}.idx")
        raw = idx.read_bytes()
        idx.write_bytes(raw[:9] + struct.pack("<Q", 7) + raw[17:])
        return self.train([f"{idx}: index version 7; expected 1"], data=self.blend(prefix))

    def idx_bad_size(self):
        prefix = self.copy_data()
        idx = Path(f"{prefix}.idx")
        idx.write_bytes(idx.read_bytes()[:-40])
        return self.train([f"{idx}: ", "bytes; expected"], data=self.blend(prefix))

    def bin_shorter_than_index(self):
        prefix = self.copy_data()
        binary = Path(f"{prefix}.bin")
        binary.write_bytes(binary.read_bytes()[:-100])
        return self.train([f"{binary}: ", "bytes; expected"], data=self.blend(prefix))

    def token_id_past_vocab(self):
        from engine.data.token_range import max_token_id

        top = max_token_id(self.data["train"])
        return self.train([f"{self.data['train']}.bin: token id {top} >= "
                           f"model.vocab_size={top - 10}"],
                          model={"vocab_size": top - 10}, tokenizer={"type": "none"})

    def empty_dataset(self):
        import numpy
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        prefix = self.tmp / "empty"
        IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16).finalize(f"{prefix}.idx")
        return self.train([str(prefix), "0 tokens"], data=self.blend(prefix))

    def blend_weight_zero(self):
        return self.train(["data.blend[0].weight", "0"], data=self.blend(self.data["train"], 0))

    def blend_weight_negative(self):
        return self.train(["data.blend[0].weight", "-1"],
                          data=self.blend(self.data["train"], -1))

    def blend_weight_not_a_number(self):
        return self.train(["data.blend[0].weight", "heavy"],
                          data=self.blend(self.data["train"], "heavy"))

    def lr_nan_override(self):
        return self.train(["optim.lr", "nan"], "optim.lr=nan")

    def inf_in_recipe(self):
        return self.train(["optim.weight_decay", "inf"], optim={"weight_decay": float("inf")})

    def unrelated_checkpoint(self):
        return self.train(["'decoder.layers.mlp.linear_fc1.weight' is (4, 256, 64); this "
                           "model's is (4, 192, 64)"], model={"ffn_hidden_size": 96},
                          checkpoint={"pretrained": str(self.engine_ckpt)})

    def tokenizer_missing(self):
        missing = self.tmp / "nothing.model"
        return self.train([str(missing)], tokenizer={"type": "sentencepiece",
                                                     "path": str(missing)})

    def save_read_only(self):
        save = self.read_only / "ckpt"
        return self.train([f"checkpoint.save={save}", "not writable"], save=save)

    def save_read_only_command(self):
        case = self.save_read_only()
        return Case(case.argv, case.expect, case.output, subprocess=True)

    def hf_truncated_header(self):
        hf = self.tmp / "hf"
        hf.mkdir()
        (hf / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
        (hf / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header[:20])
        out = self.tmp / "imported"
        return Case(["convert", "hf-to-engine", "--hf", str(hf), "--out", str(out)],
                    [str(hf / "model.safetensors")], out)

    def export_out_read_only(self):
        out = self.read_only / "hf"
        return Case(["convert", "engine-to-hf", "--ckpt", str(self.engine_ckpt), "--out",
                     str(out)], [str(out), "not writable"], out)

    def upcycle_out_read_only(self):
        out = self.read_only / "grown"
        return Case(["upcycle", "scale-up", "--ckpt", str(self.engine_ckpt), "--out", str(out),
                     "--num-layers", "6"], [str(out), "not writable"], out)


ROWS = [name for name in vars(Rows) if not name.startswith("_") and name not in
        ("train", "copy_data", "blend")]


def run(case: Case, capsys) -> tuple[int, list[str]]:
    if not case.subprocess:
        code = main(case.argv)
        return code, capsys.readouterr().err.strip().splitlines()
    proc = subprocess.run([sys.executable, "-m", "engine", *case.argv], capture_output=True,
                          text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    return proc.returncode, [line for line in proc.stderr.strip().splitlines()
                             if not re.match(r"\d\d:\d\d:\d\d (INFO|WARNING) ", line)]


@pytest.mark.parametrize("row", ROWS)
def test_bad_input_is_one_line_and_writes_nothing(row, tmp_path, make_recipe, tiny_data,
                                                  engine_ckpt, read_only, capsys):
    case = getattr(Rows(tmp_path, make_recipe, tiny_data, engine_ckpt, read_only), row)()
    before, ckpt_before = snapshot(tmp_path), snapshot(engine_ckpt)
    code, err = run(case, capsys)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for part in case.expect:
        assert part in err[0], (part, err[0])
    assert not case.output.exists()
    assert snapshot(tmp_path) == before and snapshot(engine_ckpt) == ckpt_before


def test_no_torch_load_without_weights_only():
    """torch.load unpickles: without weights_only=True a checkpoint file can run code. Every
    `torch.load(...)` call in engine/ and tests/ passes weights_only=True (a literal)."""
    unsafe, calls = [], 0
    for path in sorted([*(ROOT / "engine").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "torch"):
                calls += 1
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                           and k.value.value is True for k in node.keywords)
                if not safe:
                    unsafe.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls and not unsafe, unsafe  # calls: the walk does find torch.load
