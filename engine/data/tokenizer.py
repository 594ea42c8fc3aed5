"""Tokenizers: one `Tokenizer` interface over sentencepiece `.model` files and HF `tokenizer.json`.

Owns loading a tokenizer by kind (`load_tokenizer`), the megatron-core tokenizer interface that
`GPTDataset` reads (`vocab_size`, `eod`, `pad`, `unique_identifiers`), and training a sentencepiece
model (`train_sentencepiece`). Imports megatron-core only for its tokenizer base class; never
torch.distributed, models or training code.

Conventions shared by both kinds, so preprocess and GPTDataset treat them alike:
- `encode(text)` returns content ids only: no BOS/EOS added (preprocess appends `eod` itself).
- `eod` is the end-of-document id: sentencepiece's eos, or the HF tokenizer's eos token.
- `pad` is a pad id distinct from `eod`, or -1 (megatron's "no pad token" value) when the
  tokenizer has none or reuses eos for padding: GPTDataset masks the loss wherever
  labels == pad, so a pad equal to eod would silently drop every end-of-document target.
"""

import hashlib
import json
import logging
import os
import tempfile
from abc import abstractmethod
from collections import OrderedDict
from pathlib import Path

import sentencepiece
from megatron.core.tokenizers import MegatronTokenizerBase

from engine.data import DataError

logger = logging.getLogger(__name__)

KINDS = ("sentencepiece", "hf")
NO_PAD = -1
"""megatron-core's pad id when the tokenizer has none (megatron_dataset._PAD_TOKEN_ID)."""

CONVENTIONAL_EOS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")
"""End-of-text tokens tried, in order, for a bare tokenizer.json without tokenizer_config.json."""


class Tokenizer(MegatronTokenizerBase):
    """A loaded tokenizer; pass it to `preprocess` and `build_datasets`.

    Subclasses megatron-core 0.16.1's `MegatronTokenizerBase`, the type `GPTDatasetConfig.tokenizer`
    declares (the older `megatron.core.datasets.megatron_tokenizer.MegatronLegacyTokenizer` logs a
    deprecation warning at every construction). It also has the legacy interface's properties
    (`inv_vocab`, `eod`, `bos`, `pad`, ...). Pickles as (kind, path), so worker processes reload it.
    """

    kind: str = ""

    def __init__(self, path: Path, data: bytes) -> None:
        """`data` is the file's content, read once by the subclass to load it."""
        super().__init__(str(path), {})
        self._digest = hashlib.sha256(data).hexdigest()
        self._inv_vocab: dict[int, str] | None = None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""

    @abstractmethod
    def decode(self, ids) -> str:
        """Text of `ids` (a list or numpy array of ints)."""

    # megatron-core interface ---------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.encode(text)

    def detokenize(self, ids) -> str:
        return self.decode(ids)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError(f"{self.path}: pretraining tokenizers have no chat template here")

    @property
    def inv_vocab(self) -> dict[int, str]:
        if self._inv_vocab is None:
            self._inv_vocab = {i: piece for piece, i in self.vocab.items()}
        return self._inv_vocab

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What megatron hashes into its dataset cache names: the tokenizer's content, not its path.

        A moved or copied tokenizer file therefore still hits the index cache; a changed one misses.
        """
        return OrderedDict(
            [
                ("class", f"engine.data.tokenizer.{self.kind}"),
                ("sha256", self._digest),
                ("vocab_size", self.vocab_size),
                ("eod", self.eod),
                ("pad", self.pad),
            ]
        )

    def __reduce__(self):
        return load_tokenizer, (self.kind, self.path)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, path={self.path!r}, vocab_size={self.vocab_size})"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model`; eod is its eos piece."""

    kind = "sentencepiece"

    def __init__(self, path: Path) -> None:
        data = path.read_bytes()
        super().__init__(path, data)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except RuntimeError as err:
            raise DataError(f"{path}: not a sentencepiece model ({str(err).strip()})") from None
        if self._sp.eos_id() < 0:
            raise DataError(f"{path}: sentencepiece model has no eos piece; expected one for eod")
        self._vocab = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int | None:
        return self._sp.bos_id() if self._sp.bos_id() >= 0 else None

    @property
    def pad(self) -> int:
        pad = self._sp.pad_id()
        return pad if pad >= 0 and pad != self.eod else NO_PAD


class HFTokenizer(Tokenizer):
    """A Hugging Face fast tokenizer (`tokenizer.json`), run with the `tokenizers` library.

    Special tokens come from `tokenizer_config.json` (or `special_tokens_map.json`) next to the
    file, as transformers' AutoTokenizer reads them; a bare tokenizer.json falls back to the first
    of CONVENTIONAL_EOS it contains. Ids equal AutoTokenizer's with add_special_tokens=False.
    """

    kind = "hf"

    def __init__(self, path: Path) -> None:
        import tokenizers  # the Rust library; transformers is not needed to run a tokenizer.json

        data = path.read_bytes()
        super().__init__(path, data)
        try:
            self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{path}: not a Hugging Face tokenizer.json (not UTF-8)") from None
        except Exception as err:  # noqa: BLE001 - tokenizers raises bare Exception on bad JSON
            raise DataError(f"{path}: not a Hugging Face tokenizer.json ({err})") from None
        self._vocab = self._tok.get_vocab(with_added_tokens=True)
        specials = _read_special_tokens(path.parent)
        eos = specials.get("eos_token") or next(
            (t for t in CONVENTIONAL_EOS if t in self._vocab), None
        )
        if eos is None:
            raise DataError(
                f"{path}: cannot tell the end-of-document token; expected tokenizer_config.json "
                f"with eos_token beside it, or one of {CONVENTIONAL_EOS} in the vocabulary"
            )
        self._eod = self._token_id(path, "eos_token", eos)
        self._bos = self._token_id(path, "bos_token", specials.get("bos_token"))
        pad = self._token_id(path, "pad_token", specials.get("pad_token"))
        self._pad = pad if pad is not None and pad != self._eod else NO_PAD

    def _token_id(self, path: Path, role: str, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise DataError(f"{path}: {role} {token!r} is not in the vocabulary")
        return token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        # Special tokens stay visible as their text, so a decoded sample shows its document breaks.
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def bos(self) -> int | None:
        return self._bos

    @property
    def pad(self) -> int:
        return self._pad


def _read_special_tokens(directory: Path) -> dict[str, str]:
    """`{role: token text}` from tokenizer_config.json, else special_tokens_map.json, else {}."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config_path = directory / name
        if not config_path.is_file():
            continue
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{config_path}: not valid JSON ({err})") from None
        specials = {}
        for role in ("eos_token", "bos_token", "pad_token"):
            value = config.get(role)
            if isinstance(value, dict):  # older files store AddedToken dicts
                value = value.get("content")
            if isinstance(value, str) and value:
                specials[role] = value
        return specials
    return {}


def load_tokenizer(kind: str, path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer: kind "sentencepiece" (a `.model` file, or a directory with tokenizer.model)
    or "hf" (a tokenizer.json file, or a directory containing one)."""
    if kind not in KINDS:
        raise DataError(f"unknown tokenizer kind {kind!r} for {path}; expected one of {KINDS}")
    path = Path(path)
    if not path.exists():
        expected = {
            "sentencepiece": "a sentencepiece .model file",
            "hf": "tokenizer.json or its directory",
        }
        raise DataError(f"{path}: tokenizer not found; expected {expected[kind]}")
    if path.is_dir():
        name = "tokenizer.model" if kind == "sentencepiece" else "tokenizer.json"
        if not (path / name).is_file():
            raise DataError(f"{path}: no {name} in this directory; expected a {kind} tokenizer")
        path = path / name
    return SentencePieceTokenizer(path) if kind == "sentencepiece" else HFTokenizer(path)


def train_sentencepiece(
    inputs: list[str],
    model_prefix: str,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    input_sentence_size: int = 2_000_000,
    num_threads: int = 2,
    json_key: str = "text",
    seed: int = 0,
) -> str:
    """Train a sentencepiece model on `.jsonl`/`.txt` documents; return `<model_prefix>.model`.

    Ids: unk=0, bos=1, eos=2 (the eod), pad=3. Byte fallback on, so no text is ever <unk>.
    Normalization is the identity and whitespace is kept as is (no NFKC, no collapsing of runs of
    spaces), so decode(encode(text)) == text, which code (indentation) needs. Training reads
    lines as sentences: at most `input_sentence_size` of them, sampled with `seed`.
    `.model` and `.vocab` are trained in a temporary directory and renamed into place.
    """
    from engine.data.documents import check_inputs, iter_documents

    if vocab_size < 8:
        raise DataError(f"vocab_size={vocab_size}: expected at least 8 (4 special pieces + text)")
    paths = check_inputs(inputs)
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)

    def sentences():
        for text in iter_documents(paths, json_key):
            for line in text.split("\n"):
                if line.strip():
                    yield line

    sentencepiece.set_random_generator_seed(seed)
    with tempfile.TemporaryDirectory(dir=prefix.parent, prefix=f".{prefix.name}.") as tmp:
        tmp_prefix = os.path.join(tmp, "spm")
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=sentences(),
                model_prefix=tmp_prefix,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                num_threads=num_threads,
                byte_fallback=True,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=3,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True,
                split_digits=True,
                max_sentence_length=1 << 14,
                minloglevel=2,  # sentencepiece logs every trainer step to stderr otherwise
            )
        except RuntimeError as err:
            # e.g. "Vocabulary size is too large" on a tiny corpus: its message says the fix.
            message = str(err).strip()
            raise DataError(f"{model_prefix}: sentencepiece training failed: {message}") from None
        _record_prefix(Path(tmp_prefix + ".model"), prefix.name)
        # .model last: its presence is what says "a complete tokenizer is here".
        os.replace(tmp_prefix + ".vocab", f"{prefix}.vocab")
        os.replace(tmp_prefix + ".model", f"{prefix}.model")
    logger.info(
        "trained sentencepiece %s vocab_size=%d -> %s.model", model_type, vocab_size, prefix
    )
    return f"{prefix}.model"


def _record_prefix(model: Path, name: str) -> None:
    """Store `name` as the model's trainer_spec.model_prefix in place of the temporary path, so
    the same inputs and settings give a byte-identical `.model` wherever it is trained."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.read_bytes())
    proto.trainer_spec.model_prefix = name
    model.write_bytes(proto.SerializeToString())
