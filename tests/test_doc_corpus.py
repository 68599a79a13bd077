"""The real-corpus pipeline: markup converters, file selection, prose filters, deduplication,
and cutting a subset of a built dataset (`dlm data subset`)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import pytest

from data_pipeline.doc_corpus import (
    Deduper,
    PackageSpec,
    boilerplate,
    english_share,
    is_prose,
    read_documents,
    sections,
    select_files,
)
from data_pipeline.markup import CONVERTERS
from pretrain.errors import ConfigError

PROSE = "The driver is loaded when the device is found, and it is removed when the device goes."

RST = f"""\
.. SPDX-License-Identifier: GPL-2.0

=========
The Title
=========

:Author: Someone

{PROSE} See :ref:`the guide <guide-label>` and ``pci_enable()`` or `LWN <https://lwn.net>`_.

Example::

    int x = 3;
    return x;

.. code-block:: c

   static int y;

.. note::

   A note that is *kept* as text.

=====  =====
col a  col b
=====  =====
1      2
=====  =====

Section
-------
Last paragraph with a **strong** word and a reference_ to something.
"""


def test_rst_keeps_prose_and_titles_and_drops_code_tables_and_comments():
    paragraphs = CONVERTERS["rst"](RST)
    assert paragraphs[0] == "The Title"
    text = "\n\n".join(paragraphs)
    assert PROSE in text and "See the guide and pci_enable() or LWN." in text
    assert "Example:" in text and "A note that is kept as text." in text
    assert "Last paragraph with a strong word and a reference to something." in text
    for gone in ("int x", "static int", "SPDX", "col a", "=====", "---", "Someone", "::"):
        assert gone not in text, gone
    assert "Section" in paragraphs


def test_pod_asciidoc_markdown_and_text():
    pod = "=head1 NAME\n\nperlfoo - does B<bold> C<code> L<the docs|perlfunc> E<gt> 1\n\n"
    pod += "    my $code = 1;\n\n=over\n\n=item * first item\n\n=back\n\n=cut\n\nsub x {}\n"
    assert CONVERTERS["pod"](pod) == [
        "NAME",
        "perlfoo - does bold code the docs > 1",
        "- first item",
    ]
    adoc = "git-x(1)\n========\n\nNAME\n----\ngit-x - does 'things', see linkgit:git-y[1].\n\n"
    adoc += "------------\n$ git x\n------------\n\n--force::\n\tForce it.\n"
    out = CONVERTERS["asciidoc"](adoc)
    assert "git-x - does things, see git-y." in out and "$ git x" not in "\n".join(out)
    assert "--force:" in out
    md = "# Title\n\nSome *text* with [a link](http://x).\n\n```\ncode here\n```\n"
    assert CONVERTERS["markdown"](md) == ["Title", "Some text with a link."]
    assert CONVERTERS["text"]("  A line\n  wrapped.\n\n        code\n") == ["A line wrapped."]


def test_html_keeps_content_drops_furniture_but_not_a_page_wrapped_in_it():
    body = f"<p>{PROSE}</p><ul><li>item one</li></ul><pre>code()</pre>"
    page = (
        f'<html class="sidebar-visible"><head><title>t</title></head><body>'
        f'<div class="sphinxsidebar"><p>Navigation text</p></div><h1>Head¶</h1>{body}'
        f'<div role="navigation"><a>next</a></div><table><tr><td>cell</td></tr></table>'
        f"<script>var x;</script></body></html>"
    )
    assert CONVERTERS["html"](page) == ["Head", PROSE, "- item one"]
    # a generator that wraps the whole page in a "header" div (never closed): still read
    wrapped = f'<body><div class="header"><div class="toc"><p>toc</p></div>{body}{body}</body>'
    assert CONVERTERS["html"](wrapped).count(PROSE) == 2


def test_prose_filters():
    assert is_prose(PROSE) and english_share(PROSE) > 0.3
    assert not is_prose("x = f(a[i], b[j]); y += g(x) * 2; return {k: v for k, v in z};")
    assert not is_prose("Wert Zahl Liste Funktion Rückgabe Parameter Beispiel Datei Name Typ Ort")
    assert not is_prose("Example:")
    assert english_share("le chat est sur la table avec une souris") < 0.12


def test_selection_prefers_sources_skips_translations_and_furniture_files(tmp_path):
    root = tmp_path / "pkg"
    (root / "html" / "_sources").mkdir(parents=True)
    (root / "html" / "_sources" / "a.rst.txt").write_text(RST)
    (root / "html" / "a.html").write_text("<p>rendered copy</p>")
    (root / "html" / "b.html").write_text(f"<p>{PROSE}</p>")
    (root / "html" / "b.fr.html").write_text("<p>copie</p>")
    (root / "fr-FR").mkdir()
    (root / "fr-FR" / "c.html").write_text("<p>copie</p>")
    (root / "man.pod.gz").write_bytes(gzip.compress(b"=head1 NAME\n\nx\n"))
    (root / "notes.txt").write_text("plain")
    (root / "copyright").write_text("legal")
    names = [str(p.relative_to(root)) for p, _ in select_files(root, PackageSpec(name="pkg"))]
    assert names == ["html/_sources/a.rst.txt", "html/b.html", "man.pod.gz"]
    # html=True: the rendered pages instead of the sources; formats: .txt read as text
    spec = PackageSpec(name="pkg", html=True, formats=((".txt", "text"),))
    names = [str(p.relative_to(root)) for p, _ in select_files(root, spec)]
    assert names == ["html/a.html", "html/b.html", "man.pod.gz", "notes.txt"]


def test_dedupe_boilerplate_and_sections():
    dedupe = Deduper()
    first = [PROSE, "short", "A second long paragraph that has more than eight words in it."]
    assert dedupe(first) == first
    assert dedupe(list(first)) == []  # the same document again
    assert dedupe(["new words here", first[2], "short"]) == ["new words here", "short"]
    assert dedupe.dropped_documents == 1 and dedupe.dropped_paragraphs == 1
    pages = [["Home | Next", f"page {i} " + PROSE] for i in range(10)]
    assert boilerplate(pages) == {"Home | Next"}
    parts = list(sections(["Intro", "x" * 60, "Heading", "y" * 60, "z" * 200], max_chars=100))
    assert parts == [["Intro", "x" * 60], ["Heading", "y" * 60], ["z" * 200]]


def test_read_documents_end_to_end(tmp_path):
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "a.rst").write_text(RST + ("\n\n" + PROSE) * 10)
    (root / "b.rst").write_text(RST + ("\n\n" + PROSE) * 10)  # a copy: dropped
    (root / "c.rst").write_text("Too short.\n")
    stats: dict = {}
    docs = list(read_documents([(PackageSpec(name="pkg"), root)], deduper=Deduper(), stats=stats))
    assert [d.path for d in docs] == ["a.rst"] and docs[0].package == "pkg"
    assert stats["pkg"]["files"] == 3 and stats["pkg"]["documents"] == 1


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from data_pipeline.build import build_dataset
    from data_pipeline.grammar import generate_documents

    out = tmp_path_factory.mktemp("subset") / "full"
    build_dataset(
        [],
        out,
        seq_len=32,
        vocab_size=300,
        samples_per_shard=64,
        val_fraction=0.1,
        seed=0,
        documents=generate_documents(1500, seed=1),
        log=lambda *a: None,
    )
    (out / "debian_packages.json").write_text('{"x": 1}')
    return out


def test_subset_copies_the_first_shards_within_the_budget(built, tmp_path):
    from data_pipeline.manifest import Manifest
    from data_pipeline.reader import eval_batches
    from data_pipeline.subset import cut_subset

    full = Manifest.load(built)
    shard = full.splits["train"][0].num_bytes / (1 << 20)
    out = tmp_path / "small"
    budget = 0.2 + 3.5 * shard  # room for the side files, one val shard and some train shards
    sub = cut_subset(built, out, max_mb=budget, val_mb=shard * 1.2)
    assert sum(p.stat().st_size for p in out.iterdir()) <= budget * (1 << 20)
    assert 1 <= len(sub.splits["train"]) < len(full.splits["train"])
    assert sub.splits["train"] == full.splits["train"][: len(sub.splits["train"])]
    assert sub.splits["val"] == full.splits["val"][:1]
    for info in sub.splits["train"]:
        assert (out / info.name).read_bytes() == (built / info.name).read_bytes()
    assert Manifest.load(out).tokenizer == full.tokenizer
    tokenizer = full.tokenizer.file
    assert (out / tokenizer).read_bytes() == (built / tokenizer).read_bytes()
    assert json.loads((out / "debian_packages.json").read_text()) == {"x": 1}
    record = json.loads((out / "subset.json").read_text())
    assert record["source_fingerprint"] == full.fingerprint()
    assert (
        sum(
            1
            for _ in eval_batches(
                str(out), "val", batch_size=2, num_batches=1, dp_rank=0, dp_size=1
            )
        )
        == 1
    )
    with pytest.raises(ConfigError, match="no room for one train shard"):
        cut_subset(built, tmp_path / "tiny", max_mb=0.01)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "launcher.cli",
            "data",
            "subset",
            str(built),
            "--out",
            str(out),
            "--max-mb",
            str(budget),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "already exists" in done.stderr
