"""Infilling templates for `dlm generate --template`.

Syntax: text with mask spans `[MASK:n]` (n masked tokens to decode) or `[MASK]` (one), anywhere:
at the start, in the middle, at the end, several of them:

    "The cat [MASK:5] on the mat."
    "[MASK:8] is the capital of France. [MASK:16]"

The text between spans is tokenized piece by piece (our byte-level BPE keeps the spaces of each
piece, so "cat " and " on" keep theirs) and stays exactly as given; only the spans are decoded.
The counts are in tokens, not words. `[MASK` followed by anything else is an error, so a typo
never turns silently into literal text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pretrain.errors import ConfigError

SPAN = re.compile(r"\[MASK(?::(\d+))?\]")


@dataclass(frozen=True)
class Template:
    ids: torch.Tensor
    """[s] long: the context tokens, `mask_id` in every span."""
    spans: list[tuple[int, int]]
    """(start, end) token positions of each mask span, in order."""


def parse_template(text: str, tokenizer, mask_id: int, *, where: str = "--template") -> Template:
    leftover = SPAN.sub("", text)
    if "[MASK" in leftover:
        near = leftover[leftover.find("[MASK") :][:20]
        raise ConfigError(f"{where}: malformed mask span '{near}'; expected [MASK] or [MASK:n]")
    pieces: list[int] = []
    spans: list[tuple[int, int]] = []
    at = 0
    for match in SPAN.finditer(text):
        pieces += tokenizer.encode(text[at : match.start()]).ids if match.start() > at else []
        count = int(match.group(1)) if match.group(1) is not None else 1
        if count <= 0:
            raise ConfigError(f"{where}: {match.group(0)} asks for no tokens; expected n >= 1")
        spans.append((len(pieces), len(pieces) + count))
        pieces += [mask_id] * count
        at = match.end()
    rest = text[at:]
    if not spans:
        raise ConfigError(f"{where}: '{text[:40]}' has no mask span; expected [MASK] or [MASK:n]")
    pieces += tokenizer.encode(rest).ids if rest else []
    return Template(torch.tensor(pieces, dtype=torch.long), spans)


def mark_spans(tokenizer, ids: list[int], spans: list[tuple[int, int]]) -> str:
    """Decoded text with every decoded span wrapped in `[[ ]]`."""
    out, at = [], 0
    for start, end in spans:
        out += [tokenizer.decode(ids[at:start]), "[[", tokenizer.decode(ids[start:end]), "]]"]
        at = end
    out.append(tokenizer.decode(ids[at:]))
    return "".join(out)
