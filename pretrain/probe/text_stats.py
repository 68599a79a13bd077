"""Quality statistics of generated token sequences against a reference corpus (token ids).

    unigram_js      Jensen-Shannon divergence (nats, in [0, log 2]) between the generated and
                    the reference unigram distributions: 0 = same token frequencies
    bigram_seen     share of the generated bigrams that occur in the reference corpus
    repetition      share of repeated n-grams within each sample (1 - distinct / total n-grams,
                    averaged over samples): degenerate loops score high
    immediate_repeat  share of tokens equal to the token before them
    eos_share       share of generated tokens that are `<eos>`

Everything is computed on the generated positions only (not the prompt), with ids, so any
tokenizer works; `text_stats` returns them all as one dict.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch


def unigram_js(generated: Sequence[int], reference: Counter) -> float:
    counts = Counter(generated)
    total_g, total_r = sum(counts.values()), sum(reference.values())
    if not total_g or not total_r:
        return math.nan
    js = 0.0
    for token in set(counts) | set(reference):
        p, q = counts[token] / total_g, reference[token] / total_r
        m = (p + q) / 2
        js += (p * math.log(p / m) if p else 0.0) + (q * math.log(q / m) if q else 0.0)
    return js / 2


def bigrams(rows: Sequence[Sequence[int]]) -> Counter:
    out: Counter = Counter()
    for row in rows:
        out.update(zip(row[:-1], row[1:], strict=False))
    return out


def repetition(rows: Sequence[Sequence[int]], n: int = 4) -> float:
    values = []
    for row in rows:
        grams = [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]
        if grams:
            values.append(1.0 - len(set(grams)) / len(grams))
    return sum(values) / len(values) if values else math.nan


def text_stats(
    generated: torch.Tensor,
    reference: torch.Tensor,
    *,
    eos_id: int,
    reference_bigrams: Counter | None = None,
) -> dict[str, float]:
    """generated [n, g] ids (the decoded span only), reference [m, s] ids (e.g. validation
    sequences) -> the statistics above."""
    rows = generated.tolist()
    flat = [t for row in rows for t in row]
    ref_rows = reference.tolist()
    ref_unigrams = Counter(t for row in ref_rows for t in row)
    ref_bigrams = reference_bigrams if reference_bigrams is not None else bigrams(ref_rows)
    gen_bigrams = bigrams(rows)
    total = sum(gen_bigrams.values())
    seen = sum(c for pair, c in gen_bigrams.items() if pair in ref_bigrams)
    pairs = sum(len(row) - 1 for row in rows)
    same = sum(a == b for row in rows for a, b in zip(row[:-1], row[1:], strict=False))
    return {
        "unigram_js": unigram_js(flat, ref_unigrams),
        "bigram_seen": seen / total if total else math.nan,
        "repetition_4gram": repetition(rows, 4),
        "immediate_repeat": same / pairs if pairs else math.nan,
        "eos_share": flat.count(eos_id) / len(flat) if flat else math.nan,
    }
