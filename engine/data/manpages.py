"""Debian's translated man pages as a corpus: real non-English text (`manpages-<lang>`, from
manpages-l10n; UTF-8 troff), one document per page, with the held-out split of engine.data.corpus.

Pages come from the installed package's own file list, else from `apt-get download` + `dpkg-deb
-x` into a cache; each page is rendered by groff when present, else by a troff-macro stripper
(each document records which).
"""

import gzip
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine.data import DataError
from engine.data.corpus import (
    VALID_FRACTION,
    Document,
    _decode,
    _splits_exist,
    _write_splits,
    holdout,
)

logger = logging.getLogger(__name__)

MANPAGES_LANGS = ("cs", "de", "es", "fr", "it", "pl", "pt-br", "ru")
"""Languages of Debian's `manpages-<lang>` packages (manpages-l10n translations, UTF-8 troff)."""

_GROFF = ("groff", "-Kutf-8", "-Tutf8", "-mandoc", "-t", "-rLL=100n", "-rIN=2n", "-rSN=0n",
          "-rHY=0", "-P-cbou")
"""UTF-8 in and out, tables (tbl), 100-column lines, 2-column paragraph indent (man's 7 would put
thousands of space tokens into a language corpus), no hyphenation, no overstriking or SGR."""

_OVERSTRIKE = re.compile(r".\x08|\x1b\[[0-9;]*m")  # "x\bx" bold, "_\bx" underline, ANSI SGR
_TROFF_ESCAPES = [
    (re.compile(r"\\[wh]'[^'\\]*'"), ""),  # width, motion (the inner one first: \h'-\w' 'u')
    (re.compile(r"\\[whvlLxNoXRbZ]'[^']*'"), ""),
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d+|\\\*(\[[^\]]*\]|\(..|.)|\\[&|^,/c%:{}]|\\k."), ""),
    (re.compile(r"\\\((em|en)"), "—"),
    (re.compile(r"\\\((aq|cq|oq)"), "'"),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\(bu"), "•"),
    (re.compile(r"\\\(co"), "©"),
    (re.compile(r"\\(\(..|\[[^\]]*\])"), ""),  # other named glyphs
    (re.compile(r"\\[-e ~0]"), lambda m: {"e": "\\", "-": "-"}.get(m.group()[1], " ")),
]


def manpage_renderer() -> str:
    """"groff" when `groff` is on PATH (what `man` runs), else "troff-strip" (approximate)."""
    return "groff" if shutil.which("groff") else "troff-strip"


def strip_troff(source: str) -> str:
    """Plain text of a man page without groff: macros dropped, headings, font-change macros
    (`.SH`, `.B`, `.IR`, ...) and links (`.UR`, `.MT`) kept as their text, table rows kept with
    their format lines dropped, inline escapes removed or mapped. Approximate (no filling); used
    only when groff is absent."""
    lines, table, separator = [], None, "\t"  # table: None, "format" (before its rows), "rows"
    for line in source.splitlines():
        if line.startswith((".\\\"", "'\\\"")) or line.strip() in (".", "'"):
            continue  # comments, empty requests
        if table == "format":  # options ("tab(:);") and format lines, the last ending in "."
            separator = next(iter(re.findall(r"tab\s*\((.)\)", line)), separator)
            table = "rows" if line.rstrip().endswith(".") else "format"
            continue
        if line.startswith((".", "'")):
            name, _, args = line[1:].strip().partition(" ")
            words = [a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', args)]
            if name in ("TS", "TE"):
                table, separator = ("format" if name == "TS" else None), "\t"
            if name in ("SH", "SS"):
                lines += ["", " ".join(words)]
            elif name in ("PP", "LP", "P", "TP", "sp", "br") or name == "IP" and not words:
                lines.append("")
            elif name == "IP":
                lines.append(words[0])
            elif name in ("UR", "MT") and words:
                lines.append(f"<{words[0]}>")
            elif name in ("B", "I", "SM", "SB", "UE", "ME"):
                lines.append(" ".join(words))
            elif len(name) == 2 and set(name) <= set("BIR"):  # .BR .IR ...: alternating fonts
                lines.append("".join(words))
            continue  # every other request or macro (.TH .nf .RS .de ...) carries no text
        if table == "rows" and line.strip() in ("_", "="):
            continue  # table rules
        lines.append(line.replace(separator, "  ") if table else line)
    text = "\n".join(lines)
    for pattern, replacement in _TROFF_ESCAPES:
        text = pattern.sub(replacement, text)
    return text


def render_manpage(source: str, renderer: str) -> str:
    """Plain text of one man page (troff source): through groff, or `strip_troff`."""
    if renderer == "groff":
        # .na/.nh first: no justification (runs of padding spaces) and no hyphenated words.
        result = subprocess.run(
            _GROFF, input=(".na\n.nh\n" + source).encode(), capture_output=True, check=False
        )
        text = result.stdout.decode("utf-8", errors="replace")
        if result.returncode != 0 or not text.strip():
            raise DataError(f"groff failed (exit {result.returncode}): "
                            f"{result.stderr.decode(errors='replace').strip()[:200]}")
    else:
        text = strip_troff(source)
    lines = [_OVERSTRIKE.sub("", line).rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n") + "\n"


def find_manpages(files: Iterable[Path]) -> dict[str, Path]:
    """`{page name: file}` of the man pages among `files` (e.g. `chgrp.1` ->
    .../man1/chgrp.1.gz): real files only, so symlinked aliases (bunzip2 -> bzip2) count once."""
    pages = {}
    for path in sorted(files):
        if path.parent.name.startswith("man") and path.is_file() and not path.is_symlink():
            pages.setdefault(path.name.removesuffix(".gz"), path)
    return pages


def _read_manpage(path: Path) -> str | None:
    """The troff source, or None for a `.so other-page` redirect (an alias, rendered elsewhere)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    source = _decode(raw, str(path))
    first = next((line for line in source.splitlines() if not line.startswith('.\\"')), "")
    return None if first.startswith(".so ") else source


def manpage_files(lang: str, cache: Path, deb: str | os.PathLike | None = None) -> list[Path]:
    """The files of Debian's `manpages-<lang>` under its `usr/share/man/<lang>/`.

    Order: `deb` (a local .deb), the installed package when its files are present (Docker images
    often exclude /usr/share/man), else `apt-get download` into `cache` and `dpkg-deb -x`.
    """
    package = f"manpages-{lang}"
    man_dir = Path("usr", "share", "man", lang.replace("-br", "_BR"))
    if deb is None and shutil.which("dpkg-query"):
        listed = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True,
                                check=False).stdout.split("\n")
        # The package's own list: /usr/share/man/cs also holds other packages' pages (passwd).
        files = [Path(f) for f in listed if f.startswith(f"/{man_dir}/") and Path(f).is_file()]
        if files:
            logger.info("%s: reading the installed package", package)
            return files
    deb = Path(deb) if deb is not None else _download_deb(package, cache)
    tree = cache / f"{deb.name}.d"
    if not tree.is_dir():
        if not shutil.which("dpkg-deb"):
            raise DataError(f"{deb}: cannot unpack without dpkg-deb; install Debian's dpkg")
        tmp = cache / f".{tree.name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"{deb}: dpkg-deb -x failed: {result.stderr.strip()[:200]}")
        os.replace(tmp, tree)
    return list((tree / man_dir).rglob("*"))


def _download_deb(package: str, cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if found:
        return found[-1]
    if not shutil.which("apt-get"):
        raise DataError(f"{package}: not installed and no apt-get to download it; "
                        f"install the Debian package or pass --deb FILE")
    logger.info("%s: apt-get download into %s", package, cache)
    result = subprocess.run(["apt-get", "download", "-q", package], cwd=cache,
                            capture_output=True, text=True, check=False)
    found = sorted(cache.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise DataError(f"apt-get download {package} failed ({last}); run `apt-get update` or "
                        f"`apt-get install {package}` as root, or pass --deb FILE")
    return found[-1]


def build_manpages_corpus(
    dest_dir: str | os.PathLike,
    lang: str,
    *,
    cache: str | os.PathLike | None = None,
    deb: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Write `manpages-<lang>-{train,valid}.jsonl`: one document per page of Debian's
    `manpages-<lang>`, rendered to plain text, ~5% of pages held out by the sha256 of their name.
    Skipped when both files exist. Some pages are only partly translated (English paragraphs)."""
    from engine.progress import Progress

    if lang not in MANPAGES_LANGS:
        raise DataError(f"manpages: unknown language {lang!r}; expected one of {MANPAGES_LANGS}")
    dest, name = Path(dest_dir), f"manpages-{lang}"
    if _splits_exist(dest, name):
        logger.info("%s: %s corpus already there", dest, name)
        return dest
    cache = Path(cache) if cache else Path.home() / ".cache" / "engine" / "debs"
    pages = find_manpages(manpage_files(lang, cache, deb))
    if not pages:
        raise DataError(f"manpages-{lang}: no man pages in the package (deb={deb})")
    renderer = manpage_renderer()
    logger.info("%s: %d pages, rendered with %s", name, len(pages), renderer)
    sources = {page: (path, _read_manpage(path)) for page, path in pages.items()}
    sources = {page: item for page, item in sources.items() if item[1] is not None}
    bar, documents = Progress(f"{name} ({renderer})", len(sources), "pages", enabled=progress), []

    def render(page: str) -> str:
        try:
            return render_manpage(sources[page][1], renderer)
        except DataError as err:
            raise DataError(f"{sources[page][0]}: {err}") from None

    # One groff per page, as man does (pages set registers and modes that would leak into the
    # next one in a shared run); threads overlap the ~40 ms process start-ups. Order is kept.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for page, text in zip(sources, pool.map(render, sources)):
            path = sources[page][0]
            meta = {"page": page, "section": path.parent.name[3:], "renderer": renderer}
            documents.append(Document(key=page, group=page, text=text, meta=meta))
            bar.update(1)
    bar.close()
    valid_groups = holdout((d.group for d in documents), VALID_FRACTION)
    return _write_splits(dest, name, documents, valid_groups)
