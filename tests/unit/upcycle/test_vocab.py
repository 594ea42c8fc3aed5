"""Vocabulary resize math (pure): old rows kept, new rows per init, the KL bound of `mean`
(Hewitt 2021) on logits. The model-level invariants: tests/integration/test_upcycle_vocab.py."""

import math

import pytest
import torch

from engine.config.recipe import ModelConfig
from engine.models.weights import EMBEDDING, OUTPUT
from engine.upcycle import UpcycleError
from engine.upcycle.vocab import VocabSpec, kl_bound, new_rows, resize_vocabulary, vocab_shift

N, H, PADDED = 10, 6, 16


def model(tied: bool) -> ModelConfig:
    return ModelConfig(num_layers=1, hidden_size=H, ffn_hidden_size=8, num_attention_heads=2,
                       vocab_size=N, share_embeddings_and_output_weights=tied)


def state(tied: bool, seed: int = 0) -> dict:
    """Vocabulary tensors with PADDED rows (zero padding), as a checkpoint holds them."""
    gen = torch.Generator().manual_seed(seed)
    out = {"decoder.final_layernorm.weight": torch.rand(H, generator=gen)}
    for name in (EMBEDDING,) if tied else (EMBEDDING, OUTPUT):
        rows = torch.zeros(PADDED, H)
        rows[:N] = torch.randn(N, H, generator=gen) + 0.5
        out[name] = rows
    return out


@pytest.mark.parametrize("init", ["subtoken-mean", "mean", "normal"])
@pytest.mark.parametrize("tied", [True, False])
def test_old_rows_kept_bit_for_bit_and_k_rows_appended(init, tied):
    pieces = ((1, 2), (3,), ()) if init == "subtoken-mean" else None
    src = state(tied)
    out, record = resize_vocabulary(src, model(tied), N + 3,
                                    spec=VocabSpec(init=init, pieces=pieces, seed=5))
    names = [EMBEDDING] if tied else [EMBEDDING, OUTPUT]
    assert record["tensors"] == names and record["added"] == 3 and record["tied"] is tied
    assert (OUTPUT in out) is not tied  # tied stays tied: no output tensor appears
    for name in names:
        assert out[name].shape == (N + 3, H)  # unpadded: the writer pads for its layout
        assert torch.equal(out[name][:N], src[name][:N])
    assert torch.equal(out["decoder.final_layernorm.weight"], src["decoder.final_layernorm.weight"])


def test_mean_rows_are_the_mean_of_the_old_rows_not_of_the_padding():
    src = state(tied=False)
    out, _ = resize_vocabulary(src, model(False), N + 2, spec=VocabSpec(init="mean"))
    for name in (EMBEDDING, OUTPUT):
        expected = src[name][:N].double().mean(0).float()
        assert torch.equal(out[name][N], expected) and torch.equal(out[name][N + 1], expected)


def test_subtoken_mean_averages_the_base_split_and_falls_back_to_the_mean():
    src = state(tied=False)
    pieces = ((1, 2, 2), (7,), ())
    out, record = resize_vocabulary(src, model(False), N + 3,
                                    spec=VocabSpec(init="subtoken-mean", pieces=pieces))
    for name in (EMBEDDING, OUTPUT):  # untied: input and output rows from their own tensors
        rows = src[name].double()
        assert torch.allclose(out[name][N].double(), (rows[1] + 2 * rows[2]) / 3, atol=1e-7)
        assert torch.equal(out[name][N + 1], src[name][7])
        assert torch.allclose(out[name][N + 2].double(), rows[:N].mean(0), atol=1e-7)
    assert record["subtokens"] == {"mean_pieces": 4 / 3, "max_pieces": 3, "without_pieces": 1}


def test_normal_rows_have_the_old_rows_std_and_follow_the_seed():
    old = torch.randn(4000, 32, dtype=torch.float64) * 0.3 + 1.0
    a = new_rows(old, 2000, VocabSpec(init="normal"), torch.Generator().manual_seed(1))
    b = new_rows(old, 2000, VocabSpec(init="normal"), torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert a.mean().item() == pytest.approx(0.0, abs=0.01)
    assert a.std().item() == pytest.approx(old.std().item(), rel=0.02)


@pytest.mark.parametrize("vocab, spec, match", [
    (N, VocabSpec(init="mean"), "not more than the model's 10"),
    (N + 2, VocabSpec(init="zeros"), "--init zeros: expected one of"),
    (N + 2, VocabSpec(init="subtoken-mean", pieces=((1,),)), "base split of 2 new tokens, got 1"),
    (N + 1, VocabSpec(init="subtoken-mean", pieces=((1, 12),)), "new token 10 splits into base "
                                                                  "id 12, outside"),
])
def test_bad_input_is_one_line(vocab, spec, match):
    with pytest.raises(UpcycleError, match=match) as err:
        resize_vocabulary(state(True), model(True), vocab, spec=spec)
    assert "\n" not in str(err.value)


def _with_new_logits(old: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    return torch.cat([old, new_logits], dim=-1)


@pytest.mark.parametrize("scale", [0.01, 1.0, 10.0, 40.0])
def test_mean_output_rows_keep_kl_below_log_1_plus_k_over_n(scale):
    """Output rows at the mean row give every new token the mean of the old logits (linearity),
    so by Jensen KL(p_old || p_new) <= log(1 + k/n) at every position, whatever the logits."""
    gen = torch.Generator().manual_seed(0)
    n, k = 50, 20
    hidden = torch.randn(30, H, dtype=torch.float64, generator=gen)
    rows = torch.randn(n, H, dtype=torch.float64, generator=gen) * scale
    old = hidden @ rows.T
    new = _with_new_logits(old, (hidden @ rows.mean(0)).unsqueeze(-1).expand(-1, k))
    shift = vocab_shift(old, new, n, n + k)
    assert shift["max_abs_old_logit_change"] == 0.0
    assert shift["kl_max"] <= shift["kl_bound"] == kl_bound(n, k) == math.log1p(k / n)
    # the KL is log(Z_new / Z_old) at each position: the loss increase on old tokens
    expected = (torch.logsumexp(new, -1) - torch.logsumexp(old, -1)).mean().item()
    assert shift["kl_mean"] == pytest.approx(expected, rel=1e-12)
    assert shift["new_mass_mean"] == pytest.approx(
        (1 - torch.exp(-(torch.logsumexp(new, -1) - torch.logsumexp(old, -1)))).mean().item())


def test_the_bound_is_tight_when_the_old_logits_are_equal():
    old = torch.zeros(4, 8, dtype=torch.float64)
    new = torch.zeros(4, 12, dtype=torch.float64)
    shift = vocab_shift(old, new, 8, 12)
    assert shift["kl_mean"] == pytest.approx(math.log1p(4 / 8), rel=1e-12)


def test_padding_entries_are_ignored():
    old = torch.randn(3, 16, dtype=torch.float64)
    new = torch.cat([old[:, :10], torch.zeros(3, 2, dtype=torch.float64),
                     torch.full((3, 4), 1e3, dtype=torch.float64)], dim=-1)  # huge padding logits
    shift = vocab_shift(old, new, 10, 12)
    assert shift["max_abs_old_logit_change"] == 0.0
    expected = (torch.logsumexp(new[:, :12], -1) - torch.logsumexp(old[:, :10], -1)).mean()
    assert shift["kl_mean"] == pytest.approx(expected.item(), rel=1e-12)  # no 1e3 counted
