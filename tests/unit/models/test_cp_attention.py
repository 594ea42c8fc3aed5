"""The index arithmetic of the context-parallel attention (engine.models.cp_attention), with the
ranks of a CP group simulated in one process (float64): megatron's load-balanced split, the
gather back into sequence order, each rank's rows of causal (and sliding-window) attention, and
the key/value gradients a reduce-scatter of the gathered copies' gradients gives each rank."""

import pytest
import torch

from engine.models.cp_attention import blocked, chunk_order, query_positions, sequence_order


def megatron_split(x: torch.Tensor, rank: int, cp: int) -> torch.Tensor:
    """megatron.core.utils.get_batch_on_this_cp_rank along dim 0: chunks r and 2cp-1-r."""
    chunks = x.view(2 * cp, -1, *x.shape[1:])
    return chunks[[rank, 2 * cp - 1 - rank]].reshape(-1, *x.shape[1:])


def attention(q, k, v, mask):
    """q [sq, h, d], k/v [s, h, d], mask [sq, s] True = masked -> [sq, h, d]."""
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


def test_chunk_order_is_what_the_ranks_hold():
    assert chunk_order(1) == [0, 1]
    assert chunk_order(2) == [0, 3, 1, 2]
    assert chunk_order(3) == [0, 5, 1, 4, 2, 3]


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_split_positions_and_gather_order_invert_each_other(cp):
    seq = 6 * 2 * cp
    x = torch.arange(seq)
    local = [megatron_split(x, r, cp) for r in range(cp)]
    for r in range(cp):
        assert local[r].equal(query_positions(seq // cp, r, cp))
    gathered = torch.cat(local)  # an all-gather concatenates in rank order
    assert gathered[sequence_order(seq, cp)].equal(x)


def test_blocked_is_causal_with_an_optional_window():
    q = torch.tensor([0, 3, 5])
    assert blocked(q, 6).int().tolist() == [[0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1],
                                            [0, 0, 0, 0, 0, 0]]
    # megatron's window (left, right) = (2, 0): the query and two tokens back
    assert blocked(q, 6, (2, 0)).int().tolist() == [[0, 1, 1, 1, 1, 1], [1, 0, 0, 0, 1, 1],
                                                    [1, 1, 1, 0, 0, 0]]


@pytest.mark.parametrize("cp, window", [(2, None), (3, None), (2, (4, 0)), (4, (5, 0))])
def test_each_rank_computes_its_rows_of_full_attention_and_gets_its_gradients(cp, window):
    torch.manual_seed(cp)
    seq, heads, dim = 4 * 2 * cp, 2, 8
    q, k, v = (torch.randn(seq, heads, dim, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    weight = torch.randn(seq, heads, dim, dtype=torch.float64)  # a loss that sees every output
    full = attention(q, k, v, blocked(torch.arange(seq), seq, window))
    (full * weight).sum().backward()

    k_local = [megatron_split(k.detach(), r, cp) for r in range(cp)]
    v_local = [megatron_split(v.detach(), r, cp) for r in range(cp)]
    order = sequence_order(seq, cp)
    k_grads, v_grads = [], []
    for r in range(cp):  # rank r: its queries against the gathered keys and values
        rows = query_positions(seq // cp, r, cp)
        k_all = torch.cat(k_local).requires_grad_()  # this rank's copy of the all-gather
        v_all = torch.cat(v_local).requires_grad_()
        q_r = megatron_split(q.detach(), r, cp).requires_grad_()
        out = attention(q_r, k_all[order], v_all[order], blocked(rows, seq, window))
        assert torch.allclose(out, full[rows], rtol=1e-12, atol=1e-12)
        (out * weight[rows]).sum().backward()
        assert torch.allclose(q_r.grad, q.grad[rows], rtol=1e-12, atol=1e-12)
        k_grads.append(k_all.grad)
        v_grads.append(v_all.grad)
    # the backward of the all-gather: reduce-scatter, each rank gets the sum for its own slice
    local = seq // cp
    for r in range(cp):
        rows = query_positions(local, r, cp)
        mine = slice(r * local, (r + 1) * local)
        assert torch.allclose(sum(g[mine] for g in k_grads), k.grad[rows], rtol=1e-12,
                              atol=1e-12)
        assert torch.allclose(sum(g[mine] for g in v_grads), v.grad[rows], rtol=1e-12,
                              atol=1e-12)
