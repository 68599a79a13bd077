"""A prose corpus from extracted documentation trees (e.g. Debian `-doc` packages).

    select_files(root, spec)      the files of one package tree worth reading, with their format
    read_documents(...)           -> one document per file (long files: one per section), each a
                                   list of prose paragraphs (markup from `data_pipeline.markup`)
    Deduper                       exact duplicate documents and repeated long paragraphs dropped
    is_prose / english_share      the filters that drop code-heavy and non-English text

The order of everything is deterministic (sorted paths), so the same packages give the same
JSONL, byte for byte. `scripts/real_corpus.py` drives it (apt download, extraction, shards).
"""

from __future__ import annotations

import gzip
import hashlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from data_pipeline.markup import CONVERTERS


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


# The most frequent English function words: their share of a text's words separates English
# prose (~0.3-0.45) from code, tables of symbols and other languages (< 0.1).
STOPWORDS = _words(
    """a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers him his how i if in into is it its itself just
    may me might more most must my no nor not now of off on once only or other our out over own
    same shall she should so some such than that the their them then there these they this those
    through to too under until up very was we were what when where which while who whom why will
    with would you your"""
)
# two-letter ISO 639-1 codes (and a few regional forms) that mark a translated copy in a path
LANGUAGES = _words(
    """ar bg bn ca cs cy da de el eo es et eu fa fi fr ga gl gu he hi hr hu hy id is it ja ka kk
    km kn ko lt lv mk ml mr ms nb ne nl nn no pa pl pt ro ru si sk sl sq sr sv ta te th tl tr uk
    ur vi zh pt-br pt_br zh-cn zh_cn zh-tw zh_tw sr-latn ja_jp"""
)
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
_SKIP_NAME = re.compile(
    r"^(copyright|changelog.*|news(\.debian)?|readme\.debian|genindex.*|py-modindex.*|search"
    r"|searchindex.*|objects\.inv|robots\.txt|sitemap.*|index-\w+|license.*)(\.gz)?$",
    re.IGNORECASE,
)
_SKIP_DIR = {"_static", "_images", "_downloads", "_modules", "images", "static", "fonts", "js"}


@dataclass(frozen=True)
class PackageSpec:
    """How to read one documentation package."""

    name: str
    formats: tuple[tuple[str, str], ...] = ()
    """(file-name suffix, converter) pairs checked before the built-in suffixes, e.g.
    `((".txt", "asciidoc"),)` for git's manual pages or `((".page", "html"),)` for Mallard help.
    Without one, `.txt` files that are not Sphinx `.rst.txt` sources are skipped (mostly renders
    of HTML kept alongside)."""
    html: bool = False
    """Read the rendered HTML even where a markup source sits next to it (and skip Sphinx's
    `_sources/`): for API references generated from docstrings (autodoc, kernel-doc), whose
    sources are a list of directives and whose text exists only in the HTML."""
    include: str | None = None
    """Regex a path (relative to the package root) must match; None takes everything."""
    exclude: str | None = None
    """Regex of paths to leave out."""


def format_of(path: Path, spec: PackageSpec) -> str | None:
    """The converter for `path` (None: not read). A trailing `.gz` is looked through."""
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix, converter in spec.formats:
        if name.endswith(suffix):
            return converter
    if name.endswith((".rst.txt", ".rst", ".rest")):
        return "rst"
    if name.endswith((".md.txt", ".md", ".markdown")):
        return "markdown"
    if name.endswith(".pod"):
        return "pod"
    if name.endswith((".html", ".htm", ".xhtml")):
        return "html"
    return None


_LOCALE = re.compile(r"^([a-z]{2})(?:[-_][a-z]{2,4})?$")


def _is_language(name: str) -> bool:
    """`fr`, `pt-BR`, `zh_CN`, `nb-NO`: a language code other than English."""
    match = _LOCALE.match(name.lower())
    return bool(match) and (match.group(0) in LANGUAGES or match.group(1) in LANGUAGES)


def _translated(rel: Path) -> bool:
    """True for a translated copy: a path component or a name suffix that is a language code."""
    if any(_is_language(p) for p in rel.parts[:-1]):
        return True
    stem = rel.parts[-1].lower()
    for ext in (".gz", ".html", ".htm", ".txt", ".xhtml"):
        stem = stem.removesuffix(ext)
    return "." in stem and _is_language(stem.rsplit(".", 1)[1])


def _has_source(path: Path) -> bool:
    """An HTML page whose markup source sits next to it (a Sphinx `_sources/` tree or a same-stem
    `.txt`, as git's manual pages have): the source is read instead."""
    stem = path.name.split(".html")[0]
    if (path.parent / f"{stem}.txt").exists():
        return True
    for ancestor in path.parents:
        sources = ancestor / "_sources"
        if sources.is_dir():
            rel = path.relative_to(ancestor).with_name(stem)
            return any(
                (sources / f"{rel}{ext}").exists() for ext in (".rst.txt", ".txt", ".md.txt")
            )
    return False


def select_files(root: Path, spec: PackageSpec) -> list[tuple[Path, str]]:
    """(path, format) of every readable file under `root`, sorted by path."""
    include = re.compile(spec.include) if spec.include else None
    exclude = re.compile(spec.exclude) if spec.exclude else None
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        rel = path.relative_to(root)
        if _SKIP_NAME.match(path.name) or _SKIP_DIR.intersection(rel.parts[:-1]):
            continue
        if (include and not include.search(str(rel))) or (exclude and exclude.search(str(rel))):
            continue
        fmt = format_of(path, spec)
        if fmt is None or _translated(rel):
            continue
        if spec.html and "_sources" in rel.parts:
            continue
        if fmt == "html" and not spec.html and _has_source(path):
            continue
        out.append((path, fmt))
    return out


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def english_share(text: str) -> float:
    """Fraction of the words of `text` that are English function words (0 without words)."""
    words = _WORD.findall(text)
    return sum(w.lower() in STOPWORDS for w in words) / len(words) if words else 0.0


def is_prose(paragraph: str) -> bool:
    """Keep a paragraph that reads as English text: mostly letters, and a long one must contain
    function words (a list of identifiers, a code line or a table row has none)."""
    visible = [c for c in paragraph if not c.isspace()]
    if not visible:
        return False
    letters = sum(c.isalpha() for c in visible) / len(visible)
    if letters < 0.65 or "\ufffd" in paragraph:
        return False
    words = _WORD.findall(paragraph)
    if len(words) <= 3 and paragraph.rstrip().endswith(":"):
        return False  # "For example:" whose example (code) was dropped
    if len(words) >= 12:
        return english_share(paragraph) >= 0.12
    return True


def _heading_like(paragraph: str) -> bool:
    return len(paragraph.split()) <= 10 and not paragraph.rstrip().endswith((".", ":", ","))


def sections(paragraphs: list[str], *, max_chars: int) -> Iterator[list[str]]:
    """Split a long document at headings into parts of at most about `max_chars` characters
    (a part is cut before a heading once it holds half of that, and anywhere at the maximum)."""
    part: list[str] = []
    size = 0
    for para in paragraphs:
        cut = size >= max_chars or (size >= max_chars // 2 and _heading_like(para))
        if part and cut:
            yield part
            part, size = [], 0
        part.append(para)
        size += len(para) + 2
    if part:
        yield part


@dataclass
class Deduper:
    """Drops documents identical to an earlier one (after whitespace and case normalisation) and
    long paragraphs (>= `min_words`) already seen in an earlier document: licence blurbs,
    navigation text and copies of the same page in several places of a package."""

    min_words: int = 8
    documents: set = field(default_factory=set)
    paragraphs: set = field(default_factory=set)
    dropped_documents: int = 0
    dropped_paragraphs: int = 0

    @staticmethod
    def _key(text: str) -> bytes:
        return hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=16).digest()

    def __call__(self, paragraphs: list[str]) -> list[str]:
        key = self._key("\n".join(paragraphs))
        if key in self.documents:
            self.dropped_documents += 1
            return []
        self.documents.add(key)
        kept = []
        for para in paragraphs:
            if len(para.split()) >= self.min_words:
                pkey = self._key(para)
                if pkey in self.paragraphs:
                    self.dropped_paragraphs += 1
                    continue
                self.paragraphs.add(pkey)
            kept.append(para)
        return kept


@dataclass(frozen=True)
class Document:
    text: str
    package: str
    path: str
    """File path inside the package, with `#N` for the N-th section of a long file."""


def clean_file(path: Path, fmt: str) -> list[str]:
    """The prose paragraphs of one file."""
    return [p for p in CONVERTERS[fmt](read_text(path)) if is_prose(p)]


def boilerplate(files: list[list[str]], *, max_words: int = 8, share: float = 0.02) -> set[str]:
    """Short paragraphs (< `max_words` words) that recur in at least `share` of a package's files
    (and at least 5): navigation crumbs, page titles and headers repeated on every page."""
    counts: Counter = Counter()
    for paragraphs in files:
        counts.update({p for p in paragraphs if len(p.split()) < max_words})
    limit = max(5, share * len(files))
    return {p for p, n in counts.items() if n >= limit}


def read_documents(
    trees: Iterable[tuple[PackageSpec, Path]],
    *,
    deduper: Deduper,
    min_words: int = 50,
    min_english: float = 0.2,
    max_chars: int = 16000,
    stats: dict | None = None,
) -> Iterator[Document]:
    """Documents of every package tree, in order. A document (file or section) is kept when it
    has at least `min_words` words and an English function-word share of `min_english` after
    cleaning, the package's boilerplate removed and deduplication. `stats[package]` counts
    files, documents and characters."""
    for spec, root in trees:
        files = select_files(root, spec)
        cleaned = [clean_file(path, fmt) for path, fmt in files]
        repeated = boilerplate(cleaned)
        counts = {"files": len(files), "documents": 0, "characters": 0, "words": 0, "rejected": 0}
        counts["boilerplate_paragraphs"] = len(repeated)
        for (path, _), paragraphs in zip(files, cleaned, strict=True):
            rel = str(path.relative_to(root))
            paragraphs = [p for p in paragraphs if p not in repeated]
            parts = list(sections(paragraphs, max_chars=max_chars))
            for n, part in enumerate(parts):
                part = deduper(part)
                text = "\n\n".join(part)
                words = len(text.split())
                if words < min_words or english_share(text) < min_english:
                    counts["rejected"] += 1
                    continue
                counts["documents"] += 1
                counts["characters"] += len(text)
                counts["words"] += words
                yield Document(text, spec.name, rel if len(parts) == 1 else f"{rel}#{n}")
        if stats is not None:
            stats[spec.name] = counts
