"""train.freeze's step hook (engine.train.freeze.hold) on stand-ins for megatron's DDP chunks and
optimizer groups: which groups get lr and weight decay 0, which gradients are zeroed, where a
tensor-parallel shard's old rows are. The exactness under megatron's optimizers is tested in
tests/integration/test_freeze.py and tests/dist/test_freeze_parallel.py."""

import pytest
import torch

from engine.config.freeze import FreezeConfig
from engine.train.freeze import hold


def chunk():
    """A module whose `embedding` is marked as megatron marks it, with DDP-style main_grad."""
    module = torch.nn.Module()
    module.embedding = torch.nn.Parameter(torch.zeros(6, 2))
    module.embedding.is_embedding_or_output_parameter = True
    module.layer = torch.nn.Parameter(torch.zeros(2, 2))
    for p in module.parameters():
        p.main_grad = torch.ones_like(p)
    return module


class Optimizer:
    def __init__(self):
        self.param_groups = [{"is_decoupled_lr": False, "lr": 9.0, "weight_decay": 9.0},
                             {"is_decoupled_lr": True, "lr": 9.0, "weight_decay": 9.0}]


def groups(optimizer):
    return [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


def test_frozen_steps_zero_the_body_and_set_its_lr_and_decay_to_zero():
    c, opt = chunk(), Optimizer()
    hold([c], opt, FreezeConfig(steps=3), step=2, lr=0.1, weight_decay=0.01)
    assert groups(opt) == [(0.0, 0.0), (0.1, 0.01)]
    assert torch.all(c.layer.main_grad == 0) and torch.all(c.embedding.main_grad == 1)


def test_after_the_phase_every_group_trains_and_nothing_is_zeroed():
    c, opt = chunk(), Optimizer()
    hold([c], opt, FreezeConfig(steps=3), step=3, lr=0.1, weight_decay=0.01)
    assert groups(opt) == [(0.1, 0.01), (0.1, 0.01)]
    assert all(torch.all(p.main_grad == 1) for p in c.parameters())


@pytest.mark.parametrize("tp_rank, zeroed", [(0, 6), (1, 4), (2, 0)])
def test_new_rows_zeroes_the_old_rows_of_this_ranks_shard(tp_rank, zeroed):
    """Rows 0..9 old, 10.. new; a shard of 6 rows on rank r holds ids 6r..6r+5."""
    c, opt = chunk(), Optimizer()
    freeze = FreezeConfig(steps=1, train="new_rows", new_rows_from=10)
    hold([c], opt, freeze, step=0, lr=0.1, weight_decay=0.01, tp_rank=tp_rank)
    assert groups(opt) == [(0.0, 0.0), (0.1, 0.0)]  # no decay on the vocabulary either
    rows = c.embedding.main_grad[:, 0]
    assert torch.all(rows[:zeroed] == 0) and torch.all(rows[zeroed:] == 1)
