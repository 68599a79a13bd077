"""The demo grammar's number-agreement tasks (`tasks/dlm_agreement*.yaml`).

Each document is a minimal pair from `data_pipeline.grammar`: a sentence split before its main
verb, and the same sentence with the verb's number swapped:

    long   the key to the cabinets | is red .   /  ... | are red .
           a modifier separates the subject's head from the verb (2+ words, often a noun of the
           other number: an attractor). The modifier never repeats the head's number in a verb of
           its own (no subject-gap relatives), so the only cues are the head and its determiner.
    local  she | likes tennis .   /   she | like tennis .
           the verb follows the head directly (pronoun, name or unmodified noun phrase).

`dlm_agreement` is the group of `dlm_agreement_local` and `dlm_agreement_long` (400 pairs each,
multiple choice: which continuation is more likely; chance = 0.5). `dlm_agreement_gen` lets the
model complete the long subjects and scores whether the sentence parses and agrees.

    python -m pretrain.evaluation.agreement [OUT.jsonl]    rebuilds tasks/agreement.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from data_pipeline.grammar import (
    LEXICON,
    NUMBER_SWAP,
    check_agreement,
    generate_documents,
    main_verb_index,
    split_sentences,
)

TASK_FILE = Path(__file__).resolve().parent / "tasks" / "agreement.jsonl"
KINDS = ("local", "long")
PAIRS = 400
"""Pairs of each kind."""
SEED = 20240518
"""Not a seed any corpus build uses by default (the demo corpus uses 0)."""
DOCUMENTS = 1000
"""Grammar documents the pairs are drawn from."""


def kind_of(distance: int) -> str | None:
    """Words between head and verb -> the pair's kind (None: neither)."""
    return "local" if distance == 0 else "long" if distance >= 2 else None


def _leaks_number(between: list[str]) -> bool:
    """A subject-gap relative clause ("the pictures that are broken") repeats the head's number
    in its own verb, which would give the answer away; object-gap relatives ("the girl who the
    boys see") and prepositional phrases do not (their nouns and verbs are attractors at most)."""
    verbs = {"VT", "VI", "COP"}
    return any(
        "REL" in LEXICON[w] and verbs & set(LEXICON[nxt])
        for w, nxt in zip(between, between[1:], strict=False)
    )


def minimal_pair(sentence: str) -> dict | None:
    """The document for one grammatical sentence, or None when it has no usable verb swap."""
    result = check_agreement(sentence)
    if not (result.parsed and result.agrees) or kind_of(result.distance) is None:
        return None
    words = sentence.split()
    verb = main_verb_index(sentence)
    wrong = NUMBER_SWAP.get(words[verb])
    if wrong is None:
        return None
    swapped = [*words[:verb], wrong, *words[verb + 1 :]]
    bad = check_agreement(" ".join(swapped))
    if not bad.parsed or bad.agrees:
        return None
    head = words[verb - result.distance - 1]
    between = words[verb - result.distance : verb]
    if _leaks_number(between):
        return None
    number = LEXICON[head].get("NOUN")
    attractor = number is not None and any(
        LEXICON[w].get("NOUN") not in (None, number) for w in between
    )
    return {
        "kind": kind_of(result.distance),
        "prefix": " ".join(words[:verb]),
        "good": " ".join(words[verb:]),
        "bad": " ".join(swapped[verb:]),
        "distance": result.distance,
        "attractor": attractor,
    }


def build_pairs(count: int = PAIRS, seed: int = SEED) -> list[dict]:
    """`count` distinct minimal pairs of each kind (local first), deterministic in `seed`."""
    found: dict[str, list[dict]] = {k: [] for k in KINDS}
    seen = set()
    for text in generate_documents(DOCUMENTS, seed=seed):
        for sentence in split_sentences(text):
            pair = minimal_pair(sentence)
            if pair and (key := pair["prefix"] + " " + pair["good"]) not in seen:
                seen.add(key)
                found[pair["kind"]].append(pair)
    for kind, pairs in found.items():
        if len(pairs) < count:
            raise ValueError(f"only {len(pairs)} {kind} pairs in {DOCUMENTS} documents")
    return [p for kind in KINDS for p in found[kind][:count]]


def write_pairs(path: Path = TASK_FILE, count: int = PAIRS, seed: int = SEED) -> Path:
    lines = [json.dumps(p, sort_keys=True) for p in build_pairs(count, seed)]
    path.write_text("\n".join(lines) + "\n")
    return path


# -- hooks the task YAMLs name with `!function utils.<name>` ------------------------------------
def load_pairs(kind: str):
    """The task's only split, `test`, from the JSONL next to the YAML (no download, no cache)."""
    import datasets

    rows = [json.loads(line) for line in TASK_FILE.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["kind"] == kind]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_local(**_metadata):
    return load_pairs("local")


def load_long(**_metadata):
    return load_pairs("long")


def completion_results(doc: dict, results: list[str]) -> dict[str, int]:
    """`dlm_agreement_gen`: the subject plus the model's completion, as one sentence."""
    sentence = f"{doc['prefix']} {results[0].strip()} ."
    result = check_agreement(sentence)
    return {"agrees": int(result.parsed and result.agrees), "parses": int(result.parsed)}


if __name__ == "__main__":
    print(write_pairs(Path(sys.argv[1]) if len(sys.argv) > 1 else TASK_FILE))
