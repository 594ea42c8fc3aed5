"""The engine as an lm-evaluation-harness model (`--model engine`): an engine checkpoint at any
TP/PP layout, or the model a training run holds, answering lm-eval's three request kinds.

`EngineLM` is a `TemplateLM`, like lm-eval's own `hf` backend: lm-eval turns (context,
continuation) strings into tokens with `tok_encode` (the engine's tokenizer, no special tokens,
as `hf` does by default), an empty context becomes the prefix token (BOS, else EOS), and
`_loglikelihood_tokens` scores them (engine.eval.scoring). `loglikelihood_rolling` cuts a text
into lm-eval's disjoint windows of max_length tokens (`get_rolling_token_windows`); `generate_until`
decodes greedily until a stop sequence, the end-of-text token or `max_gen_toks`.

Under torchrun every rank runs lm-eval the same way (the requests are deterministic) and takes
part in every forward; the answers come from the last pipeline stage, so all ranks agree and rank 0
writes the results. lm-eval's own data parallelism (rank/world_size) stays off: the world is the
model's.
"""

from __future__ import annotations

import logging
import time

from engine.eval.scoring import Scorer

log = logging.getLogger(__name__)

MAX_GEN_TOKS = 256
"""Tokens generated when a task does not say (lm-eval's default)."""

_REGISTERED = False


def register() -> None:
    """Make `EngineLM` lm-eval's model `engine` (idempotent; called by the commands)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from lm_eval.api.registry import register_model

    register_model("engine")(_engine_lm_class())
    _REGISTERED = True


def _engine_lm_class():
    from lm_eval.api.model import TemplateLM
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class EngineLM(TemplateLM):
        """lm-eval's view of a `Scorer` and the tokenizer the model was trained with."""

        backend = "causal"

        def __init__(self, scorer: Scorer, tokenizer, *, max_length: int):
            super().__init__()
            self.scorer, self.engine_tokenizer, self._max_length = scorer, tokenizer, max_length
            self.requests = 0
            self.seconds = 0.0

        # --- tokens -------------------------------------------------------------------------
        @property
        def eot_token_id(self) -> int:
            return self.engine_tokenizer.eod

        @property
        def prefix_token_id(self) -> int:
            bos = self.engine_tokenizer.bos
            return self.eot_token_id if bos is None else bos

        @property
        def max_length(self) -> int:
            return self._max_length

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            return self.engine_tokenizer.encode(string)

        def tok_decode(self, tokens) -> str:
            return self.engine_tokenizer.decode(tokens)

        # --- requests -----------------------------------------------------------------------
        def _timed(self, n: int, fn):
            start = time.perf_counter()
            out = fn()
            self.seconds += time.perf_counter() - start
            self.requests += n
            return out

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            pairs = [(context, continuation) for _, context, continuation in requests]
            scored = self._timed(len(pairs), lambda: self.scorer.loglikelihoods(pairs))
            return [(s.logprob, s.greedy) for s in scored]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            windows, owners = [], []
            for index, (string,) in enumerate(r.args for r in requests):
                for window in map(make_disjoint_window, get_rolling_token_windows(
                        token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length, context_len=1)):
                    windows.append(window)
                    owners.append(index)
            scored = self._timed(len(requests), lambda: self.scorer.loglikelihoods(windows))
            totals = [0.0] * len(requests)
            for owner, s in zip(owners, scored, strict=True):
                totals[owner] += s.logprob
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False):
            eos = self.tok_decode([self.eot_token_id])
            return self._timed(len(requests), lambda: [
                self._generate(context, normalize_gen_kwargs(dict(kwargs), MAX_GEN_TOKS), eos)
                for context, kwargs in (r.args for r in requests)])

        def _generate(self, context: str, kwargs: dict, eos: str) -> str:
            if kwargs.get("do_sample"):
                raise ValueError("engine eval generates greedily; the task asks do_sample=True")
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            budget = kwargs["max_gen_toks"]
            prompt = self.tok_encode(context)[-(self.max_length - budget):]
            generated: list[int] = []
            text = ""
            while len(generated) < budget:
                token = self.scorer.next_tokens([prompt + generated])[0]
                if token == self.eot_token_id:
                    break
                generated.append(token)
                text = self.tok_decode(generated)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            return text

    return EngineLM


def engine_lm(scorer: Scorer, tokenizer, *, max_length: int):
    """An lm-eval model (`register()`ed as `engine`) over `scorer` and `tokenizer`."""
    register()
    from lm_eval.api.registry import get_model

    return get_model("engine")(scorer, tokenizer, max_length=max_length)
