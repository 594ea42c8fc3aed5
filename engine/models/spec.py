"""Layer specs: megatron-core's GPT block spec, local on CPU and Transformer Engine on GPU.

Both come from megatron-core's own spec builders (so MoE layer patterns and checkpoint key maps
stay theirs); the local spec gets one leaf swapped: its norms become
`engine.kernels.rmsnorm.RMSNorm`, which supports sequence parallelism. Checkpoint keys are
identical for both specs.
"""

import copy
import dataclasses
import importlib.util

import torch

from engine.config.errors import ConfigError
from engine.kernels.rmsnorm import RMSNorm


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_spec(requested: str, *, fp8: str | None = None) -> str:
    """`model.spec` auto|local|te -> local|te, refusing te (and fp8) where it cannot run."""
    usable_te = torch.cuda.is_available() and have_transformer_engine()
    why = (
        "CUDA is not available"
        if not torch.cuda.is_available()
        else "transformer-engine is not installed (pip install '.[gpu]')"
    )
    if requested == "te" and not usable_te:
        raise ConfigError(f"model.spec=te: {why}; use model.spec=local or auto")
    spec = ("te" if usable_te else "local") if requested == "auto" else requested
    if fp8 and spec != "te":
        raise ConfigError(
            f"train.fp8={fp8} needs Transformer Engine layers (model.spec=te), "
            f"but the spec is {spec}" + ("" if usable_te else f": {why}")
        )
    return spec


def _swap_leaves(node, old: tuple[type, ...], new: type):
    """Replace module classes in a ModuleSpec tree (specs are dataclasses of specs and types)."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(node, type):
        return new if issubclass(node, old) else node
    if isinstance(node, ModuleSpec):
        node.module = _swap_leaves(node.module, old, new)
        node.submodules = _swap_leaves(node.submodules, old, new)
        return node
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            setattr(node, f.name, _swap_leaves(getattr(node, f.name), old, new))
        return node
    if isinstance(node, list):
        return [_swap_leaves(n, old, new) for n in node]
    return node


def decoder_block_spec(config, spec: str, vp_stage: int | None = None):
    """The `TransformerBlockSubmodules` for this pipeline rank (and virtual stage)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    block = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=(spec == "te"),
        normalization=config.normalization,
        vp_stage=vp_stage,
    )
    if spec == "te":
        return block
    local_norms: tuple[type, ...] = (WrappedTorchNorm, torch.nn.RMSNorm)
    try:  # apex's fused norm when apex is installed; it also refuses RMSNorm + SP on CPU
        from megatron.core.fusions.fused_layer_norm import FusedLayerNorm

        local_norms += (FusedLayerNorm,)
    except ImportError:
        pass
    # WrappedTorchNorm is a factory (__new__ returns torch.nn.RMSNorm), so match it by identity.
    block = copy.deepcopy(block)
    return _swap_leaves(block, local_norms, RMSNorm)
