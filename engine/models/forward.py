"""Logits of model chunks at any parallel layout, through megatron-core's pipeline schedule.

Forward only, one microbatch: the schedule passes activations between pipeline stages (and
virtual stages), and the last stage gathers the vocabulary-parallel logits over tensor
parallelism. Used by HF verification at other layouts and by evaluation (engine.eval), which
asks for the logits of a few positions only: the output layer then multiplies just those rows
(a forward pre-hook on megatron's output layer, which sees hidden states [s, b, h]); for a
vocabulary of 49k and hidden 576 that is a fifth of the model's FLOPs per position saved.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def _output_rows(chunks: list[torch.nn.Module], positions: torch.Tensor):
    """While active, the output layer of the chunk that has one computes logits only at
    `positions` [k, 2] = (batch row, sequence position): [k, 1, h] in, [1, k, vocab] out of the
    model. Yields whether it could (not under sequence parallelism, whose output layer gathers
    the sequence from its input first)."""
    layer = next((getattr(c, "output_layer", None) for c in reversed(chunks)
                  if getattr(c, "post_process", False)), None)
    if layer is None or getattr(layer, "sequence_parallel", False):
        yield False
        return
    rows, seq = positions[:, 0], positions[:, 1]

    def pick(module, args, kwargs):
        hidden = args[0]  # [s, b, h]
        return (hidden[seq.to(hidden.device), rows.to(hidden.device)].unsqueeze(1),
                *args[1:]), kwargs

    handle = layer.register_forward_pre_hook(pick, with_kwargs=True)
    try:
        yield True
    finally:
        handle.remove()


def parallel_logits(chunks: list[torch.nn.Module], tokens: torch.Tensor,
                    positions: torch.Tensor | None = None) -> torch.Tensor | None:
    """Logits [b, s, padded vocab] of model chunks at any TP/PP/VPP layout, through megatron's
    pipeline schedule; gathered over tensor parallelism on the last pipeline stage, None on the
    other stages. With `positions` [k, 2] (batch row, sequence position): the logits at those
    positions only, [k, padded vocab]."""
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

    picked = contextlib.nullcontext(False) if positions is None else \
        _output_rows(chunks, positions)
    with torch.no_grad(), picked as selected:
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=[iter([tokens]) for _ in chunks] if len(chunks) > 1 else iter([tokens]),
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=1,
            seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0], forward_only=True,
            collect_non_loss_data=True)
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    logits = outputs[0].float()
    if positions is None:
        return logits
    if selected:
        return logits[0]  # [1, k, vocab]: the rows asked for, in order
    return logits[positions[:, 0], positions[:, 1]]
