"""The measured function preservation of an upcycled model: source and target on the same tokens.

Both models run in float64 on their stored weights (engine.checkpoint.unsharded.evaluate), so the
arithmetic of the forward adds no noise worth the name; what remains is the rounding of the
weights to their storage dtype, and the logits are judged by engine.models.measure's rule at that
dtype (fp32: max relative difference <= 3.5e-4; a correct growth of SmolLM2-135M measures about
1e-6, a wrong one 1e-1 and more). Tokens: the recipe's validation data when its files are here,
else random ids; 2 x 512 by default.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy
import torch

from engine.checkpoint.unsharded import UnshardedModel, evaluate
from engine.config.recipe import Recipe
from engine.models.measure import compare_logits

log = logging.getLogger(__name__)


def measurement_tokens(recipe: Recipe, *, samples: int, seq_length: int,
                       seed: int) -> tuple[torch.Tensor, dict]:
    """(tokens [n, L + 1], where they came from), L = min(seq_length, data.seq_length): the
    first tokens of the recipe's first validation set (else its first training set) when its
    files are here, else `samples` rows of random ids in [0, model.vocab_size) from `seed`."""
    seq = min(seq_length, recipe.data.seq_length)
    sets = [(f"data.valid.{v.name}", v.path) for v in recipe.data.valid] + \
        [(f"data.blend[{i}]", b.path) for i, b in enumerate(recipe.data.blend)]
    if not recipe.data.synthetic:
        for name, prefix in sets:
            if Path(f"{prefix}.bin").is_file() and Path(f"{prefix}.idx").is_file():
                from engine.data.datasets import inspect_indexed_dataset

                info = inspect_indexed_dataset(prefix)
                count = min(samples, info.tokens // (seq + 1))
                if count == 0:
                    continue
                data = numpy.memmap(f"{prefix}.bin", dtype=info.dtype, mode="r")
                tokens = torch.from_numpy(data[: count * (seq + 1)].astype(numpy.int64))
                return tokens.view(count, seq + 1), {"source": name, "path": prefix,
                                                     "samples": count, "seq_length": seq}
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, recipe.model.vocab_size, (samples, seq + 1), generator=generator)
    return tokens, {"source": "random", "seed": seed, "samples": samples, "seq_length": seq}


def storage_dtype(*models: UnshardedModel) -> torch.dtype:
    """The least precise dtype the models' weights are stored in."""
    dtypes = {t.dtype for m in models for t in m.state.values() if t.is_floating_point()}
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def measure_invariant(source: UnshardedModel, target: UnshardedModel, tokens: torch.Tensor,
                      where: dict, *, expected_exact: bool) -> dict:
    """Loss and logits of `source` and `target` on `tokens` [b, s+1]; `holds` is the verdict
    when the method is exact by construction (`expected_exact`), else None (measured, not
    judged)."""
    log.info("measuring on %d x %d tokens (%s), float64", tokens.shape[0], tokens.shape[1] - 1,
             where["source"])
    loss_source, logits_source = evaluate(source.recipe, source.state, tokens)
    loss_target, logits_target = evaluate(target.recipe, target.state, tokens)
    diff = compare_logits(logits_source, logits_target, vocab_size=source.recipe.model.vocab_size,
                          dtype=storage_dtype(source, target))
    return {"tokens": where, "loss_source": loss_source, "loss_target": loss_target,
            "loss_change": loss_target - loss_source, **diff.to_dict(),
            "expected_exact": expected_exact, "holds": diff.holds if expected_exact else None}
