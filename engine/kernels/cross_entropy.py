"""Output layer + cross-entropy, chunked over tokens so full fp32 logits never exist.

The reference (`linear_cross_entropy`) is what megatron-core computes at tensor-parallel size 1:
logits = hidden @ weight^T in the model's dtype, then a per-token cross-entropy in fp32, holding
[tokens, vocab] logits, their fp32 copy and the softmax for the backward.

`fused_linear_cross_entropy` walks the tokens in chunks (`chunk_rows`): for each chunk one GEMM
gives its logits, `engine::xent_fwd_bwd_` (csrc/) turns them in place into the loss and its
gradient (softmax - onehot) in one fused pass, and two more GEMMs give the chunk's gradients for
the hidden states and the weight, so the backward has nothing left to recompute. Peak extra memory
is one chunk of logits plus a weight-sized gradient buffer (fp32 for 16-bit weights). The backward
scales the saved gradients by the incoming per-token gradient: exactly for the hidden states (one
scale per row), and for the weight by one scalar when every token's gradient is the same (the
usual case: a loss mask of ones), else by one more pass that recomputes each chunk with its
per-token scales.

It needs the whole vocabulary on one rank: megatron's vocab-parallel cross-entropy (TP > 1)
stays as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.kernels.ops import use_kernel

IGNORE_INDEX = -100
CHUNK_BYTES = {"cpu": 256 * 2**20, "cuda": 512 * 2**20}
"""Logits per chunk, in bytes, by device: bounds the chunk's memory while keeping the chunk's
GEMMs large (on an H200, 512 MiB is ~2,000 tokens of a 128k bf16 vocabulary; on CPU 256 MiB is
2,097 tokens of a 32k fp32 vocabulary: at 524-token chunks (64 MiB) the chunk GEMMs ran at 80
instead of 100-120 GFLOP/s on 2 cores, measured by `engine bench train --profile`)."""


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Per-token loss [N] (fp32; fp64 for fp64) of hidden [N, H], weight [V, H], target [N]."""
    logits = hidden @ weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (fp64 for fp64)
    return F.cross_entropy(logits, target, reduction="none", ignore_index=ignore_index)


def chunk_rows(vocab: int, dtype: torch.dtype, budget_bytes: int = 64 * 2**20) -> int:
    """Tokens per chunk so that one chunk of logits fits in `budget_bytes`."""
    return max(1, budget_bytes // (vocab * torch.finfo(dtype).bits // 8))


def _chunks(n: int, rows: int):
    return [(start, min(start + rows, n)) for start in range(0, n, rows)]


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, ignore_index, rows):
        n = hidden.shape[0]
        want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = hidden.new_empty(n, dtype=torch.promote_types(hidden.dtype, torch.float32))
        dh = torch.empty_like(hidden) if want_dh else None
        dw = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                         device=weight.device) if want_dw else None
        for start, end in _chunks(n, rows):
            h = hidden[start:end]
            logits = h @ weight.t()  # [rows, V] in the model's dtype
            if not (want_dh or want_dw):
                loss[start:end] = torch.ops.engine.xent_fwd(logits, target[start:end],
                                                            ignore_index)
                continue
            loss[start:end] = torch.ops.engine.xent_fwd_bwd_(logits, target[start:end], None,
                                                             ignore_index)
            if want_dh:
                torch.mm(logits, weight, out=dh[start:end])
            if want_dw:
                _accumulate(dw, logits.t(), h)
        ctx.ignore_index, ctx.rows = ignore_index, rows
        ctx.save_for_backward(hidden, weight, target, dh, dw)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        hidden, weight, target, dh, dw = ctx.saved_tensors
        g = dloss.to(torch.promote_types(dloss.dtype, torch.float32))
        grad_hidden = grad_weight = None
        if dh is not None:
            grad_hidden = (dh * g[:, None]).to(hidden.dtype)
        if dw is not None:
            if bool((g == g[0]).all()):  # one scale for all (1 under per-token loss): no pass
                grad_weight = (dw if g[0] == 1 else dw * g[0]).to(weight.dtype)
            else:  # per-token scales (a loss mask): recompute the chunks with them
                grad_weight = _weight_grad(hidden, weight, target, g, ctx.ignore_index, ctx.rows)
        return grad_hidden, grad_weight, None, None, None


def _accumulate(dw: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """dw += a @ b, with the product in a's dtype and the sum in dw's (fp32 for 16-bit)."""
    if dw.dtype == a.dtype:
        dw.addmm_(a, b)
    else:
        dw += (a @ b).to(dw.dtype)


def _weight_grad(hidden, weight, target, g, ignore_index, rows):
    dw = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                     device=weight.device)
    for start, end in _chunks(hidden.shape[0], rows):
        h = hidden[start:end]
        logits = h @ weight.t()
        torch.ops.engine.xent_fwd_bwd_(logits, target[start:end], g[start:end], ignore_index)
        _accumulate(dw, logits.t(), h)
    return dw.to(weight.dtype)


def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
    ignore_index: int = IGNORE_INDEX, rows: int | None = None,
) -> torch.Tensor:
    """`linear_cross_entropy`, chunked and fused where the csrc kernel is built for hidden's
    device, else the reference itself. hidden [N, H], weight [V, H], target [N] -> loss [N]."""
    if hidden.dtype != weight.dtype or not use_kernel("xent_fwd_bwd_", hidden.device.type):
        return linear_cross_entropy(hidden, weight, target, ignore_index)
    budget = CHUNK_BYTES.get(hidden.device.type, CHUNK_BYTES["cpu"])
    rows = rows or chunk_rows(weight.shape[0], hidden.dtype, budget)
    return _ChunkedLinearCrossEntropy.apply(
        hidden.contiguous(), weight, target.reshape(-1), ignore_index, rows)
