"""The generic conversion driver: a family's weight table applied tensor by tensor (pure).

`to_engine` / `to_hf` are generators: the caller reads one source tensor at a time and writes each
result before the next, so memory stays at one model plus one layer's tensors. Every target is
produced exactly once and every source is consumed exactly once (or is a known dropped buffer);
anything else is a ConvertError naming the tensor. No files, no megatron, no process groups.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from engine.convert import ConvertError
from engine.models.family import Family
from engine.models.weights import Shape, WeightMap, is_moe_layer


def _slots(m: WeightMap, shape: Shape) -> list[dict]:
    """The template arguments of every tensor a map covers: {} once, {i} per layer (of the kind
    the map is for: dense or MoE), {i, e} per layer and expert."""
    if not m.per_layer:
        return [{}]
    model = shape.model
    layers = [i for i in range(model.num_layers) if m.layers == "all" or
              (m.layers == "moe") == is_moe_layer(model, i)]
    if "{e}" not in m.engine:
        return [{"i": i} for i in layers]
    return [{"i": i, "e": e} for i in layers for e in range(model.moe.num_experts)]


def _name(template: str, slot: dict) -> str:
    return template.format(**slot) if slot else template


def _active(family: Family, shape: Shape) -> list[WeightMap]:
    return [m for m in family.weights if m.applies(shape.model)]


def expected_hf_shapes(m: WeightMap, engine_shape: torch.Size, shape: Shape) -> list[tuple]:
    """The HF tensor shapes that produce an engine tensor of `engine_shape` (via a meta tensor)."""
    probe = torch.empty(engine_shape, device="meta")
    return [tuple(t.shape) for t in m.to_hf(probe, shape)]


def to_engine(family: Family, shape: Shape, read: Callable[[str], torch.Tensor],
              hf_keys: Iterable[str], engine_shapes: dict[str, torch.Size]
              ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (engine key, tensor) for every engine tensor, reading HF tensors by name.

    `engine_shapes` are the target model's parameter shapes (padded vocabulary included)."""
    remaining = set(hf_keys)
    dropped = {t.format(i=i) for t in family.dropped for i in range(shape.model.num_layers)}
    remaining -= dropped
    for m in _active(family, shape):
        for slot in _slots(m, shape):
            key = _name(m.engine, slot)
            names = [_name(h, slot) for h in m.hf]
            absent = [n for n in names if n not in remaining]
            if absent:
                raise ConvertError(f"{family.name}: tensor '{absent[0]}' is missing from the HF "
                                   f"checkpoint (needed for '{key}')")
            tensors = [read(n) for n in names]
            if key not in engine_shapes:
                raise ConvertError(f"{family.name}: the engine model has no '{key}'")
            for n, t, want in zip(names, tensors,
                                  expected_hf_shapes(m, engine_shapes[key], shape), strict=True):
                if tuple(t.shape) != want:
                    raise ConvertError(f"{family.name}: '{n}' is {tuple(t.shape)}; expected "
                                       f"{want} from the config")
            remaining.difference_update(names)
            yield key, m.to_engine(*tensors, shape)
    if remaining:
        extra = sorted(remaining)
        raise ConvertError(f"{family.name}: {len(extra)} HF tensor(s) have no engine slot, e.g. "
                           f"'{extra[0]}' (not a {family.name} checkpoint, or an unsupported "
                           "variant)")


def to_hf(family: Family, shape: Shape, read: Callable[[str], torch.Tensor]
          ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF key, tensor) for every HF tensor, reading engine tensors by name."""
    for m in _active(family, shape):
        for slot in _slots(m, shape):
            tensors = m.to_hf(read(_name(m.engine, slot)), shape)
            yield from zip((_name(h, slot) for h in m.hf), tensors, strict=True)


def count_tensors(family: Family, shape: Shape, *, side: str) -> int:
    """How many tensors a conversion writes (for progress bars): side is "hf" or "engine"."""
    return sum(len(_slots(m, shape)) * (len(m.hf) if side == "hf" else 1)
               for m in _active(family, shape))
