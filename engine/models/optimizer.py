"""The optimizer of a recipe's model, as megatron-core builds it: one construction for the
training session (engine.train.session) and for whole-model commands that read or write Adam's
state (engine.checkpoint.adam: Scale-Up's --carry-optimizer), so a state written by one loads
into the other."""

from __future__ import annotations

from engine.config.recipe import Recipe


def wrap_ddp(recipe: Recipe, tc, models) -> list:
    """The model chunks in megatron-core's DistributedDataParallel (its gradient buffers are
    what the optimizer steps on)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    par = recipe.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=par.overlap_grad_reduce,
        overlap_param_gather=par.overlap_param_gather,
        use_distributed_optimizer=par.distributed_optimizer,
    )
    return [
        DistributedDataParallel(config=tc, ddp_config=ddp_config, module=m, disable_bucketing=i > 0)
        for i, m in enumerate(models)
    ]


def build_optimizer(recipe: Recipe, tc, chunks, *, overrides=None):
    """megatron-core's optimizer over `chunks` (wrap_ddp's) from the recipe's `optim` section,
    `tc` the TransformerConfig (its precision); `overrides(config)` gives get_megatron_optimizer's
    `config_overrides` (train.freeze's groups), None its defaults."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = recipe.optim
    config = OptimizerConfig(
        optimizer=o.name,
        lr=o.lr,
        min_lr=recipe.train.schedule.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        sgd_momentum=o.sgd_momentum,
        clip_grad=o.clip_grad,
        bf16=tc.bf16,
        fp16=tc.fp16,
        params_dtype=tc.params_dtype,
        use_distributed_optimizer=recipe.parallel.distributed_optimizer,
        overlap_param_gather=recipe.parallel.overlap_param_gather,
    )
    optimizer = get_megatron_optimizer(
        config, chunks, config_overrides=overrides(config) if overrides else None)
    _fuse_torch_adam(optimizer)
    return optimizer


def _fuse_torch_adam(optimizer) -> None:
    """Without TE or apex, megatron-core builds torch.optim.AdamW with torch's default
    implementation, which on CPU runs one pass over memory per elementwise op and tensor (0.55 s
    of a 6.8 s step at 58M parameters, measured by `engine bench train --profile`). torch's fused
    AdamW updates each tensor in one pass, on CPU and CUDA; the groups say so before the first
    step (a checkpoint's saved groups, loaded after, keep what they were saved with)."""
    import torch

    for inner in torch_optimizers(optimizer):
        if type(inner) in (torch.optim.Adam, torch.optim.AdamW):
            inner.defaults.update(fused=True, foreach=False)
            for group in inner.param_groups:
                group.update(fused=True, foreach=False)


def megatron_optimizers(optimizer) -> list:
    """The megatron optimizers inside `optimizer` (a chained one holds one per parameter kind,
    dense and expert), stubs without parameters left out."""
    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer])
            if not getattr(o, "is_stub_optimizer", False)]


def torch_optimizers(optimizer) -> list:
    """The torch optimizers inside a megatron optimizer (one per chained optimizer)."""
    return [getattr(c, "optimizer", None) for c in megatron_optimizers(optimizer)]


def is_distributed(opt) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(opt, DistributedOptimizer)


def main_pairs(opt) -> list[tuple]:
    """(model parameter, main tensor, start) of everything the megatron optimizer `opt` updates
    on this rank: the main tensor is the parameter itself in fp32 training, its fp32 copy with
    bf16/fp16, its flat shard under the distributed optimizer (start: the shard's first element
    in param.view(-1); None for a whole tensor)."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    if is_distributed(opt):
        pairs = []
        for models, shards in ((opt.model_float16_groups, opt.shard_fp32_from_float16_groups),
                               (opt.model_fp32_groups, opt.shard_fp32_groups)):
            for model_group, shard_group in zip(models, shards, strict=True):
                for param, shard in zip(model_group, shard_group, strict=True):
                    start = opt._get_model_param_range_map(param)["param"].start
                    pairs.append((param, shard, start))
        return pairs
    if isinstance(opt, Float16OptimizerWithFloat16Params):
        pairs = [(p, m, None) for models, mains in
                 zip(opt.float16_groups, opt.fp32_from_float16_groups, strict=True)
                 for p, m in zip(models, mains, strict=True)]
        return pairs + [(p, p, None) for group in opt.fp32_from_fp32_groups for p in group]
    return [(p, p, None) for group in opt.optimizer.param_groups for p in group["params"]]
