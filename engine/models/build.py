"""Build megatron-core `GPTModel` chunks: recipe -> TransformerConfig -> layer spec -> model.

Needs `megatron.core.parallel_state` initialized (the pipeline rank decides which layers are
built). The model knows nothing of data, optimizers or checkpoints.
"""

from __future__ import annotations

import contextlib

import torch

from engine.config.recipe import ParallelConfig, Recipe
from engine.config.validate import Layout
from engine.models import get_family
from engine.models.spec import decoder_block_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config(recipe: Recipe, layout: Layout, *, on_cpu: bool, gloo: bool,
                       perform_initialization: bool = True, dtype: torch.dtype | None = None):
    """megatron-core TransformerConfig for this recipe and layout.

    on_cpu: initialize on the CPU generator and leave out the kernels that need CUDA (TE, apex,
    jit fusions). gloo: the process group is gloo (engine.compat: batched p2p gives wrong
    numbers there). perform_initialization=False leaves the weights uninitialized (they are
    loaded or assigned after). dtype: parameters and activations in another dtype than the
    recipe's precision (float64 for the invariant checks of engine.checkpoint.unsharded)."""
    from megatron.core.transformer import TransformerConfig

    from engine.compat import cpu as compat_cpu

    m, par, train = recipe.model, recipe.parallel, recipe.train
    family = get_family(m.family)
    dtype = dtype or DTYPES[train.precision]
    recompute = (
        {}
        if train.recompute == "none"
        else {
            "recompute_granularity": train.recompute,
            **(
                {"recompute_method": "uniform", "recompute_num_layers": train.recompute_num_layers}
                if train.recompute == "full"
                else {}
            ),
        }
    )
    return TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        # megatron's window is (left, right) tokens besides the query itself
        window_size=(m.window_size - 1, 0) if m.window_size else None,
        add_qkv_bias=m.add_qkv_bias,
        layernorm_epsilon=m.layernorm_epsilon,
        init_method_std=m.init_method_std,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        normalization=family.normalization,
        gated_linear_unit=family.gated_linear_unit,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=family.add_bias_linear,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        # TE's exchange of keys and values (the local spec's CP attention all-gathers)
        cp_comm_type=par.cp_comm_type if layout.cp > 1 else None,
        expert_model_parallel_size=layout.ep,
        sequence_parallel=par.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        autocast_dtype=dtype,
        # Token-weighted loss: every layout and microbatch split averages over the same tokens.
        calculate_per_token_loss=True,
        # CPU: initialize full weights on the CPU generator; kernels below need CUDA (TE/apex/jit).
        use_cpu_initialization=on_cpu,
        perform_initialization=perform_initialization,
        bias_activation_fusion=not on_cpu,
        bias_dropout_fusion=not on_cpu,
        masked_softmax_fusion=not on_cpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        batch_p2p_comm=compat_cpu.BATCH_P2P_ON_GLOO if gloo else True,
        **({"fp8": train.fp8, "fp8_recipe": train.fp8_recipe} if train.fp8 else {}),
        **recompute,
        **moe_kwargs(m.moe, aux_loss_scale=moe_aux_loss_scale(par)),
    )


def moe_aux_loss_scale(parallel: ParallelConfig) -> int:
    """How much smaller than one process's the MoE auxiliary-loss gradients come out: tp under
    sequence parallelism, else 1.

    megatron-core 0.16.1 computes the load-balancing loss on each tensor-parallel rank's share
    of the tokens under sequence parallelism, and with calculate_per_token_loss scales it by that
    rank's local token count (megatron/core/transformer/moe/router.py,
    `TopKRouter.attach_and_log_load_balancing_loss`; likewise the z-loss in
    `TopKRouter.apply_z_loss`, whose coefficient it also divides by the TP size), while
    `finalize_model_grads` divides by all the tokens: measured, tp=2 with both coefficients x2
    reproduces tp=1 to 1e-7. The coefficients are multiplied by this factor (`moe_kwargs`) and
    the logged per-rank load-balancing losses likewise (engine.train.moe_metrics), so every
    layout optimizes and reports the recipe's objective."""
    return parallel.tp if parallel.sequence_parallel else 1


def moe_kwargs(moe, *, aux_loss_scale: int = 1) -> dict:
    """`model.moe` in megatron-core's TransformerConfig names, the auxiliary-loss coefficients
    multiplied by `moe_aux_loss_scale`."""
    if moe is None:
        return {}
    z_loss = moe.z_loss_coeff * aux_loss_scale if moe.z_loss_coeff is not None else None
    aux_free = moe.load_balancing == "aux_free"
    return dict(
        num_moe_experts=moe.num_experts, moe_router_topk=moe.topk,
        moe_ffn_hidden_size=moe.ffn_hidden_size, moe_router_pre_softmax=moe.router_pre_softmax,
        moe_router_score_function=moe.router_score_function,
        moe_router_load_balancing_type="none" if aux_free else moe.load_balancing,
        moe_router_enable_expert_bias=aux_free, moe_router_bias_update_rate=moe.bias_update_rate,
        moe_aux_loss_coeff=moe.aux_loss_coeff * aux_loss_scale,
        moe_z_loss_coeff=z_loss, moe_expert_capacity_factor=moe.capacity_factor,
        moe_token_dispatcher_type=moe.token_dispatcher, moe_layer_freq=moe.layer_freq,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size,
        moe_shared_expert_gate=moe.shared_expert_gate, moe_grouped_gemm=moe.grouped_gemm,
        # the router in fp32 whatever the model's precision: routing decisions are discrete
        moe_router_dtype="fp32",
    )


def build_model(recipe: Recipe, tc, *, padded_vocab_size: int,
                spec: str) -> list[torch.nn.Module]:
    """One GPTModel chunk per virtual pipeline stage of this rank (one chunk without VPP).

    With model.rotary_scaling, each chunk's rotary embedding is engine.models.rotary's (every
    type's frequencies equal transformers'), and `tc` gets YaRN's attention factor."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    m = recipe.model
    family = get_family(m.family)
    scaling = m.rotary_scaling
    if scaling is not None:
        from engine.models.rotary import install_rotary_embedding, set_attention_factor

        set_attention_factor(tc, m)
    fused = m.fused_kernels and spec == "local"
    masked = recipe.data.reset_attention_mask and spec == "local"
    model_class, building = GPTModel, contextlib.nullcontext()
    if fused:
        from engine.kernels.modules import FusedLossGPTModel, quiet_mlp_type_warning

        building = quiet_mlp_type_warning()
        if tc.tensor_model_parallel_size == 1:  # vocab-parallel CE (TP > 1) stays megatron's
            model_class = FusedLossGPTModel
    chunks = []
    with building:  # the fused MLP subclass would log megatron's "Unknown MLP type" per layer
        for vp_stage in range(tc.virtual_pipeline_model_parallel_size or 1):
            vp = vp_stage if tc.virtual_pipeline_model_parallel_size else None
            chunks.append(
                model_class(
                    config=tc,
                    transformer_layer_spec=decoder_block_spec(tc, spec, vp, fused=fused,
                                                              masked=masked),
                    vocab_size=padded_vocab_size,
                    max_sequence_length=m.max_position_embeddings,
                    pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
                    post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
                    share_embeddings_and_output_weights=m.share_embeddings_and_output_weights,
                    position_embedding_type=family.position_embedding_type,
                    rotary_percent=m.rotary_percent,
                    rotary_base=m.rotary_base,
                    vp_stage=vp,
                )
            )
            if scaling is not None:
                install_rotary_embedding(chunks[-1], m)
    return chunks
