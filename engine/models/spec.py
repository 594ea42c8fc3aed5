"""Layer specs: megatron-core's GPT block spec, local on CPU and Transformer Engine on GPU.

Both come from megatron-core's own spec builders (so MoE layer patterns and checkpoint key maps
stay theirs); the local spec gets one leaf swapped: its norms become
`engine.kernels.rmsnorm.RMSNorm`, which supports sequence parallelism. Checkpoint keys are
identical for both specs.

With `fused=True` (recipe `model.fused_kernels`) the local spec's leaves become the fused-kernel
subclasses of `engine.kernels` (RMSNorm, SwiGLU MLP, RoPE self-attention, SDPA core attention):
same parameters and keys, the csrc kernels where built. The TE spec has its own fused layers.
With context parallelism or document masks the local spec's core attention is
engine.models.cp_attention's (megatron's local attention has neither).
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


def check_training_attention(spec: str, *, reset_attention_mask: bool) -> None:
    """Refuse document masks where the attention cannot apply them: the TE spec takes document
    boundaries as packed-sequence parameters (THD), which the engine does not build."""
    if reset_attention_mask and spec != "local":
        raise ConfigError("data.reset_attention_mask=true needs the local spec's attention "
                          f"(model.spec=local), but the spec is {spec}")


def _swap_leaves(node, old: tuple[type, ...], new: type, *, exact: bool = False):
    """Replace module classes in a ModuleSpec tree (specs are dataclasses of specs and types);
    `exact` replaces only the classes themselves, not their subclasses."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(node, type):
        return new if (node in old if exact else issubclass(node, old)) else node
    if isinstance(node, ModuleSpec):
        node.module = _swap_leaves(node.module, old, new, exact=exact)
        node.submodules = _swap_leaves(node.submodules, old, new, exact=exact)
        return node
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        for f in dataclasses.fields(node):
            setattr(node, f.name, _swap_leaves(getattr(node, f.name), old, new, exact=exact))
        return node
    if isinstance(node, list):
        return [_swap_leaves(n, old, new, exact=exact) for n in node]
    return node


def _fused_leaves(block):
    """The local spec with megatron's leaves replaced by the fused-kernel subclasses (exact
    classes only: e.g. MoE's SharedExpertMLP, an MLP subclass, keeps its own forward)."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.mlp import MLP

    from engine.kernels.modules import FusedMLP, FusedRopeSelfAttention, SdpaAttention
    from engine.kernels.rmsnorm import FusedRMSNorm

    for old, new in ((RMSNorm, FusedRMSNorm), (MLP, FusedMLP),
                     (SelfAttention, FusedRopeSelfAttention), (DotProductAttention, SdpaAttention)):
        block = _swap_leaves(block, (old,), new, exact=True)
    return block


def _cp_attention(block):
    """The local spec with its core attention (megatron's, or the fused SDPA one) replaced by
    engine.models.cp_attention's: context parallelism and document masks."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from engine.kernels.modules import SdpaAttention
    from engine.models.cp_attention import ContextParallelAttention

    return _swap_leaves(block, (DotProductAttention, SdpaAttention), ContextParallelAttention,
                        exact=True)


def decoder_block_spec(config, spec: str, vp_stage: int | None = None, *, fused: bool = False,
                       masked: bool = False):
    """The `TransformerBlockSubmodules` for this pipeline rank (and virtual stage); `fused` puts
    the fused-kernel modules into the local spec; `masked` (document masks given with each
    batch) or context parallelism (config.context_parallel_size > 1) its attention becomes
    engine.models.cp_attention's."""
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
    block = _swap_leaves(copy.deepcopy(block), local_norms, RMSNorm)
    block = _fused_leaves(block) if fused else block
    return _cp_attention(block) if masked or config.context_parallel_size > 1 else block
