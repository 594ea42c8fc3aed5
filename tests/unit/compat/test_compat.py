"""The CPU compat layer: applied only without CUDA, idempotent, and loud when an internal moves."""

import pytest
import torch

from engine import compat
from engine.compat import cpu


def test_self_test_passes_on_the_pinned_megatron_core():
    compat.self_test()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is a no-op with CUDA")
def test_apply_is_idempotent_and_makes_cuda_literals_cpu():
    assert compat.apply() and compat.apply()
    from megatron.core.transformer import utils

    mask = utils.get_default_causal_mask(4)
    assert mask.device.type == "cpu" and mask.tolist()[0] == [False, True, True, True]
    assert torch.cuda.current_device() == torch.device("cpu")


def test_a_rewrite_whose_text_moved_is_refused():
    with pytest.raises(RuntimeError, match="get_grad_norm_fp32 no longer contains"):
        cpu._recompile("megatron.core.optimizer.clip_grads", "get_grad_norm_fp32",
                       cpu._TYPE_NAMES)


def test_self_test_names_a_module_that_no_longer_needs_the_proxy(monkeypatch):
    monkeypatch.setattr(cpu, "CUDA_LITERAL_MODULES", ("megatron.core.jit",))
    with pytest.raises(RuntimeError, match="megatron.core.jit"):
        cpu.self_test()
