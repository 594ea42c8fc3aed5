"""Recipe sections: documented fields, frozen shape, and each section's own checks."""

import ast
import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import (
    BlendEntry,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    Recipe,
    RopeScaling,
    ScheduleConfig,
    TokenizerConfig,
    TrainConfig,
    ValidSet,
)

# `engine.config.validate` the attribute is the re-exported function; the module is in sys.modules.
recipe_module = importlib.import_module("engine.config.recipe")
validate_module = importlib.import_module("engine.config.validate")

MODEL = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4)


def _documented_fields(path: Path) -> dict[str, tuple[set[str], set[str]]]:
    """class name -> (annotated fields, annotated fields with a string literal right under them)."""
    out = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ClassDef):
            continue
        fields, documented = set(), set()
        for stmt, nxt in zip(node.body, node.body[1:] + [None], strict=True):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                fields.add(stmt.target.id)
                if (isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                        and isinstance(nxt.value.value, str) and nxt.value.value.strip()):
                    documented.add(stmt.target.id)
        out[node.name] = (fields, documented)
    return out


@pytest.mark.parametrize("module", [recipe_module, validate_module], ids=lambda m: m.__name__)
def test_every_field_has_a_docstring(module):
    classes = _documented_fields(Path(module.__file__))
    dataclass_names = [n for n, v in vars(module).items()
                       if dataclasses.is_dataclass(v) and v.__module__ == module.__name__]
    assert dataclass_names
    for name in dataclass_names:
        fields, documented = classes[name]
        assert fields == {f.name for f in dataclasses.fields(vars(module)[name])}, name
        assert fields - documented == set(), f"{name}: fields without a docstring"


@pytest.mark.parametrize("cls", [
    RopeScaling, ModelConfig, ParallelConfig, BlendEntry, ValidSet, DataConfig, TokenizerConfig,
    ScheduleConfig, TrainConfig, OptimConfig, CheckpointConfig, LoggingConfig, Recipe,
])
def test_sections_are_frozen_slotted_keyword_only(cls):
    assert cls.__dataclass_params__.frozen
    assert "__slots__" in vars(cls)
    assert all(f.kw_only for f in dataclasses.fields(cls))


def test_defaults_construct_and_are_immutable():
    recipe = Recipe(model=ModelConfig(**MODEL), data=DataConfig(synthetic=True))
    assert recipe.parallel == ParallelConfig() and recipe.train.schedule == ScheduleConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.train.steps = 5
    assert hash(recipe) == hash(Recipe(model=ModelConfig(**MODEL), data=DataConfig(synthetic=True)))


def test_importing_the_config_package_imports_neither_torch_nor_megatron():
    code = ("import sys, engine.config; "
            "bad = [m for m in ('torch', 'megatron') if m in sys.modules]; "
            "assert not bad, bad")
    root = Path(__file__).resolve().parents[3]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


BAD = [
    (ScheduleConfig, dict(warmup_steps=-3), "train.schedule.warmup_steps: expected >= 0, got -3"),
    (ScheduleConfig, dict(style="step"),
     "train.schedule.style: expected one of constant|linear|cosine|wsd, got 'step'"),
    (ScheduleConfig, dict(style="cosine", wsd_decay_steps=10),
     "train.schedule.wsd_decay_steps is set but train.schedule.style is 'cosine', not 'wsd'"),
    (ModelConfig, dict(MODEL, num_layers=0), "model.num_layers: expected >= 1, got 0"),
    (ModelConfig, dict(MODEL, hidden_size=66),
     "model.hidden_size=66 must be divisible by model.num_attention_heads=4 "
     "(or set model.kv_channels)"),
    (ModelConfig, dict(MODEL, num_query_groups=3),
     "model.num_query_groups=3 must divide model.num_attention_heads=4"),
    (ModelConfig, dict(MODEL, rotary_percent=0.0),
     "model.rotary_percent: expected a value in (0, 1], got 0.0"),
    (ModelConfig, dict(MODEL, hidden_dropout=1.0),
     "model.hidden_dropout: expected a value in [0, 1), got 1.0"),
    (ModelConfig, dict(MODEL, spec="cuda"),
     "model.spec: expected one of auto|local|te, got 'cuda'"),
    (ModelConfig, dict(MODEL, layernorm_epsilon=0.0),
     "model.layernorm_epsilon: expected a finite number > 0, got 0.0"),
    (RopeScaling, dict(low_freq_factor=4.0, high_freq_factor=1.0),
     "model.rotary_scaling.high_freq_factor=1.0 must be greater than low_freq_factor=4.0"),
    (RopeScaling, dict(type="longrope"),
     "model.rotary_scaling.type: expected one of linear|llama3|yarn|ntk, got 'longrope'"),
    (RopeScaling, dict(type="linear", factor=1.0),
     "model.rotary_scaling.factor: expected > 1 (a longer context), got 1.0"),
    (RopeScaling, dict(type="yarn", factor=0.5),
     "model.rotary_scaling.factor: expected > 1 (a longer context), got 0.5"),
    (RopeScaling, dict(type="yarn", beta_slow=0.0),
     "model.rotary_scaling.beta_slow: expected a finite number > 0, got 0.0"),
    (ParallelConfig, dict(tp=0), "parallel.tp: expected >= 1, got 0"),
    (ParallelConfig, dict(sequence_parallel=True),
     "parallel.sequence_parallel requires parallel.tp > 1"),
    (ParallelConfig, dict(overlap_param_gather=True, overlap_grad_reduce=True),
     "parallel.overlap_param_gather requires parallel.distributed_optimizer: true"),
    (ParallelConfig, dict(overlap_param_gather=True, distributed_optimizer=True),
     "parallel.overlap_param_gather requires parallel.overlap_grad_reduce: true"),
    (ParallelConfig, dict(vpp=2), "parallel.vpp=2 requires parallel.pp > 1"),
    (ParallelConfig, dict(pp=2, vpp=1), "parallel.vpp: expected >= 2, got 1"),
    (ParallelConfig, dict(backend="mpi"),
     "parallel.backend: expected one of auto|gloo|nccl, got 'mpi'"),
    (DataConfig, dict(),
     "data.blend: expected at least one {path, weight} entry (or data.synthetic: true)"),
    (DataConfig, dict(blend=(BlendEntry(path="a"), BlendEntry(path="b", weight=-1.0))),
     "data.blend[1].weight: expected a finite number > 0, got -1.0"),
    (DataConfig, dict(blend=(BlendEntry(path="a", weight=float("inf")),)),
     "data.blend[0].weight: expected a finite number > 0, got inf"),
    (DataConfig,
     dict(synthetic=True, valid=(ValidSet(name="a", path="x"), ValidSet(name="a", path="y"))),
     "data.valid: name 'a' appears 2 times"),
    (DataConfig, dict(synthetic=True, seq_length=0), "data.seq_length: expected >= 1, got 0"),
    (DataConfig, dict(synthetic=True, reset_attention_mask=True),
     "data.reset_attention_mask needs documents with end-of-document tokens, but "
     "data.synthetic is true"),
    (ParallelConfig, dict(cp=2, cp_comm_type="ring"),
     "parallel.cp_comm_type: expected one of p2p|all_gather|a2a, got 'ring'"),
    (TokenizerConfig, dict(type="sentencepiece"),
     "tokenizer.path is required when tokenizer.type is 'sentencepiece'"),
    (TokenizerConfig, dict(type="bpe", path="x"),
     "tokenizer.type: expected one of sentencepiece|hf|none, got 'bpe'"),
    (TrainConfig, dict(precision="fp8"),
     "train.precision: expected one of fp32|bf16|fp16, got 'fp8'"),
    (TrainConfig, dict(global_batch_size=0), "train.global_batch_size: expected >= 1, got 0"),
    (TrainConfig, dict(steps=10, schedule=ScheduleConfig(warmup_steps=11)),
     "train.schedule.warmup_steps=11 exceeds train.steps=10"),
    (TrainConfig,
     dict(steps=10, schedule=ScheduleConfig(style="wsd", warmup_steps=5, wsd_decay_steps=6)),
     "train.schedule.warmup_steps+wsd_decay_steps=11 exceeds train.steps=10"),
    (OptimConfig, dict(lr=0.0), "optim.lr: expected a finite number > 0, got 0.0"),
    (OptimConfig, dict(adam_beta2=1.0), "optim.adam_beta2: expected a value in [0, 1), got 1.0"),
    (OptimConfig, dict(name="lion"), "optim.name: expected one of adam|sgd, got 'lion'"),
    (CheckpointConfig, dict(save="c", keep_last=0), "checkpoint.keep_last: expected >= 1, got 0"),
    (CheckpointConfig, dict(save_interval=100),
     "checkpoint.save_interval=100 needs checkpoint.save (a directory)"),
    (LoggingConfig, dict(log_interval=0), "logging.log_interval: expected >= 1, got 0"),
    (LoggingConfig, dict(level="loud"), "logging.level: expected one of debug|info|warning|error"),
]


@pytest.mark.parametrize("cls, kwargs, message", BAD, ids=[m for _, _, m in BAD])
def test_post_init_rejects_with_key_and_value(cls, kwargs, message):
    with pytest.raises(ConfigError) as info:
        cls(**kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_valid_edge_values_pass():
    ModelConfig(**dict(MODEL, hidden_size=66, kv_channels=16))  # explicit head width
    ModelConfig(**dict(MODEL, num_query_groups=1, rotary_scaling=RopeScaling()))
    ParallelConfig(tp=2, pp=2, vpp=2, sequence_parallel=True, distributed_optimizer=True,
                   overlap_grad_reduce=True, overlap_param_gather=True)
    TrainConfig(steps=10, schedule=ScheduleConfig(style="wsd", warmup_steps=5, wsd_decay_steps=5))
    DataConfig(blend=(BlendEntry(path="a", weight=1e-9),))
    OptimConfig(clip_grad=0.0, weight_decay=0.0)
