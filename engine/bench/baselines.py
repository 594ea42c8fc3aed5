"""What users would run instead of the engine, on the same shape, batch, dtype and threads.

- `run_transformers`: Hugging Face `LlamaForCausalLM` (its default SDPA attention) in a plain
  loop: forward with labels, backward, clip, `torch.optim.AdamW`. bf16 runs under autocast with
  fp32 weights (what the HF Trainer's bf16 mode does).
- `run_megatron`: megatron-core's own `GPTModel` with its local layer spec (torch RMSNorm,
  unfused attention, vocab-parallel cross-entropy) in the same plain loop, without the engine's
  session, DDP wrapper, optimizer wrapper or layers. On CPU it still needs the engine's compat
  layer (megatron-core calls torch.cuda in its RNG and mask code), and a world of one.

Both train on random tokens (`SyntheticDataset`) with the recipe's optimizer settings, and count
FLOPs with the same formula as the engine's row. One process each (no parallel layouts).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from engine.bench.peak import Peak
from engine.bench.profile import profile_step
from engine.bench.row import BenchRow
from engine.bench.train import RunShape, make_row, peak_memory_gib, time_steps
from engine.config.errors import ConfigError
from engine.config.recipe import Recipe
from engine.models.vocab import padded_vocab_size
from engine.train.batches import SyntheticDataset, collate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _check(recipe: Recipe, system: str) -> None:
    m = recipe.model
    if recipe.train.precision not in DTYPES or recipe.train.fp8:
        raise ConfigError(f"engine bench --system {system}: train.precision="
                          f"{recipe.train.precision} (fp8={recipe.train.fp8}); the baselines "
                          "run fp32 or bf16")
    if (m.add_qkv_bias or getattr(m, "window_size", None) or getattr(m, "moe", None)
            or m.rotary_scaling is not None):
        raise ConfigError(f"engine bench --system {system}: the baselines model a plain dense "
                          "Llama (no qkv bias, sliding window, MoE or RoPE scaling)")
    if recipe.parallel.tp * recipe.parallel.pp * recipe.parallel.cp > 1:
        raise ConfigError(f"engine bench --system {system} runs in one process: "
                          "parallel.tp/pp/cp must be 1")


def recipe_padded_vocab_size(recipe: Recipe) -> int:
    """The padded vocabulary (engine.models.vocab) of model.vocab_size, or the recipe
    tokenizer's."""
    vocab = recipe.model.vocab_size
    if vocab is None:
        if recipe.tokenizer.type == "none":
            raise ConfigError("model.vocab_size is required when tokenizer.type is none")
        from engine.data.tokenizer import load_tokenizer

        vocab = load_tokenizer(recipe.tokenizer.type, recipe.tokenizer.path).vocab_size
    return padded_vocab_size(vocab, recipe.model.make_vocab_size_divisible_by, recipe.parallel.tp)


def _batches(recipe: Recipe, vocab: int, steps: int, device):
    """Per step: the list of microbatches (dicts of tensors) of one global batch."""
    train = recipe.train
    micro = train.micro_batch_size
    global_batch = train.global_batch_size or micro
    data = SyntheticDataset(vocab, recipe.data.seq_length, train.seed, steps * global_batch)

    def step_batches(i: int):
        return [{k: v.to(device) for k, v in collate(
            [data[i * global_batch + m * micro + j] for j in range(micro)]).items()}
            for m in range(global_batch // micro)]

    return step_batches, global_batch, micro


def _optimizer(recipe: Recipe, params):
    o = recipe.optim
    return torch.optim.AdamW(params, lr=o.lr, betas=(o.adam_beta1, o.adam_beta2),
                             eps=o.adam_eps, weight_decay=o.weight_decay)


def _loop(recipe, model, loss_of, step_batches, *, steps, warmup, show_profile):
    """(Timing, StepProfile) of a plain PyTorch loop: microbatch losses averaged, backward,
    clipping, AdamW."""
    optimizer = _optimizer(recipe, model.parameters())
    clip = recipe.optim.clip_grad

    def step(batches) -> float:
        total = 0.0
        for batch in batches:
            loss = loss_of(batch) / len(batches)
            loss.backward()
            total += float(loss.detach())
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    timing = time_steps(step_batches, step, steps=steps, warmup=warmup)
    profile = profile_step(lambda: step(step_batches(warmup + steps)))
    if show_profile:
        print(profile.table(), file=sys.stderr)
    return timing, profile


def run_transformers(recipe: Recipe, *, steps: int, warmup: int, peak: Peak,
                     show_profile: bool = False) -> BenchRow:
    from transformers import LlamaConfig, LlamaForCausalLM

    _check(recipe, "transformers")
    m = recipe.model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = recipe_padded_vocab_size(recipe)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        head_dim=m.kv_channels or m.hidden_size // m.num_attention_heads,
        max_position_embeddings=m.max_position_embeddings, rms_norm_eps=m.layernorm_epsilon,
        rope_theta=m.rotary_base, tie_word_embeddings=m.share_embeddings_and_output_weights,
        initializer_range=m.init_method_std, attention_bias=False, mlp_bias=False)
    torch.manual_seed(recipe.train.seed)
    model = LlamaForCausalLM(config).to(device).train()
    step_batches, global_batch, micro = _batches(recipe, vocab, warmup + steps + 1, device)
    dtype = DTYPES[recipe.train.precision]

    def loss_of(batch):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return model(input_ids=batch["tokens"], labels=batch["tokens"]).loss

    timing, profile = _loop(recipe, model, loss_of, step_batches, steps=steps, warmup=warmup,
                            show_profile=show_profile)
    run = RunShape(layout="single process", devices=1, global_batch=global_batch,
                   micro_batch=micro)
    return make_row(recipe, system="transformers", padded_vocab_size=vocab, run=run,
                    timing=timing, profile=profile, peak=peak, memory=peak_memory_gib(),
                    kernels="-")


def _megatron_model(recipe: Recipe, vocab: int, on_cpu: bool):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    m = recipe.model
    dtype = DTYPES[recipe.train.precision]
    config = TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, layernorm_epsilon=m.layernorm_epsilon,
        init_method_std=m.init_method_std, hidden_dropout=0.0, attention_dropout=0.0,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=on_cpu,
        bias_activation_fusion=not on_cpu, masked_softmax_fusion=not on_cpu,
        bias_dropout_fusion=not on_cpu, persist_layer_norm=False,
        gradient_accumulation_fusion=False, apply_rope_fusion=False)
    return GPTModel(
        config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=vocab, max_sequence_length=m.max_position_embeddings,
        position_embedding_type="rope", rotary_base=m.rotary_base,
        share_embeddings_and_output_weights=m.share_embeddings_and_output_weights)


def run_megatron(recipe: Recipe, *, steps: int, warmup: int, peak: Peak,
                 show_profile: bool = False) -> BenchRow:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from engine import compat

    _check(recipe, "megatron-core")
    on_cpu = not torch.cuda.is_available()
    device = torch.device("cpu" if on_cpu else "cuda")
    if on_cpu:
        compat.apply()
    if not dist.is_initialized():
        dist.init_process_group("gloo" if on_cpu else "nccl", store=dist.HashStore(), rank=0,
                                world_size=1)
    ps.initialize_model_parallel()
    try:
        torch.manual_seed(recipe.train.seed)
        model_parallel_cuda_manual_seed(recipe.train.seed)
        vocab = recipe_padded_vocab_size(recipe)
        model = _megatron_model(recipe, vocab, on_cpu).to(device).train()
        step_batches, global_batch, micro = _batches(recipe, vocab, warmup + steps + 1, device)

        def loss_of(batch):
            return model(batch["tokens"], batch["position_ids"], None,
                         labels=batch["labels"]).mean()

        timing, profile = _loop(recipe, model, loss_of, step_batches, steps=steps,
                                warmup=warmup, show_profile=show_profile)
    finally:
        ps.destroy_model_parallel()
    run = RunShape(layout="single process", devices=1, global_batch=global_batch,
                   micro_batch=micro)
    return make_row(recipe, system="megatron-core", padded_vocab_size=vocab, run=run,
                    timing=timing, profile=profile, peak=peak, memory=peak_memory_gib(),
                    kernels="-")
