"""A new vocabulary against its base: which base id moved, and how the base spells each new token.

Owns the two tokenizer questions a vocabulary resize asks (engine.upcycle.commands), and opening
the new tokenizer wherever `engine tokenizer extend` put it (`open_tokenizer`):
- `first_moved(base, new)`: the first base token whose id the extended tokenizer changed (a
  resize keeps the model's rows by id, so a moved id would silently give a token another's row);
- `base_split(base, pieces)`: for each new token's piece, the base ids the *base* tokenizer's own
  model segments it into (fast vocabulary transfer's "subtokens").

The split works on the piece, not on decoded text: a byte-level BPE piece ("Ġslovo", or a partial
UTF-8 sequence that decodes to U+FFFD) is a string over the base's own alphabet, and the base's
BPE model (its merges, no normalizer or pre-tokenizer) applied to it gives exactly the tokens the
base used where the new token now stands. A sentencepiece piece ("▁slovo") is segmented by the
base model with its whitespace marker as a space and no dummy prefix or normalization, so a
word-initial piece keeps its "▁" and a word-internal one gets none. Pieces the base cannot spell
(an added special token) give an empty split. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.data import DataError

SPACE = "\u2581"
"""sentencepiece's whitespace marker."""


@dataclass(frozen=True, slots=True)
class Moved:
    piece: str
    id: int
    """Its id in the base tokenizer."""
    new_id: int | None
    """Its id in the new tokenizer (None: absent)."""

    def line(self) -> str:
        where = "is missing" if self.new_id is None else f"has id {self.new_id}"
        return f"base token {self.piece!r} (id {self.id}) {where} in the new tokenizer"


def open_tokenizer(path) -> tuple[str, object]:
    """(kind, tokenizer) of a tokenizer given as engine tokenizer extend's output directory, a
    tokenizer.json or a sentencepiece .model (one line when there is none)."""
    from pathlib import Path

    from engine.data.extend import _locate
    from engine.data.tokenizer import load_tokenizer

    kind, file = _locate(Path(path), None)
    return kind, load_tokenizer(kind, file)


def first_moved(base, new) -> Moved | None:
    """The base token with the smallest id whose id differs in `new` (tokenizers of
    engine.data.tokenizer), or None when every base id is kept."""
    for piece, token_id in sorted(base.vocab.items(), key=lambda item: item[1]):
        if new.vocab.get(piece) != token_id:
            return Moved(piece, token_id, new.vocab.get(piece))
    return None


def new_pieces(base, new) -> list[str]:
    """The pieces of the ids `new` adds after the base's: ids base.vocab_size..new.vocab_size-1."""
    inverse = new.inv_vocab
    missing = [i for i in range(base.vocab_size, new.vocab_size) if i not in inverse]
    if missing:
        raise DataError(f"{new.path}: no token has id {missing[0]}; the new ids must follow the "
                        f"base's {base.vocab_size} without gaps")
    return [inverse[i] for i in range(base.vocab_size, new.vocab_size)]


def base_split(base, pieces: Sequence[str]) -> list[tuple[int, ...]]:
    """For each piece, the base ids the base tokenizer's model segments it into (module
    docstring); `base` is an engine.data.tokenizer tokenizer."""
    split = _hf_split(base.path) if base.kind == "hf" else _sentencepiece_split(base.path)
    return [split(piece) for piece in pieces]


def _hf_split(path):
    import tokenizers

    model = tokenizers.Tokenizer.from_file(str(path)).model
    unknown = getattr(model, "unk_token", None)

    def split(piece: str) -> tuple[int, ...]:
        try:
            tokens = model.tokenize(piece)
        except Exception:  # noqa: BLE001 - the Rust model raises on text it cannot spell
            return ()
        if unknown is not None and any(t.value == unknown for t in tokens):
            return ()
        return tuple(t.id for t in tokens)

    return split


def _sentencepiece_split(path):
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.ParseFromString(open(path, "rb").read())
    spec = proto.normalizer_spec
    spec.add_dummy_prefix = False
    spec.remove_extra_whitespaces = False
    spec.name = "identity"
    spec.precompiled_charsmap = b""
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    unknown = processor.unk_id()

    def split(piece: str) -> tuple[int, ...]:
        ids = processor.encode(piece.replace(SPACE, " "), out_type=int)
        return () if unknown in ids else tuple(ids)

    return split
