"""The one measure of invariant reports: relative to the logits' scale, over the real
vocabulary, judged against sqrt(eps) of the limiting dtype."""

import pytest
import torch

from engine.models.measure import compare_logits, next_token_loss, rtol


def test_tolerance_keeps_half_the_digits_of_the_dtype():
    assert rtol(torch.float32) == pytest.approx(3.45e-4, rel=1e-2)
    assert rtol(torch.float64) == pytest.approx(1.49e-8, rel=1e-2)
    assert rtol(torch.bfloat16) == pytest.approx(0.088, rel=1e-2)


def test_fp32_rounding_holds_and_a_real_error_fails_by_orders_of_magnitude():
    g = torch.Generator().manual_seed(0)
    reference = torch.randn(2, 64, 100, generator=g, dtype=torch.float64) * 30
    rounded = reference.float()  # what storing in fp32 does
    diff = compare_logits(reference, rounded, vocab_size=100, dtype=torch.float32)
    assert diff.holds and diff.top1 == 1.0 and diff.max_rel < 1e-6
    wrong = reference.clone()
    off = 0.1 * reference.abs().max().item()
    wrong[..., 7] += off  # one token's logit off by 10% of the scale
    bad = compare_logits(reference, wrong, vocab_size=100, dtype=torch.float32)
    assert not bad.holds and bad.max_rel > 100 * bad.rtol
    assert bad.max_abs == pytest.approx(off) and bad.max_rel == pytest.approx(0.1)


def test_padding_rows_are_not_compared_and_chunks_do_not_change_the_figures():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 50, 40, generator=g)
    b = a + 1e-3 * torch.randn(3, 50, 40, generator=g)
    padded_b = torch.cat([b[..., :32], torch.full((3, 50, 8), 1e3)], -1)  # junk beyond 32
    whole = compare_logits(a, padded_b, vocab_size=32, dtype=torch.float32, chunk=1000)
    pieces = compare_logits(a, padded_b, vocab_size=32, dtype=torch.float32, chunk=7)
    assert whole.max_abs < 1e-2 and whole.max_abs == pieces.max_abs
    assert whole.kl == pytest.approx(pieces.kl, rel=1e-12)
    assert whole.mean_abs == pytest.approx(pieces.mean_abs, rel=1e-12)
    assert whole.top1 == pieces.top1


def test_loss_is_cross_entropy_over_the_real_vocabulary():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 9, 12, generator=g)
    labels = torch.randint(0, 10, (2, 9), generator=g)
    expected = torch.nn.functional.cross_entropy(logits[..., :10].reshape(-1, 10).double(),
                                                 labels.reshape(-1))
    assert next_token_loss(logits, labels, vocab_size=10, chunk=4) == pytest.approx(
        expected.item(), rel=1e-12)
