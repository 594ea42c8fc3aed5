"""KL(p_old || p_new) of SmolLM2-135M resized 49,152 -> 53,152 tokens, for each way to start the
new rows, on base-tokenized Czech and English (2 x 512 tokens each): wrote kl-by-init.json.

One float64 forward per text (engine.checkpoint.unsharded.evaluate). The input ids are old ones,
so the hidden states are the old model's, and the output layer is linear: a new token's logit is
u_j . h. For mean and subtoken-mean that is the mean of old logits; in general h is recovered
from the old logits by least squares (the old output rows have full column rank; the residual is
printed, ~1e-12). `zero` is a resize that pads with zero rows. Run from the repository root after
`make language-cpt` (it reads the pipeline's base checkpoint and data/cs/tokenizer-cs4k).
"""

import json
import sys
from dataclasses import replace

import torch

from engine.checkpoint.unsharded import evaluate, read_unsharded
from engine.config.recipe import ValidSet
from engine.data.subtokens import base_split, new_pieces
from engine.data.tokenizer import load_tokenizer
from engine.models.weights import EMBEDDING
from engine.upcycle.invariant import measurement_tokens
from engine.upcycle.vocab import VocabSpec, resize_vocabulary, vocab_shift

TEXTS = {"cs": "data/cs/base/cs-valid", "en": "data/real/shakespeare-valid"}


def main(out: str) -> None:
    src = read_unsharded("runs/language-cpt-smollm2/base/checkpoints")
    base = load_tokenizer("hf", "data/real/smollm2/tokenizer")
    new = load_tokenizer("hf", "data/cs/tokenizer-cs4k")
    pieces = tuple(base_split(base, new_pieces(base, new)))
    n, k = base.vocab_size, new.vocab_size - base.vocab_size
    figures = {}
    for name, prefix in TEXTS.items():
        data = replace(src.recipe.data, valid=(ValidSet(name=name, path=prefix),))
        tokens, _ = measurement_tokens(replace(src.recipe, data=data), samples=2,
                                       seq_length=512, seed=0)
        loss, logits = evaluate(src.recipe, src.state, tokens)
        old = logits[..., :n].reshape(-1, n)
        rows_old = src.state[EMBEDDING][:n].double()  # tied: the output rows
        hidden = torch.linalg.lstsq(rows_old, old.T).solution.T
        res = {"loss": loss, "lstsq_max_resid": (hidden @ rows_old.T - old).abs().max().item()}
        for init in ("mean", "subtoken-mean", "normal", "zero"):
            if init == "zero":
                rows = torch.zeros(k, rows_old.shape[1], dtype=torch.float64)
            else:
                spec = VocabSpec(init=init, pieces=pieces if init == "subtoken-mean" else None)
                state, _ = resize_vocabulary(src.state, src.recipe.model, n + k, spec=spec)
                rows = state[EMBEDDING][n:].double()
            shift = vocab_shift(old, torch.cat([old, hidden @ rows.T], dim=-1), n, n + k)
            res[init] = {**shift, "loss_full_softmax": loss + shift["kl_mean"]}
        figures[name] = res
    with open(out, "w") as f:
        json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "kl-by-init.json")
