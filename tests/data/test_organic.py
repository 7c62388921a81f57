"""Organic corpora from Debian packages: markup stripped, files split at paragraphs, a package fetched with
`apt-get download` when it is not installed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from phiforge.data import organic


def test_markup_is_stripped_to_prose() -> None:
    rst = "Title\n=====\n\nUse :func:`len` and ``x`` (see `docs <http://x>`_).\n\n.. note::\n"
    assert organic.rst_text(rst) == "Title\n\nUse len and x (see docs)."
    pod = "=head1 NAME\n\nB<perl> is C<fast>, see L<perlfaq|perlfaq1>.\n\n=cut\n"
    assert organic.pod_text(pod) == "NAME\n\nperl is fast, see perlfaq."
    page = "<html><head><title>t</title><script>x()</script></head><body><p>One &amp; two</p><p>three</p></body>"
    assert organic.html_text(page) == "One & two\n\nthree"
    assert organic.split_paragraphs("a" * 5 + "\n\n" + "b" * 5 + "\n\n" + "c" * 20, 12) == \
        ["aaaaa\n\nbbbbb", "c" * 20]


@pytest.mark.skipif(not shutil.which("apt-get") or not shutil.which("dpkg-deb"), reason="needs Debian's apt")
def test_a_package_is_downloaded_unpacked_and_exported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHIFORGE_CACHE", str(tmp_path / "cache"))
    source = organic.SOURCES["devils-dictionary"]
    root = organic.package_root(source, installed_first=False)  # as on a machine without the package
    assert root.is_relative_to(tmp_path / "cache") and (root / "devil.dict.dz").is_file()
    stats = organic.export(["devils-dictionary"], tmp_path / "devil.jsonl", max_chars=3000, log=lambda _: None)
    records = [json.loads(line) for line in (tmp_path / "devil.jsonl").read_text().splitlines()]
    assert stats["devils-dictionary"]["documents"] == len(records) > 50
    assert all(len(r["text"]) <= 3000 or "\n\n" not in r["text"] for r in records)
    assert records[0]["license"].startswith("public domain") and "ABDICATION, n." in "".join(r["text"] for r in records)
    with pytest.raises(organic.OrganicError, match="unknown organic source"):
        next(organic.iter_documents("nope"))
