"""`engine convert verify`: the same tokens through transformers and through the engine; how far
apart are the logits? Max/mean absolute difference, KL(HF || engine) per token, top-1 agreement.

Compared over the real vocabulary (the engine's padded rows are not tokens). Random token ids
from a fixed seed; sequences of 256 tokens by default, because a wrong RoPE layout barely shows
at short lengths.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from engine.convert import ConvertError
from engine.convert.engine_model import checkpoint_vocab, engine_model
from engine.convert.exporter import load_checkpoint_recipe


@dataclass(frozen=True, slots=True)
class LogitDiff:
    max_abs: float
    mean_abs: float
    kl: float
    """Mean over tokens of KL(HF || engine), in nats."""
    top1: float
    """Fraction of positions where both pick the same most likely token."""

    def line(self) -> str:
        return (f"max_abs {self.max_abs:.3e} | mean_abs {self.mean_abs:.3e} | "
                f"kl {self.kl:.3e} | top1 {self.top1:.4f}")


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor) -> LogitDiff:
    """Both [batch, seq, vocab] over the same vocabulary, compared in fp64."""
    ref, cand = reference.double(), candidate.double()
    diff = (ref - cand).abs()
    log_p, log_q = ref.log_softmax(-1), cand.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    top1 = (ref.argmax(-1) == cand.argmax(-1)).double().mean()
    return LogitDiff(diff.max().item(), diff.mean().item(), kl.item(), top1.item())


def random_tokens(vocab_size: int, *, batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def engine_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, padded vocab] of an unsharded (TP=PP=1) engine model."""
    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, position_ids, None).float()


def parallel_logits(chunks: list[torch.nn.Module], tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits [b, s, padded vocab] of model chunks at any TP/PP/VPP layout, through megatron's
    pipeline schedule; gathered over tensor parallelism on the last pipeline stage, None on the
    other stages."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    position_ids = torch.arange(tokens.shape[1]).expand_as(tokens)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch, position_ids, None)

        def collect(output, non_loss_data=False):
            return gather_from_tensor_model_parallel_region(output)
        return output, collect

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter([tokens]) for _ in chunks] if len(chunks) > 1 else iter([tokens]),
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1,
            seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
            collect_non_loss_data=True)
    return outputs[0].float() if ps.is_pipeline_last_stage(ignore_virtual=True) else None


def hf_logits(hf_dir: str | os.PathLike, tokens: torch.Tensor) -> torch.Tensor:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ConvertError("verify needs transformers: pip install '.[hf]'") from None
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(tokens).logits.float()


def verify(hf_dir: str | os.PathLike, ckpt: str | os.PathLike, *, seq: int = 256,
           batch: int = 2, seed: int = 0) -> LogitDiff:
    ckpt_dir, recipe = load_checkpoint_recipe(ckpt)
    vocab = recipe.model.vocab_size
    tokens = random_tokens(vocab, batch=batch, seq=seq, seed=seed)
    reference = hf_logits(hf_dir, tokens)
    from engine.checkpoint import load_weights

    with engine_model(recipe, vocab_size=checkpoint_vocab(ckpt_dir, recipe)) as model:
        load_weights(ckpt_dir, [model])
        ours = engine_logits(model, tokens)
    return compare_logits(reference, ours[..., :vocab])

