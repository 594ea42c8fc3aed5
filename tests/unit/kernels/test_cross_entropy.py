"""The chunked fused linear cross-entropy against the reference (full logits, fp32 loss)."""

import pytest
import torch

from engine.kernels.cross_entropy import (
    IGNORE_INDEX,
    fused_linear_cross_entropy,
    linear_cross_entropy,
)

pytestmark = pytest.mark.usefixtures("built")


def _inputs(n, hidden, vocab, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).to(device, dtype)
    target = torch.randint(0, vocab, (n,), generator=g).to(device)
    return h, w, target


def _both(h, w, target, cotangent, rows):
    out = []
    for fn in (lambda a, b: fused_linear_cross_entropy(a, b, target, rows=rows),
               lambda a, b: linear_cross_entropy(a, b, target)):
        a, b = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(a, b)
        out.append((loss, *torch.autograd.grad(loss, (a, b), cotangent)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 64, 1000])  # one token, uneven chunks, one chunk
def test_uniform_gradient_matches_the_reference(dtype, rows, device, close):
    h, w, target = _inputs(37, 24, 301, dtype, device=device)
    cot = torch.full((37,), 1 / 37, device=device)  # a mean: every token gets the same gradient
    (loss, dh, dw), (loss_ref, dh_ref, dw_ref) = _both(h, w, target, cot, rows)
    assert loss.dtype == torch.float32 and dh.dtype == dw.dtype == dtype
    close(loss, loss_ref, torch.float32, scale=4)
    close(dh, dh_ref, dtype, scale=2)
    close(dw, dw_ref, dtype, scale=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_tokens_and_ignore_index(dtype, device, close):
    """A loss mask gives per-token gradients (the recompute path); ignored targets get 0."""
    h, w, target = _inputs(29, 16, 130, dtype, device=device)
    target[[2, 11]] = IGNORE_INDEX
    mask = (torch.arange(29, device=device) % 3 != 0).float()
    (loss, dh, dw), (loss_ref, dh_ref, dw_ref) = _both(h, w, target, mask, rows=8)
    assert loss[2] == 0 and loss[11] == 0
    assert torch.all(dh[2] == 0) and torch.all(dh[3] == 0)  # ignored / masked rows
    close(loss, loss_ref, torch.float32, scale=4)
    close(dh, dh_ref, dtype, scale=2)
    close(dw, dw_ref, dtype, scale=2)


def test_no_grad_forward_matches():
    h, w, target = _inputs(50, 16, 200, torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(fused_linear_cross_entropy(h, w, target, rows=16),
                                   linear_cross_entropy(h, w, target), rtol=1e-6, atol=1e-6)


def test_extreme_logits_stay_finite():
    h, w, target = _inputs(6, 8, 50, torch.float32)
    loss = fused_linear_cross_entropy(h * 1e3, w, target)
    torch.testing.assert_close(loss, linear_cross_entropy(h * 1e3, w, target), rtol=1e-5,
                               atol=1e-2)
    assert torch.isfinite(loss).all()


def test_gradcheck_float64(device):
    h, w, target = _inputs(9, 5, 17, torch.float64, device=device)
    fn = lambda a, b: fused_linear_cross_entropy(a, b, target, rows=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h.requires_grad_(), w.requires_grad_()))


def test_out_of_range_target_is_refused():
    h, w, target = _inputs(4, 8, 10, torch.float32)
    target[1] = 10
    with pytest.raises(RuntimeError, match=r"targets must be in \[0, 10\)"):
        fused_linear_cross_entropy(h, w, target)
