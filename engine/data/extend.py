"""Vocabulary extension: `engine tokenizer extend` adds N domain tokens to a base tokenizer.

Owns growing a sentencepiece `.model` or an HF BPE `tokenizer.json` with tokens learned on domain
text, checking the result, and measuring what it bought (tokens per character before and after).
Base ids never move: new tokens take the ids after every existing one (added/special tokens
included), so a model resized for the new vocabulary keeps its rows for the old one.

- sentencepiece: a domain model is trained with the base's settings on base-normalized text; its
  NORMAL pieces the base lacks are appended with scores below the base's lowest (characters the
  base lacks first, then merged pieces in the domain model's order), so base merges still win
  and the new pieces merge afterwards. Where base merges split a word otherwise, a domain piece
  can never form: such pieces are found (`dead_pieces`) and replaced by the domain model's next
  ones, a few rounds. Normalizer, byte-fallback pieces and special ids are kept.
- HF BPE: BPE training continues on the base's own segmentation of the domain words (its
  normalizer and pre-tokenizer, then its merges): the most frequent adjacent pair of tokens
  becomes a new vocabulary entry *and* a merge ranked after every base merge, N times. Because
  the tokenizer applies merges by rank, it reproduces this segmentation: no `added_tokens`,
  which bypass pre-tokenization and are often unreachable.

What holds afterwards (checked before anything is written): every base token keeps its id; for
every text x, decode(encode(x)) is the text the base tokenizer gives back (x itself for byte-level
BPE and for sentencepiece with byte fallback and the identity normalizer; for a normalizing base,
e.g. nmt_nfkc, the normalized x). A new token is reachable when some text encodes to it: the
domain text, or the token's own text alone; the report counts the others (`unreachable`), most
of them merge steps that longer new tokens are built from (e.g. a partial UTF-8 sequence).
Pure parts (`learn_merges`, `extend_bpe_spec`, `select_pieces`, `append_pieces`, `fertility`)
take and return data; `extend_tokenizer` does the I/O. Imports neither torch nor megatron-core.
"""

from __future__ import annotations

import heapq
import io
import json
import logging
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.data import DataError
from engine.data.documents import check_inputs, iter_documents
from engine.files import new_directory, write_atomic
from engine.progress import Progress

logger = logging.getLogger(__name__)

TOP_NEW = 20
"""How many of the most frequent new tokens the report lists."""
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                "chat_template.jinja", "chat_template.json")
"""Files copied from a base directory. Not vocab.json/merges.txt/tokenizer.model of an HF
directory: those describe the old vocabulary, and AutoTokenizer reads tokenizer.json."""


@dataclass(frozen=True, slots=True)
class Merge:
    """One learned BPE merge: `left + right` becomes the new token `id`."""

    left: str
    right: str
    id: int
    count: int
    """How often the pair occurred in the domain words when it was merged."""

    @property
    def text(self) -> str:
        return self.left + self.right


# --- HF BPE: continued training ------------------------------------------------------------------

def learn_merges(words: Mapping[tuple[int, ...], int], pieces: Mapping[int, str], count: int, *,
                 next_id: int, banned: Callable[[str, str], bool] = lambda a, b: False,
                 min_frequency: int = 2, on_merge: Callable[[], None] | None = None) -> list[Merge]:
    """Up to `count` BPE merges continuing from `words` ({token ids of a word: frequency}).

    Each step merges the most frequent adjacent pair (ties: smallest ids), numbering new tokens
    from `next_id`; pairs whose text is already in `pieces`, or `banned(left, right)`, are never
    merged. Stops early when no pair occurs `min_frequency` times. Pair counts are updated per
    touched word and the best pair comes from a heap with lazy deletion (Sennrich et al. 2016,
    arXiv 1508.07909, with the usual incremental bookkeeping).
    """
    seqs, freqs = [list(w) for w in words], list(words.values())
    texts, existing = dict(pieces), set(pieces.values())
    pair_count: Counter = Counter()
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pair_count[pair] += freqs[i]
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[Merge] = []
    while len(merges) < count and heap:
        negative, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -negative:
            continue  # stale: the count changed and a fresh entry was pushed
        if -negative < min_frequency:
            break
        left, right = texts[pair[0]], texts[pair[1]]
        if left + right in existing or banned(left, right):
            continue
        new = next_id + len(merges)
        merges.append(Merge(left, right, new, -negative))
        texts[new] = left + right
        existing.add(left + right)
        delta: Counter = Counter()
        for i in where.pop(pair):
            old = seqs[i]
            seqs[i] = _merge_pair(old, pair, new)
            for p in zip(old, old[1:]):
                delta[p] -= freqs[i]
            for p in zip(seqs[i], seqs[i][1:]):
                delta[p] += freqs[i]
                where[p].add(i)
        for p, d in delta.items():
            if d:
                pair_count[p] += d
                if pair_count[p] > 0:
                    heapq.heappush(heap, (-pair_count[p], p))
                else:
                    del pair_count[p]
        if on_merge is not None:
            on_merge()
    return merges


def _merge_pair(seq: list[int], pair: tuple[int, int], new: int) -> list[int]:
    """`seq` with every occurrence of `pair`, left to right, replaced by `new` (as the tokenizer
    does: in `a a a` the first two merge)."""
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def extend_bpe_spec(spec: dict, merges: list[Merge]) -> dict:
    """A tokenizer.json dict with `merges` appended to model.vocab and model.merges (ranked after
    every base merge, in the base's merge format); `spec` is not modified."""
    model = dict(spec["model"])
    model["vocab"] = {**model["vocab"], **{m.text: m.id for m in merges}}
    as_text = bool(model["merges"]) and isinstance(model["merges"][0], str)
    model["merges"] = list(model["merges"]) + [
        f"{m.left} {m.right}" if as_text else [m.left, m.right] for m in merges]
    return {**spec, "model": model}


def _bpe_words(tok, texts: list[str], progress: bool) -> dict[tuple[int, ...], int]:
    """{base token ids of a pre-tokenized word: frequency} over `texts`."""
    counts: Counter = Counter()
    bar = Progress("domain words", len(texts), "documents", enabled=progress)
    for text in texts:
        if tok.normalizer is not None:
            text = tok.normalizer.normalize_str(text)
        counts.update(word for word, _ in tok.pre_tokenizer.pre_tokenize_str(text))
        bar.update()
    bar.close()
    words: Counter = Counter()
    for word, n in counts.items():  # summed: two words can share ids through an unknown token
        words[tuple(t.id for t in tok.model.tokenize(word))] += n
    return dict(words)


def _extend_hf(path: Path, texts: list[str], add: int, out: Path, progress: bool) -> None:
    import tokenizers

    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("continuing_subword_prefix") or model.get(
            "end_of_word_suffix") or spec.get("pre_tokenizer") is None:
        raise DataError(f"{path}: model {model.get('type')!r}; expected a BPE tokenizer.json with "
                        f"a pre-tokenizer and no subword prefix/suffix (e.g. byte-level BPE)")
    tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    vocab = tok.get_vocab(with_added_tokens=True)
    words = _bpe_words(tok, texts, progress)
    as_text = bool(model["merges"]) and isinstance(model["merges"][0], str)
    byte_tokens = model.get("byte_fallback") and (lambda t: t.startswith("<0x") and len(t) == 6)

    def banned(left: str, right: str) -> bool:
        # "<0xC3>" + "<0xA1>" is not the text of a token; "a b" merges cannot hold a space.
        return bool(byte_tokens and (byte_tokens(left) or byte_tokens(right))) or (
            as_text and " " in left + right)

    bar = Progress("merges", add, "merges", enabled=progress)
    merges = learn_merges(words, {i: t for t, i in vocab.items()}, add,
                          next_id=max(vocab.values()) + 1, banned=banned, on_merge=bar.update)
    bar.close()
    write_atomic(out / "tokenizer.json", json.dumps(extend_bpe_spec(spec, merges),
                                                    ensure_ascii=False, indent=2))


# --- sentencepiece: append a domain model's pieces ---------------------------------------------

def select_pieces(base: Iterable[str], domain: list[str], count: int) -> list[str]:
    """Up to `count` of the domain model's pieces (in its order) that `base` lacks: the single
    characters first (a missing character costs 1-4 byte-fallback tokens each time), then the
    merged pieces in order, so each one's parts come before it."""
    have = set(base)
    new = [p for p in dict.fromkeys(domain) if p not in have]
    chars = [p for p in new if len(p) == 1][:count]
    chosen = set(chars + [p for p in new if len(p) > 1][: count - len(chars)])
    return [p for p in new if p in chosen]


def append_pieces(base, pieces: list[str]):
    """A copy of the ModelProto `base` with `pieces` appended as NORMAL pieces, scores below the
    base's lowest and decreasing in order (merged after every base piece, in that order)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    proto = model_pb2.ModelProto()
    proto.CopyFrom(base)
    lowest = min((p.score for p in base.pieces), default=0.0)
    for i, text in enumerate(pieces):
        proto.pieces.add(piece=text, score=lowest - 1.0 - i,
                         type=model_pb2.ModelProto.SentencePiece.NORMAL)
    proto.trainer_spec.vocab_size = len(proto.pieces)
    return proto


def _domain_sentences(base_sp, proto, texts: list[str]) -> list[str]:
    """Lines of `texts` normalized by the base (its rules and whitespace handling), with the
    escaped spaces restored and the dummy prefix removed: the domain trainer adds its own."""
    spec = proto.normalizer_spec
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    out = []
    for line in base_sp.normalize(lines):
        line = line.replace("\u2581", " ")
        if spec.add_dummy_prefix and line:
            line = line[:-1] if proto.trainer_spec.treat_whitespace_as_suffix else line[1:]
        if line.strip():
            out.append(line)
    return out


def _processor(proto):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())


def dead_pieces(base, pieces: list[str], unused: list[str], lines: list[str]) -> set[str]:
    """Of the `unused` new pieces (absent from the segmented domain text), those that are no merge
    step either: removing one leaves the segmentation of every line containing its text as it
    was. Tested one at a time, last-ranked first, each without the ones found dead before."""
    alive, dead = list(pieces), set()
    current = _processor(append_pieces(base, alive))
    for piece in reversed(unused):
        surface = piece.replace("\u2581", " ").strip() or piece
        found = [line for line in lines if surface in line][:1000]
        without = [p for p in alive if p != piece]
        trial = _processor(append_pieces(base, without))
        if trial.encode(found, out_type=str) == current.encode(found, out_type=str):
            alive, current = without, trial
            dead.add(piece)
    return dead


def _extend_sentencepiece(path: Path, texts: list[str], add: int, out: Path) -> None:
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    base = model_pb2.ModelProto()
    base.ParseFromString(path.read_bytes())
    sentences = _domain_sentences(
        sentencepiece.SentencePieceProcessor(model_proto=base.SerializeToString()), base, texts)
    t = base.trainer_spec
    options = dict(
        model_type=t.ModelType.Name(t.model_type).lower(), split_digits=t.split_digits,
        split_by_unicode_script=t.split_by_unicode_script, split_by_number=t.split_by_number,
        split_by_whitespace=t.split_by_whitespace,
        treat_whitespace_as_suffix=t.treat_whitespace_as_suffix,
        allow_whitespace_only_pieces=t.allow_whitespace_only_pieces,
        max_sentencepiece_length=t.max_sentencepiece_length, max_sentence_length=1 << 14,
        character_coverage=t.character_coverage,
        add_dummy_prefix=base.normalizer_spec.add_dummy_prefix, remove_extra_whitespaces=False,
        normalization_rule_name="identity", byte_fallback=False, hard_vocab_limit=False,
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2, num_threads=1)

    def domain_pieces(vocab: int) -> list[str]:
        logger.info("training a %d-piece domain sentencepiece model on %d lines", vocab,
                    len(sentences))
        sentencepiece.set_random_generator_seed(0)
        writer = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_writer=writer, vocab_size=vocab,
                **options)
        except RuntimeError as err:
            raise DataError(f"{path}: domain sentencepiece training failed: "
                            f"{str(err).strip()}") from None
        domain = model_pb2.ModelProto()
        domain.ParseFromString(writer.getvalue())
        return [p.piece for p in domain.pieces if p.type == p.NORMAL]

    # Base merges run first and may split a word where the domain model did not, leaving some
    # domain pieces unreachable: drop those (dead_pieces) and refill from further down the
    # domain model, a few rounds. Its BPE order is stable as it grows, so refills rank last.
    have, dropped, vocab = {p.piece for p in base.pieces}, set(), 2 * add + 256
    normal, sample = domain_pieces(vocab), _prefix(texts, 20_000_000)
    lines = [line for text in sample for line in text.split("\n") if line.strip()]
    for last in (False, False, False, True):
        pieces = select_pieces(have | dropped, normal, add)
        if len(pieces) < add and len(normal) >= vocab - 8:  # more may come from a bigger model
            vocab += 2 * (add - len(pieces))
            normal = domain_pieces(vocab)
            pieces = select_pieces(have | dropped, normal, add)
        counts = Counter(p for doc in _processor(append_pieces(base, pieces)).encode(
            sample, out_type=str) for p in doc)
        dead = dead_pieces(base, pieces, [p for p in pieces if not counts[p]], lines)
        logger.info("%d new pieces, %d unreachable: dropped", len(pieces), len(dead))
        dropped |= dead
        if not dead or last:
            break
    pieces = [p for p in pieces if p not in dropped]
    (out / "tokenizer.model").write_bytes(append_pieces(base, pieces).SerializeToString())


def _prefix(texts: list[str], chars: int) -> list[str]:
    """The first documents of `texts` up to about `chars` characters."""
    total, end = 0, 0
    while end < len(texts) and total < chars:
        total += len(texts[end])
        end += 1
    return texts[:end]


# --- measurements --------------------------------------------------------------------------------

def fertility(encode: Callable[[str], list[int]], texts: list[str]) -> float:
    """Tokens per character of `texts` (lower is better; comparable across tokenizers)."""
    chars = sum(map(len, texts))
    return sum(len(encode(t)) for t in texts) / chars if chars else float("nan")


def _round_trip(base, new, texts: list[str], where: str) -> dict:
    """Count texts that come back exactly; raise when the new tokenizer gives back any other
    text than the base does (the extension must change segmentation only)."""
    exact = 0
    for i, text in enumerate(texts):
        back = new.decode(new.encode(text))
        if back != base.decode(base.encode(text)):
            raise DataError(f"{where}: document {i}: decode(encode(x)) differs from the base "
                            f"tokenizer's ({back[:60]!r}); the extension must not change text")
        exact += back == text
    return {"documents": len(texts), "exact": exact}


def _measure(base, new, texts: list[str], valid: dict[str, tuple[str, list[str]]],
             progress: bool) -> dict:
    """Checks and figures of the report (see the module docstring); raises if a base id moved."""
    moved = [(p, i) for p, i in base.vocab.items() if new.vocab.get(p) != i]
    if moved:
        piece, token_id = moved[0]
        raise DataError(f"{new.path}: base token {piece!r} moved from id {token_id} to "
                        f"{new.vocab.get(piece)}; base ids must not move")
    first = max(base.vocab.values()) + 1
    new_ids = sorted(i for i in new.vocab.values() if i >= first)
    counts: Counter = Counter()
    bar = Progress("counting new tokens", len(texts), "documents", enabled=progress)
    for text in texts:
        counts.update(i for i in new.encode(text) if i >= first)
        bar.update()
    bar.close()
    unreachable = [i for i in new_ids
                   if not counts[i] and i not in new.encode(new.decode([i]))]
    report = {"base_vocab_size": base.vocab_size, "vocab_size": new.vocab_size,
              "added": len(new_ids), "new_ids": [first, first + len(new_ids) - 1] if new_ids
              else [],
              "fertility": {}, "round_trip": {}}
    for name, (source, docs) in valid.items():
        report["fertility"][name] = {
            "text": source, "documents": len(docs), "characters": sum(map(len, docs)),
            "before": fertility(base.encode, docs), "after": fertility(new.encode, docs)}
        report["round_trip"][name] = _round_trip(base, new, docs, source)
    report["top_new_tokens"] = [
        {"id": i, "text": new.decode([i]), "piece": new.inv_vocab[i], "count": n}
        for i, n in counts.most_common(TOP_NEW)]
    report["unused_in_domain_text"] = sum(1 for i in new_ids if not counts[i])
    report["unreachable"] = len(unreachable)
    # A BPE merge step (often a partial UTF-8 sequence) that longer new tokens are built from.
    pieces = [new.inv_vocab[i] for i in new_ids]
    report["unreachable_merge_steps"] = sum(1 for i in unreachable if any(
        p != new.inv_vocab[i] and new.inv_vocab[i] in p for p in pieces))
    report["unreachable_tokens"] = [new.inv_vocab[i] for i in unreachable[:50]]
    return report


def format_report(report: dict) -> list[str]:
    """The console lines of a report: size, fertility before/after, reachability, top tokens."""
    ids = "..".join(map(str, report["new_ids"])) or "none"
    lines = [f"{report['tokenizer']}: {report['base_vocab_size']:,} + {report['added']:,} new "
             f"tokens ({report['requested']:,} asked; ids {ids}) in {report['seconds']:.1f} s"]
    for name, f in report["fertility"].items():
        change = 100 * (f["after"] / f["before"] - 1)
        lines.append(f"fertility {name} ({f['text']}, {f['characters']:,} chars): "
                     f"{f['before']:.4f} -> {f['after']:.4f} tokens/char ({change:+.1f}%)")
    for name, r in report["round_trip"].items():
        lines.append(f"decode(encode(x)) {name}: same text as the base on {r['documents']} "
                     f"documents, exactly x on {r['exact']}")
    lines.append(f"unreachable new tokens: {report['unreachable']} (of them merge steps of "
                 f"longer new tokens: {report['unreachable_merge_steps']}; not in the domain "
                 f"text: {report['unused_in_domain_text']})")
    top = ", ".join(f"{t['text']!r} {t['count']}" for t in report["top_new_tokens"])
    lines.append(f"most frequent new tokens: {top}")
    return lines


# --- the command ---------------------------------------------------------------------------------

def extend_tokenizer(base: str | Path, inputs: list[str], add: int, out: str | Path, *,
                     valid_domain: str | None = None, valid_general: str | None = None,
                     base_type: str | None = None, json_key: str = "text",
                     max_chars: int = 200_000_000, progress: bool = True) -> dict:
    """Write `out/` = the base tokenizer extended by up to `add` tokens learned on `inputs`
    (.jsonl/.txt, at most `max_chars` characters read), its config files and report.json;
    return the report. Fertility and round trips are measured on `valid_domain` (else the domain
    text) and `valid_general`. Every check runs before `out` appears; bad input is one line."""
    from engine.data.tokenizer import KINDS, load_tokenizer

    start, out = time.perf_counter(), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not empty; expected a new or empty directory")
    if add <= 0:
        raise DataError(f"--add {add}: expected a positive number of new tokens")
    if base_type is not None and base_type not in KINDS:
        raise DataError(f"base type {base_type!r}: expected one of {KINDS}")
    kind, path = _locate(Path(base), base_type)
    base_tok = load_tokenizer(kind, path)
    texts = _read_texts(inputs, json_key, max_chars)
    valid = {"domain": (", ".join(map(str, inputs)), _prefix(texts, 5_000_000))}
    for name, source in (("domain", valid_domain), ("general", valid_general)):
        if source is not None:
            valid[name] = (str(source), _read_texts([source], json_key, max_chars))
    with new_directory(out) as tmp:
        if kind == "hf":
            _extend_hf(path, texts, add, tmp, progress)
        else:
            _extend_sentencepiece(path, texts, add, tmp)
        copied = [name for name in CONFIG_FILES
                  if Path(base).is_dir() and (Path(base) / name).is_file()]
        for name in copied:
            shutil.copyfile(Path(base) / name, tmp / name)
        report = {"base": str(path), "kind": kind, "requested": add,
                  "tokenizer": str(out / ("tokenizer.json" if kind == "hf" else "tokenizer.model")),
                  **_measure(base_tok, load_tokenizer(kind, tmp), texts, valid, progress),
                  "copied": copied}
        report["seconds"] = time.perf_counter() - start
        write_atomic(tmp / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def _locate(base: Path, base_type: str | None) -> tuple[str, Path]:
    """(kind, file) of the base: a .model file or a directory with tokenizer.model is
    sentencepiece, a .json file or a directory with tokenizer.json is hf (unless `base_type`)."""
    if not base.exists():
        raise DataError(f"{base}: base tokenizer not found; expected a sentencepiece .model, "
                        f"a tokenizer.json or a directory holding one")
    if base.is_dir():
        kind = base_type or ("hf" if (base / "tokenizer.json").is_file() else "sentencepiece")
        path = base / ("tokenizer.json" if kind == "hf" else "tokenizer.model")
    else:
        kind, path = base_type or ("sentencepiece" if base.suffix == ".model" else "hf"), base
    if not path.is_file():
        raise DataError(f"{path}: not found; expected the {kind} tokenizer file of the base")
    return kind, path


def _read_texts(paths: list, json_key: str, max_chars: int) -> list[str]:
    """The non-blank documents of `paths`, up to `max_chars` characters in all."""
    texts, total = [], 0
    for text in iter_documents(check_inputs(paths), json_key):
        if text.strip():
            texts.append(text)
            total += len(text)
            if total >= max_chars:
                logger.info("read the first %d characters (max_chars)", total)
                break
    if not texts:
        raise DataError(f"{', '.join(map(str, paths))}: no text; expected non-empty documents")
    return texts
