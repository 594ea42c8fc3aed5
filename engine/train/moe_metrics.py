"""Per-layer mixture-of-experts metrics: token share of each expert, load-balancing loss, z-loss,
the aux-loss-free expert bias (model.moe.load_balancing=aux_free), and a router-collapse warning.

Token counts come from a forward hook on every router (its routing map says which experts each
token went to); the auxiliary losses from megatron-core's layer-wise tracker, which the routers
fill during training. Both are summed over all ranks at each log step; an expert's share is its
count over the layer's total, so tokens seen twice (tensor-parallel ranks without sequence
parallelism) cancel out.

Collapse (cf. Fedus et al. 2022, Switch Transformer §2.2): an expert that receives fewer than
1/(4E) of a layer's tokens for K consecutive log intervals is reported once per streak.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


def collapse_threshold(num_experts: int) -> float:
    """The share of a layer's tokens under which an expert counts as collapsed: 1/(4E)."""
    return 1.0 / (4 * num_experts)


@dataclass
class MoEReport:
    token_share: torch.Tensor
    """[moe layers, experts]: fraction of routed tokens per expert, each row summing to 1."""
    layers: list[int]
    """Global layer numbers (1-based, megatron's) of the rows."""
    load_balancing_loss: dict[int, float] = field(default_factory=dict)
    z_loss: dict[int, float] = field(default_factory=dict)
    collapsed: list[tuple[int, int, float]] = field(default_factory=list)
    """(layer, expert, share) newly collapsed at this report."""
    expert_bias: torch.Tensor | None = None
    """[moe layers, experts]: the routers' aux-loss-free bias (load_balancing=aux_free)."""

    def scalars(self) -> dict[str, float]:
        out = {}
        for row, layer in enumerate(self.layers):
            for e, share in enumerate(self.token_share[row].tolist()):
                out[f"moe/layer{layer}/expert{e}/token_share"] = share
            if self.expert_bias is not None:
                for e, bias in enumerate(self.expert_bias[row].tolist()):
                    out[f"moe/layer{layer}/expert{e}/bias"] = bias
            for name, values in (("load_balancing_loss", self.load_balancing_loss),
                                 ("z_loss", self.z_loss)):
                if layer in values:
                    out[f"moe/layer{layer}/{name}"] = values[layer]
        if self.load_balancing_loss:
            out["moe/load_balancing_loss"] = sum(self.load_balancing_loss.values()) / len(
                self.load_balancing_loss)
        if self.z_loss:
            out["moe/z_loss"] = sum(self.z_loss.values()) / len(self.z_loss)
        return out

    def line(self) -> str:
        low = self.token_share.min(dim=1)
        worst = int(low.values.argmin())
        parts = [f"moe | min expert share {low.values[worst]:.3f} (layer {self.layers[worst]}, "
                 f"expert {int(low.indices[worst])})"]
        if self.load_balancing_loss:
            parts.append(f"lb_loss {self.scalars()['moe/load_balancing_loss']:.4f}")
        if self.z_loss:
            parts.append(f"z_loss {self.scalars()['moe/z_loss']:.4f}")
        if self.expert_bias is not None:
            low, high = self.expert_bias.min().item(), self.expert_bias.max().item()
            parts.append(f"expert bias {low:+.4f}..{high:+.4f}")
        return " | ".join(parts)


class MoEMonitor:
    """Hooks the routers of `models` (bare GPTModel chunks) and reports at each log step."""

    def __init__(self, models, *, num_layers: int, num_experts: int, collapse_intervals: int,
                 aux_loss_scale: int = 1):
        """`aux_loss_scale`: engine.models.build.moe_aux_loss_scale; the logged load-balancing
        losses are multiplied by it (z-loss is logged as a per-token mean, which it leaves)."""
        from megatron.core.transformer.moe.router import TopKRouter

        self.num_layers, self.num_experts, self.k = num_layers, num_experts, collapse_intervals
        self.lb_scale = aux_loss_scale
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        self.streak = torch.zeros(num_layers, num_experts, dtype=torch.long)
        self.handles, self.biased = [], []
        for model in models:
            for module in model.modules():
                if isinstance(module, TopKRouter):
                    self.handles.append(module.register_forward_hook(self._count))
                    if getattr(module, "expert_bias", None) is not None:
                        self.biased.append(module)

    def _count(self, router, inputs, output) -> None:
        if router.training and router.layer_number is not None:
            routing_map = output[1]
            self.counts[router.layer_number - 1] += routing_map.detach().sum(0).double().cpu()

    def report(self, *, microbatches: int) -> MoEReport:
        """Reduce over ranks, reset, and update collapse streaks. Call on every rank."""
        import torch.distributed as dist
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker,
            get_moe_layer_wise_logging_tracker,
        )

        counts = self.counts.clone()
        tracker = get_moe_layer_wise_logging_tracker()
        names = [n for n in ("load_balancing_loss", "z_loss") if n in tracker]
        losses = torch.stack([tracker[n]["values"].double().cpu() for n in names]) if names \
            else torch.zeros(0, self.num_layers, dtype=torch.float64)
        holders = (counts.sum(1) > 0).double()  # ranks holding each layer (pipeline stages)
        # The expert bias: the same on every rank holding a layer (megatron updates it from the
        # all-reduced counts), so the sum over ranks over the number of holders.
        bias = torch.zeros_like(counts)
        for router in self.biased:
            bias[router.layer_number - 1] += router.expert_bias.detach().double().cpu()
        flat = torch.cat([counts.flatten(), losses.flatten(), holders, bias.flatten()])
        dist.all_reduce(flat)
        n, m = counts.numel(), losses.numel()
        counts = flat[:n].view_as(counts)
        losses = flat[n:n + m].view_as(losses)
        holders = flat[n + m:n + m + self.num_layers]
        bias = flat[n + m + self.num_layers:].view_as(counts)
        self.counts.zero_()
        clear_aux_losses_tracker()

        rows = [i for i in range(self.num_layers) if counts[i].sum() > 0]
        share = counts[rows] / counts[rows].sum(1, keepdim=True)
        report = MoEReport(token_share=share.float(), layers=[i + 1 for i in rows])
        if self.biased:
            report.expert_bias = (bias[rows] / holders[rows].unsqueeze(1)).float()
        for j, name in enumerate(names):
            target = getattr(report, name)
            scale = self.lb_scale if name == "load_balancing_loss" else 1
            for i in rows:  # mean over the ranks holding the layer, per microbatch
                target[i + 1] = (losses[j, i] * scale / holders[i] / microbatches).item()
        threshold = collapse_threshold(self.num_experts)
        low = torch.zeros_like(self.streak, dtype=torch.bool)
        low[rows] = share < threshold
        self.streak = torch.where(low, self.streak + 1, torch.zeros_like(self.streak))
        for i, e in (self.streak == self.k).nonzero().tolist():
            report.collapsed.append((i + 1, e, share[rows.index(i), e].item()))
            log.warning("router collapse: layer %d expert %d received %.4f of the tokens "
                        "(< 1/(4E) = %.4f) for %d consecutive log intervals",
                        i + 1, e, share[rows.index(i), e].item(), threshold, self.k)
        return report

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
