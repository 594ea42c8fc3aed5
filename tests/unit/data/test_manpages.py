"""engine corpus manpages: Debian's manpages-cs rendered to plain text, split by page."""

import json
import re

import pytest

from engine.data import DataError, manpages
from engine.data.cli import corpus_main
from engine.data.corpus import VALID_FRACTION, holdout
from engine.data.manpages import (
    build_manpages_corpus,
    find_manpages,
    manpage_files,
    render_manpage,
    strip_troff,
)

CZECH = set("áčďéěíňóřšťúůýž")


def read(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def package_pages(out) -> dict:
    """{page: file} of the package, found the way the corpus found them (cache reused)."""
    return find_manpages(manpage_files("cs", out / "debs"))


def test_one_document_per_page_split_by_page_name(manpages_cs):
    train, valid = (read(manpages_cs / f"manpages-cs-{s}.jsonl") for s in ("train", "valid"))
    pages = package_pages(manpages_cs)
    names = [d["id"] for d in train + valid]
    # Every real page once; `.so` redirects and symlinked aliases are not documents of their own.
    redirects = {p for p, f in pages.items() if manpages._read_manpage(f) is None}
    assert sorted(names) == sorted(set(pages) - redirects) and len(names) > 50
    assert {d["id"] for d in valid} == holdout(names, VALID_FRACTION)
    assert 0 < len(valid) <= len(names) * VALID_FRACTION + 1
    assert {d["renderer"] for d in train + valid} == {manpages.manpage_renderer()}


def test_text_is_czech_plain_text(manpages_cs):
    docs = read(manpages_cs / "manpages-cs-train.jsonl")
    text = "".join(d["text"] for d in docs)
    # Czech: its diacritics are frequent (a rendering that lost UTF-8 would show mojibake).
    assert sum(text.count(c) for c in CZECH) > 0.02 * len(text)
    assert "Ã" not in text and "\ufffd" not in text
    assert "\x08" not in text and "\x1b" not in text  # no overstrike, no SGR
    assert not re.search(r"\\f[BIRP]|^\.(SH|TP|B|I) ", text, re.M)  # no troff left
    chgrp = next(d["text"] for d in docs + read(manpages_cs / "manpages-cs-valid.jsonl")
                 if d["id"] == "chgrp.1")
    assert "mění skupinu" in chgrp and "--reference" in chgrp


def test_troff_strip_fallback_keeps_the_words(manpages_cs):
    """Without groff, `strip_troff` keeps most words of groff's rendering and no markup."""
    if manpages.manpage_renderer() != "groff":
        pytest.skip("groff absent: no reference rendering to compare with")
    pages = package_pages(manpages_cs)
    for page in ("chgrp.1", "group.5", "signal.7"):
        source = manpages._read_manpage(pages[page])
        body = render_manpage(source, "groff").strip().split("\n")[1:-1]  # less header, footer
        reference = set(re.findall(r"\w+", "\n".join(body)))
        stripped = render_manpage(source, "troff-strip")
        words = set(re.findall(r"\w+", stripped))
        assert len(words & reference) > 0.95 * len(reference), page
        assert len(words - reference) < 0.05 * len(words), page
        assert not re.search(r"\\f|\\-|^\.[A-Za-z]{1,2}( |$)", stripped, re.M), page


def test_strip_troff_macros_and_escapes():
    source = ('.\\" comment\n.TH CHGRP 1\n.SH JMÉNO\nchgrp \\- mění\n.PP\n'
              '.B "tučně psané"\n.BR chown (1),\n\\fBvolba\\fP \\(em konec\\(aqs\n'
              '.TS\nallbox tab(:);\nl l.\n_\nSIGHUP:1\n.TE\n.UR https://x.cz\n.UE .\n')
    text = strip_troff(source)
    assert text.split("\n") == ["", "JMÉNO", "chgrp - mění", "", "tučně psané", "chown(1),",
                                "volba — konec's", "SIGHUP  1", "<https://x.cz>", "."]


def test_without_groff_the_corpus_says_so(manpages_cs, tmp_path, monkeypatch):
    monkeypatch.setattr(manpages.shutil, "which",
                        lambda name: None if name == "groff" else "/usr/bin/" + name)
    assert manpages.manpage_renderer() == "troff-strip"
    debs = sorted((manpages_cs / "debs").glob("*.deb"))
    build_manpages_corpus(tmp_path, "cs", deb=debs[0] if debs else None,
                          cache=manpages_cs / "debs", progress=False)
    docs = read(tmp_path / "manpages-cs-train.jsonl")
    assert {d["renderer"] for d in docs} == {"troff-strip"}
    assert len(docs) == len(read(manpages_cs / "manpages-cs-train.jsonl"))


def test_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(DataError, match=r"unknown language 'xx'; expected one of"):
        build_manpages_corpus(tmp_path, "xx")
    bad = tmp_path / "manpages-cs_0_all.deb"
    bad.write_bytes(b"not a deb")
    with pytest.raises(DataError, match=r"manpages-cs_0_all\.deb: dpkg-deb -x failed"):
        manpage_files("cs", tmp_path / "cache", deb=bad)
    assert corpus_main(["manpages", "--lang", "cs", "--out", str(tmp_path / "o"),
                        "--deb", str(bad), "--cache", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
