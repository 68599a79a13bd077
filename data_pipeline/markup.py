"""Documentation markup -> plain prose paragraphs, for building a real-text corpus.

One converter per source format (registry `CONVERTERS`), each `str -> list[str]` of paragraphs:

    rst       reStructuredText (Sphinx sources, kernel docs): titles kept, adornments, comments,
              tables, code/literal blocks and code-like directives dropped, roles and inline
              markup reduced to their text
    pod       Perl POD: headings and items kept, verbatim (code) paragraphs dropped, formatting
              codes (C<>, L<text|target>, E<gt>, ...) reduced to their text
    asciidoc  AsciiDoc (git's manual pages): listing/literal/comment blocks, attribute and
              conditional lines dropped, `linkgit:git-x[1]` -> git-x
    html      HTML (and XML help formats: Mallard pages, DocBook): text of paragraphs, list
              items, headings and definitions; scripts, styles, navigation/sidebars/footers,
              <pre> blocks, screens and tables dropped
    markdown  fenced and indented code dropped, links and emphasis reduced to their text
    text      plain text: paragraphs reflowed, indented (code-like) blocks dropped

Paragraphs are reflowed onto one line (hard line breaks in sources are layout, not content),
except that list items start their own line. Judging whether a paragraph is prose, and
deduplication, live in `data_pipeline.doc_corpus`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from html.parser import HTMLParser

Converter = Callable[[str], list[str]]
CONVERTERS: dict[str, Converter] = {}


def register_converter(name: str):
    def wrap(fn: Converter) -> Converter:
        CONVERTERS[name] = fn
        return fn

    return wrap


_BULLET = re.compile(r"^(?:[-*+\u2022]|#\.|\d{1,3}[.)]|[a-z][.)])\s+")
_SPACES = re.compile(r"\s+")


def reflow(lines: list[str]) -> str:
    """Join a paragraph's lines with spaces; list items (bullet or numbered) start a new line."""
    out: list[str] = []
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        bullet = _BULLET.match(line)
        if bullet:
            out.append("- " + line[bullet.end() :])
        elif out:
            out[-1] += " " + line
        else:
            out.append(line)
    return "\n".join(_SPACES.sub(" ", item).strip() for item in out)


def paragraphs_of(lines: list[str]) -> list[str]:
    """Blank-line separated blocks of `lines`, each reflowed; empty blocks dropped."""
    out, block = [], []
    for line in [*lines, ""]:
        if line.strip():
            block.append(line)
        elif block:
            text = reflow(block)
            if text:
                out.append(text)
            block = []
    return out


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


# ---------------------------------------------------------------- reStructuredText

# directives whose body is code, layout or machinery rather than prose: dropped with their body
_RST_DROP = {
    "code", "code-block", "sourcecode", "literalinclude", "include", "toctree", "image",
    "figure", "math", "table", "csv-table", "list-table", "flat-table", "raw", "highlight",
    "index", "kernel-doc", "kernel-include", "kernel-abi", "kernel-feat", "kernel-figure",
    "kernel-render", "graphviz", "digraph", "productionlist", "doctest", "testcode",
    "testoutput", "testsetup", "testcleanup", "ipython", "plot", "autosummary", "automodule",
    "autoclass", "autofunction", "automethod", "autodata", "autoattribute", "contents",
    "sectnum", "parsed-literal", "only", "ifconfig", "tabularcolumns", "cssclass", "role",
    "default-role", "currentmodule", "module", "program", "option", "envvar", "cmdoption",
    "literal", "jinja", "code-tab", "tab", "tabs", "uml", "mermaid", "cfunction", "c:macro",
    "c:type", "c:function", "c:struct", "c:var", "c:member", "c:enum", "c:enumerator",
}  # fmt: skip
_RST_DIRECTIVE = re.compile(r"^\.\.\s+([\w:.-]+)::(.*)$")
_RST_ADORNMENT = re.compile(r"^([=\-~^\"'`#*+<>_:.])\1{2,}\s*$")
_RST_SIMPLE_TABLE = re.compile(r"^=+(?:\s+=+)+\s*$")
_RST_GRID = re.compile(r"^\s*[+|]")
_RST_FIELD = re.compile(r"^:[\w\s.-]+:(\s+|$)")


def rst_inline(text: str) -> str:
    """Inline markup -> its text: roles, hyperlinks, literals, emphasis, substitutions."""
    text = re.sub(r"(?::[\w:.-]+:)?`([^`]*?)\s*<[^<>`]*>`_{0,2}", r"\1", text)  # `t <u>`_ / role
    text = re.sub(r":(pep|rfc):`(\d+)[^`]*`", lambda m: f"{m.group(1).upper()} {m.group(2)}", text)
    text = re.sub(r":[\w:.-]+:`[!~]?([^`]*)`", r"\1", text)  # :role:`target`
    text = re.sub(r"``(.+?)``", r"\1", text)  # ``literal``
    text = re.sub(r"`([^`]+)`_{0,2}", r"\1", text)  # `ref`_ and `interpreted`
    text = re.sub(r"\[(?:#\w*|\*|\d+)\]_", "", text)  # footnote references
    text = re.sub(r"\|[\w -]+\|_{0,2}", "", text)  # |substitution|
    text = re.sub(r"\*\*(.+?)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"\1", text)
    text = re.sub(r"(?<![\w-])([A-Za-z][\w-]*[A-Za-z0-9])_(?=[\s.,;:)]|$)", r"\1", text)  # ref_
    return text.replace("\\ ", "").replace("\\", "")


@register_converter("rst")
def rst_to_paragraphs(src: str) -> list[str]:
    lines = src.expandtabs(8).splitlines()
    kept: list[str] = []
    i, n = 0, len(lines)

    def skip_block(start: int, base: int) -> int:
        """Index after the indented body (deeper than `base`) that starts at `start`."""
        j = start
        while j < n and (not lines[j].strip() or _indent(lines[j]) > base):
            j += 1
        return j

    while i < n:
        line = lines[i]
        stripped = line.strip()
        ind = _indent(line)
        if stripped == ".." or stripped.startswith(".. "):
            directive = _RST_DIRECTIVE.match(stripped)
            if directive and directive.group(1).lower() not in _RST_DROP:
                # prose-carrying directive (note, warning, function, ...): keep its body text
                # (the signature / argument line is dropped), skip its option fields
                arg = directive.group(2).strip()
                if directive.group(1).lower() in ("rubric", "topic", "sidebar", "admonition"):
                    kept += ["", arg, ""] if arg else [""]
                i += 1
                while i < n and lines[i].strip().startswith(":") and _indent(lines[i]) > ind:
                    i += 1
                kept.append("")
                continue
            # dropped directive, comment, target (.. _x:), footnote, substitution definition
            i = skip_block(i + 1, ind)
            kept.append("")
            continue
        if _RST_SIMPLE_TABLE.match(stripped):
            # a simple table: border, header, border, rows, border; dropped whole
            borders, i = 1, i + 1
            while i < n and borders < 3:
                if _RST_SIMPLE_TABLE.match(lines[i].strip()):
                    borders += 1
                elif (
                    not lines[i].strip()
                    and borders >= 2
                    and i + 1 < n
                    and not _RST_SIMPLE_TABLE.match(lines[i + 1].strip())
                ):
                    break
                i += 1
            kept.append("")
            continue
        if stripped.startswith("+-") or stripped.startswith("+="):
            while i < n and _RST_GRID.match(lines[i]):  # grid table
                i += 1
            kept.append("")
            continue
        if _RST_ADORNMENT.match(stripped):  # section over/underline: the title stays alone
            if kept and kept[-1].strip():
                kept.insert(len(kept) - 1, "")
            kept.append("")
            i += 1
            continue
        if _RST_FIELD.match(stripped):  # :Author: x, :param y: text -> the text
            rest = _RST_FIELD.sub("", stripped, count=1)
            kept.append(" " * ind + rest if len(rest.split()) >= 4 else "")
            i += 1
            continue
        if stripped.endswith("::"):
            # a literal block follows: keep the sentence (with one colon), drop the block
            head = stripped[:-2].rstrip()
            if head:
                kept.append(" " * ind + head + ("" if head.endswith(":") else ":"))
            j = i + 1
            while j < n and not lines[j].strip():
                j += 1
            i = skip_block(j, ind) if j < n and _indent(lines[j]) > ind else j
            kept.append("")
            continue
        if stripped.startswith(">>>"):  # doctest block: runs to the next blank line
            while i < n and lines[i].strip():
                i += 1
            continue
        kept.append(line)
        i += 1
    return [p for p in (rst_inline(p) for p in paragraphs_of(kept)) if p.strip()]


# ---------------------------------------------------------------- POD

_POD_CODE = re.compile(r"([A-Z])<(<+)\s(.*?)\s\2>")  # C<< a <=> b >>
_POD_SIMPLE = re.compile(r"([A-Z])<([^<>]*)>")
_POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&"}


def _pod_code(kind: str, body: str) -> str:
    if kind in ("X", "Z"):
        return ""
    if kind == "E":
        if body.isdigit():
            return chr(int(body))
        return _POD_ENTITIES.get(body, "")
    if kind == "L":
        text = body.split("|", 1)[0] if "|" in body else body
        text = text.strip('"')
        if "://" in text:
            return text
        return text.split("/", 1)[0] or text.split("/", 1)[-1].strip('"')
    return body


def pod_inline(text: str) -> str:
    text = _POD_CODE.sub(lambda m: _pod_code(m.group(1), m.group(3)), text)
    for _ in range(8):  # innermost codes first: B<C<x>> needs two passes
        new = _POD_SIMPLE.sub(lambda m: _pod_code(m.group(1), m.group(2)), text)
        if new == text:
            break
        text = new
    return text


@register_converter("pod")
def pod_to_paragraphs(src: str) -> list[str]:
    out: list[str] = []
    skipping = None  # inside =begin X ... =end X
    in_pod = not src.lstrip().startswith(("#!", "package ", "use "))
    for block in re.split(r"\n\s*\n", src.expandtabs(8)):
        if not block.strip():
            continue
        first = block.lstrip("\n")
        if first.startswith("="):
            command, _, rest = first[1:].partition(" ")
            command = command.split("\n", 1)[0]
            rest = rest.strip()
            if command == "cut":
                in_pod = False
            elif command == "begin":
                skipping, in_pod = rest.split()[0] if rest else "", True
            elif command == "end":
                skipping = None
            else:
                in_pod = True
                if skipping is None and command.startswith("head") and rest:
                    out.append(pod_inline(" ".join(rest.split())))
                elif skipping is None and command == "item" and rest:
                    text = re.sub(r"^(\*|\d+\.?)\s*", "", " ".join(rest.split()))
                    if text:
                        out.append("- " + pod_inline(text))
            continue
        if not in_pod or skipping is not None or first[:1] in (" ", "\t"):
            continue  # code outside POD, a =begin region, or a verbatim (code) paragraph
        text = pod_inline(reflow(block.splitlines()))
        if text:
            out.append(text)
    return out


# ---------------------------------------------------------------- AsciiDoc

_ADOC_DELIMITER = re.compile(r"^(-{4,}|\.{4,}|\+{4,}|/{4,}|={4,}|_{4,}|\*{4,})\s*$")


@register_converter("asciidoc")
def asciidoc_to_paragraphs(src: str) -> list[str]:
    kept: list[str] = []
    lines = src.expandtabs(8).splitlines()
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        stripped = line.strip()
        delim = _ADOC_DELIMITER.match(stripped)
        if delim:
            if (
                stripped[0] in "-=~^"
                and kept
                and kept[-1].strip()
                and len(stripped) >= 3
                and (abs(len(stripped) - len(kept[-1].strip())) <= 2)
            ):
                kept.insert(len(kept) - 1, "")  # a title's underline: the title stays alone
                kept.append("")
                i += 1
                continue
            end = stripped
            i += 1
            while i < n and lines[i].strip() != end:  # listing / literal / comment block
                i += 1
            i += 1
            kept.append("")
            continue
        if re.match(r"^(\[.*\]|:[\w-]+:.*|//.*|ifn?def::.*|endif::.*|include::.*)$", stripped):
            i += 1
            continue
        if stripped and line[:1] in (" ", "\t") and not _BULLET.match(stripped):
            while i < n and lines[i].strip():  # literal paragraph (indented): code or output
                i += 1
            kept.append("")
            continue
        stripped = re.sub(r"^=+\s+", "", stripped)  # == Title
        if stripped.endswith("::") or stripped.endswith(";;"):
            stripped = stripped[:-2] + ":"  # definition-list term
            kept += ["", stripped, ""]
            i += 1
            continue
        kept.append(stripped)
        i += 1
    text_of = []
    for para in paragraphs_of(kept):
        para = re.sub(r"linkgit:([\w.-]+)\[\d\]", r"\1", para)
        para = re.sub(r"(?:link|https?):\S*?\[([^\]]*)\]", r"\1", para)
        para = re.sub(
            r"<<[^,>]*,\s*([^>]*)>>|<<([^>]*)>>", lambda m: m.group(1) or m.group(2), para
        )
        para = re.sub(r"`([^`]*)`|\+([^+\s][^+]*)\+", lambda m: m.group(1) or m.group(2), para)
        para = re.sub(r"(?<!\w)'([^'\s][^']*)'(?!\w)", r"\1", para)
        para = re.sub(r"(?<!\w)\*([^*\s][^*]*)\*(?!\w)", r"\1", para)
        para = para.replace("{litdd}", "--").replace("{caret}", "^").replace(" +\n", "\n")
        if para.strip():
            text_of.append(para)
    return text_of


# ---------------------------------------------------------------- HTML

_HTML_SKIP_TAGS = {
    "script", "style", "nav", "header", "footer", "pre", "table", "svg", "math", "form",
    "button", "select", "noscript", "head", "aside", "iframe", "object", "textarea", "screen",
    "info", "programlisting", "synopsis", "links",
}  # fmt: skip
# class tokens (exact, or by prefix) and roles of page furniture: navigation, sidebars, headers
# and footers, search boxes, code listings and permalink markers
_HTML_SKIP_CLASSES = {
    "related", "copyright", "synopsis", "screen", "programlisting", "literal-block", "src",
    "srclink", "out-of-band", "since", "anchor", "wy-nav-side", "rst-versions", "version",
    "mobile-topbar", "sub-heading", "example-wrap", "docblock-short", "sphinxsidebarwrapper",
}  # fmt: skip
_HTML_SKIP_PREFIXES = (
    "sidebar", "sphinxsidebar", "nav", "breadcrumb", "toc", "footer", "header", "menu", "search",
    "highlight", "wy-menu", "wy-side", "wy-breadcrumbs", "rst-footer",
)  # fmt: skip
_HTML_SKIP_ROLES = {"navigation", "search", "banner", "contentinfo", "complementary"}


def _furniture(attrs: list[tuple[str, str | None]]) -> bool:
    for key, value in attrs:
        if not value:
            continue
        if key == "role" and value in _HTML_SKIP_ROLES:
            return True
        if key in ("class", "id"):
            for token in value.lower().split():
                if token in _HTML_SKIP_CLASSES or token.startswith(_HTML_SKIP_PREFIXES):
                    return True
    return False


_HTML_BLOCKS = {
    "p", "div", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "br", "blockquote",
    "section", "article", "main", "body", "ul", "ol", "dl", "figcaption", "caption", "hr",
    "details", "summary", "td", "th", "tr", "title", "item", "note", "desc", "page", "list",
    "terms", "steps", "tree", "para", "listitem", "entry",
}  # fmt: skip
_HTML_VOID = {"br", "img", "hr", "meta", "link", "input", "wbr", "area", "base", "col", "embed"}


class _TextExtractor(HTMLParser):
    """Paragraphs of a page as segments: [furniture?, paragraphs]. Hard skips (scripts, code,
    tables) are dropped outright; furniture (by class or role) is kept aside, because some
    generators wrap the whole page in it (Qt's unclosed `header` div, Sphinx's single-page
    `toctree-wrapper`): `html_to_paragraphs` keeps a furniture region that holds most of the
    page's text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.segments: list[tuple[bool, list[str]]] = [(False, [])]
        self.buffer: list[str] = []
        self.skip: tuple[str, int] | None = None  # (tag that opened the dropped region, depth)
        self.furniture: tuple[str, int] | None = None  # the same for the furniture region
        self.item = False

    def flush(self) -> None:
        text = _SPACES.sub(" ", "".join(self.buffer)).strip()
        if text:
            self.segments[-1][1].append(("- " if self.item else "") + text)
        self.buffer, self.item = [], False

    @staticmethod
    def _nest(region, tag, step):
        """Same-tag depth counting of a region's opening tag: None once it closes."""
        if region is None or tag != region[0] or tag in _HTML_VOID:
            return region
        depth = region[1] + step
        return None if depth == 0 else (tag, depth)

    def handle_starttag(self, tag, attrs):
        if self.skip is not None:
            self.skip = self._nest(self.skip, tag, +1)
            return
        if tag in _HTML_SKIP_TAGS:
            if tag not in _HTML_VOID:
                self.flush()
                self.skip = (tag, 1)
            return
        if self.furniture is not None:
            self.furniture = self._nest(self.furniture, tag, +1)
        # the page's outer elements carry layout classes ("sidebar-visible") but hold the content
        elif tag not in ("html", "body", "main", "article") and _furniture(attrs):
            if tag not in _HTML_VOID:
                self.flush()
                self.furniture = (tag, 1)
                self.segments.append((True, []))
            return
        if tag in _HTML_BLOCKS:
            self.flush()
            self.item = tag == "li"

    def handle_endtag(self, tag):
        if self.skip is not None:
            self.skip = self._nest(self.skip, tag, -1)
            return
        if tag in _HTML_BLOCKS:
            self.flush()
        if self.furniture is not None:
            self.furniture = self._nest(self.furniture, tag, -1)
            if self.furniture is None:
                self.flush()
                self.segments.append((False, []))

    def handle_data(self, data):
        if self.skip is None:
            self.buffer.append(data)


@register_converter("html")
def html_to_paragraphs(src: str) -> list[str]:
    parser = _TextExtractor()
    parser.feed(src)
    parser.close()
    parser.flush()
    total = sum(len(p) for _, paragraphs in parser.segments for p in paragraphs)
    out = []
    for furniture, paragraphs in parser.segments:
        if furniture and sum(len(p) for p in paragraphs) < 0.5 * total:
            continue  # navigation, sidebars, headers: a small part of the page
        out += [p.replace("\u00b6", "").strip() for p in paragraphs if p.strip("\u00b6 ")]
    return out


# ---------------------------------------------------------------- Markdown and plain text


@register_converter("markdown")
def markdown_to_paragraphs(src: str) -> list[str]:
    kept: list[str] = []
    fence = None
    for line in src.expandtabs(4).splitlines():
        stripped = line.strip()
        if fence is not None:
            if stripped.startswith(fence):
                fence = None
            continue
        if stripped.startswith(("```", "~~~")):
            fence = stripped[:3]
            kept.append("")
            continue
        if line.startswith("    ") or stripped.startswith(("|", "<!--", "[//]")):
            kept.append("")  # indented code, a table row, a comment
            continue
        if re.match(r"^#{1,6}\s", stripped):
            kept += ["", stripped.lstrip("#").strip(), ""]
            continue
        kept.append(stripped)
    out = []
    for para in paragraphs_of(kept):
        para = re.sub(r"!?\[([^\]]*)\]\([^)]*\)|\[([^\]]*)\]\[[^\]]*\]", r"\1\2", para)
        para = re.sub(r"`([^`]*)`|\*\*([^*]+)\*\*|__([^_]+)__", r"\1\2\3", para)
        para = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", para)
        if para.strip() and not _RST_ADORNMENT.match(para.strip()):
            out.append(para)
    return out


@register_converter("text")
def text_to_paragraphs(src: str) -> list[str]:
    lines = src.expandtabs(8).splitlines()
    indents = [_indent(line) for line in lines if line.strip()]
    # a text file indented as a whole (a rendered page) is dedented; inside it, deeper blocks
    # are code or output
    base = min(indents) if indents else 0
    kept = []
    for line in lines:
        code = line.strip() and _indent(line) - base >= 4 and not _BULLET.match(line.strip())
        if code or _RST_ADORNMENT.match(line.strip()):
            kept.append("")
        else:
            kept.append(line)
    return paragraphs_of(kept)
