"""Recipes: typed, frozen config sections, YAML with dotted overrides, cross-section validation.

`load_recipe("configs/x.yaml", ["train.steps=10"])` builds a `Recipe`;
`validate(recipe, world_size)` checks the rules that span sections and returns the `Layout`.
Imports neither torch nor megatron.
"""

from engine.config.errors import ConfigError
from engine.config.loader import (
    dump_recipe,
    load_recipe,
    recipe_from_dict,
    recipe_to_dict,
)
from engine.config.recipe import (
    BlendEntry,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
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
from engine.config.validate import Layout, validate

__all__ = [
    "BlendEntry",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "Layout",
    "LoggingConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "Recipe",
    "RopeScaling",
    "ScheduleConfig",
    "TokenizerConfig",
    "TrainConfig",
    "ValidSet",
    "dump_recipe",
    "load_recipe",
    "recipe_from_dict",
    "recipe_to_dict",
    "validate",
]
