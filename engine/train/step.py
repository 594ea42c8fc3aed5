"""One optimizer step and one evaluation pass through megatron-core's pipeline schedules.

Every parallel layout goes through `get_forward_backward_func()`; the loss is a per-token sum
(`calculate_per_token_loss`), so megatron divides gradients by the global token count once and
every layout and microbatch split averages over exactly the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch


def _loss(loss_mask: torch.Tensor, output: torch.Tensor):
    """(sum of token losses, token count, [sum, count] for reporting) of one microbatch."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(output.float().reshape(-1) * mask)
    count = mask.sum()
    return loss_sum, count.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), count])}


def forward_step(data_iterator, model):
    """megatron-core forward_step_func: the model returns per-token losses [b, s] given labels.

    Under context parallelism every rank of a CP group gets the whole microbatch and keeps its
    chunks r and 2*cp-1-r of the sequence (megatron-core's `get_batch_on_this_cp_rank`; the
    document mask keeps those query rows over all keys); its loss is the sum over its own
    tokens, which finalize_model_grads adds up over the data x context-parallel group."""
    from megatron.core.utils import get_batch_on_this_cp_rank

    batch = next(data_iterator)
    device = next(model.parameters()).device
    batch = get_batch_on_this_cp_rank({k: v.to(device, non_blocking=True)
                                       for k, v in batch.items()})
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"])
    return output, partial(_loss, batch["loss_mask"])


def _global_mean_loss(losses: list[dict], device) -> tuple[float, int]:
    """Mean token loss over the global batch, the same on every rank.

    Only last-stage ranks hold losses, and each tensor-parallel rank holds the same ones: those at
    tp rank 0 contribute, the rest add zeros. Context-parallel ranks hold the losses of
    different tokens: all of them contribute."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64, device=device)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0:
        for item in losses:
            total += item["lm loss"].to(torch.float64)
    torch.distributed.all_reduce(total)
    loss_sum, tokens = total.tolist()
    return loss_sum / max(tokens, 1.0), int(tokens)


def _run_schedule(
    chunks, microbatches, *, seq_length: int, micro_batch_size: int, forward_only: bool
):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = [iter(microbatches) for _ in chunks]
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


@dataclass(frozen=True, slots=True)
class StepResult:
    loss: float
    """Mean token loss over the global batch."""
    tokens: int
    """Loss tokens in the global batch."""
    grad_norm: float | None
    """Global gradient norm before clipping; None when the update was skipped (fp16 overflow)."""
    skipped: bool


class NonFiniteError(RuntimeError):
    """A step's loss or gradient norm is NaN/Inf and train.on_nonfinite says stop."""


def _finite(x: float | None) -> bool:
    return x is None or math.isfinite(x)


def train_step(
    chunks, optimizer, microbatches, *, lr: float, seq_length: int, micro_batch_size: int,
    before_update=None, on_nonfinite: str = "stop",
) -> StepResult:
    """One update; `before_update()` runs after the backward and the gradient reduction, before
    `optimizer.step()` (engine.train.freeze's `hold`).

    A NaN/Inf loss (the global mean: every rank decides alike) never reaches the weights: with
    `on_nonfinite` "skip" the update is skipped, with "stop" a NonFiniteError is raised. "skip"
    also checks the gradient norm before the update (one more pass over the gradients); "stop"
    reads the one the update computed and raises after it (nothing is saved afterwards, the last
    checkpoint is the state to go back to)."""
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = _run_schedule(
        chunks,
        microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    loss, tokens = _global_mean_loss(losses, next(chunks[0].parameters()).device)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if before_update is not None:
        before_update()
    if on_nonfinite == "skip":
        norm = None
        if math.isfinite(loss):  # the gradients as the update would see them (its own
            optimizer.prepare_grads()  # first stage: copying to the fp32 main gradients)
            norm = float(optimizer.get_grad_norm())
        if norm is None or not math.isfinite(norm):
            return StepResult(loss=loss, tokens=tokens, grad_norm=norm, skipped=True)
    elif not math.isfinite(loss):
        raise NonFiniteError(f"loss {loss} (train.on_nonfinite=stop; skip instead: "
                             "train.on_nonfinite=skip)")
    ok, grad_norm, _ = optimizer.step()
    grad_norm = None if grad_norm is None else float(grad_norm)
    if on_nonfinite == "stop" and not _finite(grad_norm):
        raise NonFiniteError(f"gradient norm {grad_norm} at loss {loss:.4f} "
                             "(train.on_nonfinite=stop; skip instead: train.on_nonfinite=skip)")
    return StepResult(loss=loss, tokens=tokens, grad_norm=grad_norm, skipped=not ok)


@torch.no_grad()
def eval_loss(
    chunks, batches: list[list[dict]], *, seq_length: int, micro_batch_size: int
) -> float:
    """Mean token loss over `batches` (each a list of this rank's microbatches)."""
    for chunk in chunks:
        chunk.eval()
    total, count = 0.0, 0
    for microbatches in batches:
        losses = _run_schedule(
            chunks,
            microbatches,
            seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            forward_only=True,
        )
        loss, tokens = _global_mean_loss(losses, next(chunks[0].parameters()).device)
        total, count = total + loss * tokens, count + tokens
    for chunk in chunks:
        chunk.train()
    return total / max(count, 1)
