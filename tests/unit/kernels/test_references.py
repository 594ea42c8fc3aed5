"""What holds of the kernels' PyTorch references and modules whether or not engine/_C is built:
each reference is megatron-core's own arithmetic, and the spec modules keep megatron's
parameter attributes. (The fused-vs-reference tests in the other files need the build.)"""

import torch
import torch.nn.functional as F

from engine.kernels.cross_entropy import chunk_rows
from engine.kernels.rmsnorm import FusedRMSNorm, rms_norm
from engine.kernels.rope import rope
from engine.kernels.swiglu import swiglu


def test_swiglu_reference_is_megatrons_glu():
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(0)) * 4
    gate, up = torch.chunk(x, 2, dim=-1)  # megatron's MLP: activation_func(x_glu) * x_linear
    assert torch.equal(swiglu(x), F.silu(gate) * up)


def test_rope_reference_is_megatrons_rotate_half_rope():
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    g = torch.Generator().manual_seed(0)
    t = torch.randn(11, 2, 3, 16, generator=g)
    inv = 1.0 / (10000 ** (torch.arange(0, 12, 2, dtype=torch.float64) / 12))
    angles = torch.outer(torch.arange(11, dtype=torch.float64), inv)
    freqs = torch.cat((angles, angles), dim=-1)[:, None, None, :].float()  # rotary_percent < 1
    assert torch.equal(rope(t, freqs), _apply_rotary_pos_emb_bshd(t, freqs))


def test_cross_entropy_chunk_rows_bound_the_chunk():
    assert chunk_rows(32000, torch.float32, budget_bytes=64 * 2**20) == 524
    assert chunk_rows(128256, torch.bfloat16, budget_bytes=256 * 2**20) == 1046
    assert chunk_rows(10**9, torch.float32) == 1


def test_norm_module_marks_its_weight_for_sequence_parallel():
    class Config:
        params_dtype = torch.float32
        sequence_parallel = True

    norm = FusedRMSNorm(Config(), hidden_size=8, eps=1e-6)
    assert norm.weight.sequence_parallel
    x = torch.randn(2, 8)
    torch.testing.assert_close(norm(x), rms_norm(x, norm.weight, 1e-6), rtol=2e-6, atol=2e-6)
