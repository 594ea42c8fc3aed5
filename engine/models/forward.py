"""Logits of model chunks at any parallel layout, through megatron-core's pipeline schedule.

Forward only, one microbatch: the schedule passes activations between pipeline stages (and
virtual stages), and the last stage gathers the vocabulary-parallel logits over tensor
parallelism. Used by HF verification at other layouts and by evaluation (engine.eval).
"""

from __future__ import annotations

import torch


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
