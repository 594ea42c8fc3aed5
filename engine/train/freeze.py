"""train.freeze: the stage's first K steps update only the embedding and output layer (or only
their new rows), then every parameter trains (engine.config.freeze says why).

The mechanism is exact, under DDP and megatron-core's distributed optimizer alike:

1. Param groups (`optimizer_overrides`): megatron-core 0.16.1 groups parameters by merged
   `ParamKey` overrides (optimizer/__init__.py `_get_param_groups`). We keep its standard
   overrides (no weight decay multiplier on biases and 1-d parameters) and add one for the
   parameters megatron itself marks `is_embedding_or_output_parameter` (the embedding on the first
   pipeline stage, the output layer, tied or not, on the last), tagged `is_decoupled_lr=True`:
   megatron's own group key for the embedding and output parameters (`param_group_identifier_keys`
   matches groups on resume), which nothing else reads here. So the embedding and output layer
   form their own groups, on every rank, and the frozen parameters are exactly the others.
2. Before each update of a frozen step (`hold`, called between the backward and
   `optimizer.step()`): the frozen parameters' gradients are zeroed in the DDP gradient buffer
   (`main_grad`, after the data-parallel reduction, so every rank and the distributed optimizer's
   shard see zeros), and their groups get lr = 0 and weight_decay = 0.

Why that leaves a frozen parameter p bit-unchanged, with Adam(W) (torch, fused or not) or SGD:
its gradient is exactly 0 from the stage's first step (a stage starts with a fresh optimizer; a
resume inside the frozen phase restores the same zeros), so Adam's moments stay m = v = 0 and the
update is p - lr_step * 0 / (sqrt(0) + eps), with lr = 0 as well: p - 0 = p and p + (-0) = p for
every p, -0.0 included; decoupled weight decay multiplies by 1 - lr * wd = 1; SGD's momentum buffer
stays 0 because wd = 0 adds no p to it. The fp32 main copy of a bf16 parameter is unchanged too,
so the copy back is the same bits. Zeroed gradients alone would not do (weight decay still moves
p; moments from earlier steps would too), nor would lr = 0 alone (moments would fill with the
frozen phase's gradients and move p the moment it thaws).

Adam's per-parameter `step` still counts for frozen parameters (megatron's checkpoint format keeps
one step for all; the compat layer relies on that to resume exactly): when they thaw at step K
their moments start from zero with the bias correction of step K+1, so their first updates are
(1 - beta1) / sqrt(1 - beta2) ~ 0.45 of a fresh Adam's and reach full size within ~1/(1 - beta2)
steps: a short warm-up of the thawed parameters, on top of the learning-rate schedule.

`new_rows`: the embedding and output layer's rows below new_rows_from (in each tensor-parallel
shard's own range) get zero gradients too, and those groups no weight decay during the phase, so
the old rows keep every bit as well; the new rows (and padding rows) train.
"""

from __future__ import annotations

from functools import partial

from engine.config.freeze import FreezeConfig


def trains_first(param) -> bool:
    """Whether a parameter trains during the frozen phase: the embedding or the output layer."""
    return bool(getattr(param, "is_embedding_or_output_parameter", False))


def optimizer_overrides(freeze: FreezeConfig, config) -> dict | None:
    """`config_overrides` for megatron-core's `get_megatron_optimizer` (None: its defaults, as
    without train.freeze); `config` is its OptimizerConfig."""
    if not freeze.steps:
        return None
    from megatron.core.optimizer import ParamKey, get_standard_config_overrides

    overrides = get_standard_config_overrides(config)
    overrides[ParamKey(attr="is_embedding_or_output_parameter")] = {"is_decoupled_lr": True}
    return overrides


def _zero_old_rows(param, new_rows_from: int, tp_rank: int) -> None:
    """Zero the gradient rows of ids < new_rows_from in this rank's shard of a
    vocabulary-parallel tensor (rank r holds ids r x rows .. (r+1) x rows - 1)."""
    start = tp_rank * param.shape[0]
    old = min(max(new_rows_from - start, 0), param.shape[0])
    if old:
        param.main_grad[:old].zero_()


def hold(chunks, optimizer, freeze: FreezeConfig, *, step: int, lr: float, weight_decay: float,
         tp_rank: int = 0) -> None:
    """Set every group's lr and weight decay for the update that takes stage step `step` to
    `step + 1`, and during the frozen phase (step < freeze.steps) zero the frozen gradients
    (module docstring). Runs after the backward (and the gradient reduction), before
    `optimizer.step()`; `lr` is the schedule's, `weight_decay` the recipe's, `tp_rank` this
    rank's tensor-parallel rank (where its vocabulary shard starts)."""
    frozen = step < freeze.steps
    rows_only = frozen and freeze.train == "new_rows"
    for group in optimizer.param_groups:
        first = group.get("is_decoupled_lr", False)
        if not frozen or first:
            group["lr"], group["weight_decay"] = lr, 0.0 if rows_only else weight_decay
        else:
            group["lr"], group["weight_decay"] = 0.0, 0.0
    if not frozen:
        return
    for chunk in chunks:
        for param in chunk.parameters():
            if not param.requires_grad:
                continue
            if not trains_first(param):
                param.main_grad.zero_()
            elif rows_only:
                _zero_old_rows(param, freeze.new_rows_from, tp_rank)


def freeze_hook(recipe, chunks, optimizer, step: int, lr: float):
    """`hold` bound for this step, for train_step's `before_update`; None without train.freeze
    (then nothing differs from a run without it)."""
    freeze = recipe.train.freeze
    if not freeze.steps:
        return None
    from megatron.core import parallel_state as ps

    return partial(hold, chunks, optimizer, freeze, step=step, lr=lr,
                   weight_decay=recipe.optim.weight_decay,
                   tp_rank=ps.get_tensor_model_parallel_rank())
