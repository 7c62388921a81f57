"""Organic text phiforge did not generate, from Debian packages: the web arm of a study, code, neutral text.

Each source names its Debian package, the files it reads inside it and their license. A source is read
from the installed package when its files are there (``apt-get install PACKAGE``), else from the package
downloaded and unpacked into $PHIFORGE_CACHE/debian (default ~/.cache/phiforge; ``apt-get download`` +
``dpkg-deb -x``, no root needed). The
export writes JSONL records ``{"id", "text", "source", "license"}``, each document at most ``max_chars``
long (longer files are split at paragraph breaks), for ``phiforge curate`` to filter like web data.
"""

from __future__ import annotations

import gzip
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from phiforge.errors import DataError


def cache_dir() -> Path:
    return Path(os.environ.get("PHIFORGE_CACHE", Path.home() / ".cache" / "phiforge")) / "debian"


class OrganicError(DataError):
    """An unknown source, or a package that could not be found or fetched."""


@dataclass(frozen=True)
class Source:
    package: str  # the Debian package
    root: str  # the folder inside the package (an absolute path once installed)
    pattern: str  # glob of the files under root
    kind: str  # rst | html | pod | python | dictd: how a file becomes text
    license: str
    description: str
    exclude: str = ""  # regex on the path relative to root: files left out


SOURCES: dict[str, Source] = {
    "python-docs": Source("python3.11-doc", "/usr/share/doc/python3.11/html/_sources", "**/*.txt", "rst",
                          "PSF-2.0 (Python Software Foundation License Version 2; see "
                          "/usr/share/doc/python3.11-doc/copyright)",
                          "the Python 3.11 documentation (tutorial, library and language reference, HOWTOs, "
                          "FAQs, what's new), reStructuredText sources", exclude=r"^whatsnew/changelog"),
    "postgresql-docs": Source("postgresql-doc-15", "/usr/share/doc/postgresql-doc-15/html", "*.html", "html",
                              "PostgreSQL License (BSD-style; see /usr/share/doc/postgresql-doc-15/copyright)",
                              "the PostgreSQL 15 manual (tutorial, SQL, administration, internals), HTML"),
    "perl-docs": Source("perl-doc", "/usr/share/perl/5.36.0/pod", "*.pod", "pod",
                        "GPL-1+ or Artistic (see /usr/share/doc/perl-doc/copyright)",
                        "the Perl 5.36 manual pages (tutorials, FAQs, reference), POD sources",
                        exclude=r"^perl5\d+delta"),
    "python-stdlib": Source("libpython3.11-stdlib", "/usr/lib/python3.11", "**/*.py", "python",
                            "PSF-2.0 (see /usr/share/doc/libpython3.11-stdlib/copyright)",
                            "the Python 3.11 standard library's source code", exclude=r"(^|/)(test|tests|idle_test)/"),
    "devils-dictionary": Source("dict-devil", "/usr/share/dictd", "devil.dict.dz", "dictd",
                                "public domain (see /usr/share/doc/dict-devil/copyright)",
                                "The Devil's Dictionary by Ambrose Bierce (1911)"),
}


def package_root(source: Source, installed_first: bool = True) -> Path:
    """The folder holding the source's files: the installed package's, else the package unpacked in CACHE."""
    installed = Path(source.root)
    if installed_first and installed.is_dir() and any(installed.glob(source.pattern)):
        return installed
    unpacked = cache_dir() / source.package
    if not (unpacked / ".complete").is_file():
        unpacked.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["apt-get", "download", source.package], cwd=unpacked, check=True,
                           capture_output=True, text=True)
            deb = next(unpacked.glob(f"{source.package}_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked / "root")], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError, StopIteration) as err:
            detail = getattr(err, "stderr", "") or err
            raise OrganicError(f"Debian package {source.package}: not installed and `apt-get download` failed "
                               f"({str(detail).strip()[:300]}); install it with `apt-get install "
                               f"{source.package}`") from None
        (unpacked / ".complete").write_text("")
    return unpacked / "root" / source.root.lstrip("/")


# ---- file -> text ----------------------------------------------------------------------------------------
class _HTMLText(HTMLParser):
    SKIP = {"script", "style", "head", "nav"}
    BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "table",
             "section", "blockquote"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:  # noqa: ANN401
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def html_text(page: str) -> str:
    parser = _HTMLText()
    parser.feed(page)
    text = "".join(parser.parts)
    text = re.sub(r"[ \t\r\f\v]+", " ", text)
    return re.sub(r"\n\s*\n(\s*\n)*", "\n\n", text).strip()


def rst_text(source: str) -> str:
    """reST with its markup lightly stripped: roles (:func:`x` -> x), directives' ".." lines, heading rules."""
    text = re.sub(r":[a-z]+(?::[a-z]+)?:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`", r"\1", source)
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"`([^`<]*?)(?:\s*<[^>]*>)?`_{0,2}", r"\1", text)
    lines = [ln for ln in text.splitlines() if not re.fullmatch(r"\s*([=\-~^*#+\"'`.]){3,}\s*", ln)
             and not re.match(r"\s*\.\. ", ln)]
    return re.sub(r"\n\s*\n(\s*\n)*", "\n\n", "\n".join(lines)).strip()


def pod_text(source: str) -> str:
    """POD with its markup stripped: =head/=item lines keep their text, other commands go, B<x> -> x."""
    lines = []
    for line in source.splitlines():
        if line.startswith("="):
            command, _, rest = line.partition(" ")
            if command.startswith(("=head", "=item")) and rest.strip():
                lines.append(rest.strip())
            continue
        lines.append(line)
    text = "\n".join(lines)
    for _ in range(3):  # nested codes, innermost first
        text = re.sub(r"[A-Z]<<+\s(.*?)\s>>+", r"\1", text)
        text = re.sub(r"[BCEFIJLSXZ]<([^<>]*)>", lambda m: m.group(1).split("|")[0], text)
    return re.sub(r"\n\s*\n(\s*\n)*", "\n\n", text).strip()


def _read(path: Path, kind: str) -> Iterator[str]:
    if kind == "dictd":  # dictzip is gzip-compatible; the text is prose, entries a blank line apart
        yield gzip.decompress(path.read_bytes()).decode("utf-8", "replace").strip()
        return
    text = path.read_text(encoding="utf-8", errors="replace")
    yield {"rst": rst_text, "html": html_text, "pod": pod_text, "python": str.strip}[kind](text)


def split_paragraphs(text: str, max_chars: int) -> list[str]:
    """Pieces of at most ~max_chars, cut at blank lines (a single paragraph longer than that stays whole)."""
    pieces, current = [], ""
    for para in text.split("\n\n"):
        if current and len(current) + len(para) + 2 > max_chars:
            pieces.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current.strip():
        pieces.append(current)
    return pieces


def iter_documents(name: str, max_chars: int = 6000) -> Iterator[dict[str, Any]]:
    if name not in SOURCES:
        raise OrganicError(f"unknown organic source {name!r}; sources are {sorted(SOURCES)}")
    source = SOURCES[name]
    root = package_root(source)
    exclude = re.compile(source.exclude) if source.exclude else None
    for path in sorted(root.glob(source.pattern)):
        rel = path.relative_to(root).as_posix()
        if exclude and exclude.search(rel):
            continue
        for t, text in enumerate(_read(path, source.kind)):
            for p, piece in enumerate(split_paragraphs(text, max_chars)):
                if piece.strip():
                    yield {"id": f"{name}/{rel}#{t}.{p}", "text": piece, "source": name, "license": source.license}


def export(names: list[str], output: str | Path, max_chars: int = 6000,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the sources' documents to OUTPUT (JSONL, atomically); per source: documents, characters, license."""
    from phiforge.data.jsonl import write_jsonl

    stats: dict[str, Any] = {}

    def records() -> Iterator[dict[str, Any]]:
        for name in names:
            docs = chars = 0
            for record in iter_documents(name, max_chars):
                docs, chars = docs + 1, chars + len(record["text"])
                yield record
            source = SOURCES[name]
            stats[name] = {"package": source.package, "license": source.license, "description": source.description,
                           "documents": docs, "characters": chars}
            log(f"organic {name}: {docs} documents, {chars / 1e6:.1f}M characters from Debian {source.package}")

    write_jsonl(Path(output), records())
    return stats


def describe(names: list[str]) -> list[dict[str, str]]:
    return [{"name": n, "package": SOURCES[n].package, "license": SOURCES[n].license,
             "description": SOURCES[n].description} for n in names]
