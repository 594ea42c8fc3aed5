"""RMSNorm for the local (non-Transformer-Engine) layer spec.

megatron-core's local spec uses `torch.nn.RMSNorm`, which refuses sequence parallelism: under
SP each tensor-parallel rank normalizes its own slice of the sequence, so the weight gradient is
partial and must be all-reduced over the TP group. megatron-core does that for every parameter
marked `sequence_parallel=True`; this module marks its weight. The arithmetic follows HF's
`LlamaRMSNorm` (normalize in fp32, cast back, then scale) so converted models match bit for bit.
"""

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * x / sqrt(mean(x^2) + eps), the statistic computed in fp32."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class RMSNorm(torch.nn.Module):
    """Spec module: built by megatron-core as `RMSNorm(config=..., hidden_size=..., eps=...)`."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
