"""Procedural English-like demo corpus with automatically checkable number agreement.

Embedded (no downloads) and fully determined by a seed. The CPU demo trains on it, and its
agreement is a clean probe of the "marginal trap" of parallel decoding in diffusion LMs: two
tokens unmasked in one step from independent marginals can each be plausible yet jointly wrong
("she like tennis", "the dogs near the house runs"). Every sentence comes from the grammar
below, so :func:`check_agreement` can parse model samples back and score them.

Every word is lowercase, including the pronoun ``i`` (one spelling for the tokenizer to learn;
:func:`check_agreement` lowercases its input, so "I" is accepted too). Words are separated by
single spaces and sentences end with a separate ``.`` token.

Grammar (capitalised symbols are word classes of :data:`LEXICON`; ``a ~ b``: ``a`` and ``b``
must agree in person and number)::

    sentence ::= subject vp "."                      subject ~ verb of vp
    subject  ::= SUBJ | NAME | np [pp | rel]
    np       ::= DET ADJ* NOUN                       DET ~ NOUN
    pp       ::= PREP np
    rel      ::= REL VT object                       head NOUN ~ VT  (subject gap)
              |  REL VI                              head NOUN ~ VI
              |  REL COP ADJ                         head NOUN ~ COP
              |  REL inner VT                        inner ~ VT      (object gap)
    inner    ::= SUBJ | NAME | np
    vp       ::= VT object [pp | rel]  |  VI [ADV]  |  COP (ADJ | pp)
    object   ::= OBJ | NAME | MASS | np

Modifiers attach only to the subject and the main-clause object, and the noun phrases inside
them take none, so attachment is unambiguous and the grammar is LL(1) over word classes: the
checker is a plain recursive-descent parser mirroring the generator. Subject modifiers put
2-7 words, often including a noun of the other number (an "attractor"), between head noun and
verb: "the key to the old cabinets is red", "the girl who the boys see likes tennis".

Agreement features are sets of person/number cells (``1sg``, ``2``, ``3sg``, ``1pl``, ``3pl``)
and two words agree when their sets intersect, which covers "i am"/"i was"/"i like" without
special cases. Lexical verbs are present tense only: past forms ("ran") carry no agreement and
would dilute the metric; the copula has both tenses.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

Agr = frozenset[str]
ALL_CELLS: Agr = frozenset({"1sg", "2", "3sg", "1pl", "3pl"})
_SG: Agr = frozenset({"3sg"})
_PL: Agr = frozenset({"3pl"})
_NON_3SG: Agr = ALL_CELLS - _SG

SUBJECT_PRONOUNS: dict[str, str] = {
    "i": "1sg", "you": "2", "he": "3sg", "she": "3sg", "it": "3sg", "we": "1pl", "they": "3pl",
}  # fmt: skip
OBJECT_PRONOUNS = ("me", "you", "him", "her", "it", "us", "them")
NAMES = ("anna", "ben", "tom", "lucy", "sam", "emma", "leo", "nina", "max", "mia")
# Number each determiner forces on its noun; None = compatible with both.
DETERMINERS: dict[str, str | None] = {
    "the": None, "my": None, "your": None, "our": None, "his": None,
    "a": "sg", "an": "sg", "this": "sg", "every": "sg", "these": "pl", "many": "pl", "some": "pl",
}  # fmt: skip
ANIMATE_NOUNS: dict[str, str] = {
    "dog": "dogs", "cat": "cats", "girl": "girls", "boy": "boys", "teacher": "teachers",
    "child": "children", "man": "men", "woman": "women", "bird": "birds", "friend": "friends",
    "student": "students", "doctor": "doctors", "farmer": "farmers", "horse": "horses",
}  # fmt: skip
THING_NOUNS: dict[str, str] = {
    "key": "keys", "cabinet": "cabinets", "house": "houses", "book": "books", "box": "boxes",
    "table": "tables", "tree": "trees", "garden": "gardens", "park": "parks", "car": "cars",
    "cup": "cups", "door": "doors", "window": "windows", "ball": "balls",
    "picture": "pictures", "room": "rooms",
}  # fmt: skip
PLACES = ("house", "box", "table", "tree", "garden", "park", "car", "room", "cabinet")
MASS_NOUNS: dict[str, tuple[str, ...]] = {
    "sport": ("tennis", "chess", "soccer", "music"),
    "food": ("bread", "soup", "rice", "cheese"),
    "drink": ("milk", "tea", "water", "juice"),
}
_ANYTHING = ("animate", "thing", "sport", "food", "drink")
# Verb base form -> object kinds it selects ("animate" also covers pronouns and names).
TRANSITIVE_VERBS: dict[str, tuple[str, ...]] = {
    "like": _ANYTHING, "love": _ANYTHING, "want": _ANYTHING,
    "need": ("animate", "thing", "food", "drink"),
    "see": ("animate", "thing"), "find": ("animate", "thing"),
    "follow": ("animate",), "help": ("animate",), "visit": ("animate",), "call": ("animate",),
    "chase": ("animate",), "carry": ("thing",), "hold": ("thing",),
    "play": ("sport",), "eat": ("food",), "drink": ("drink",),
}  # fmt: skip
INTRANSITIVE_VERBS = (
    "run", "sleep", "sing", "smile", "laugh", "swim", "wait", "work", "dance", "jump", "walk",
    "cry",
)  # fmt: skip
COPULA: dict[str, Agr] = {
    "am": frozenset({"1sg"}), "is": _SG, "are": _NON_3SG - {"1sg"},
    "was": frozenset({"1sg", "3sg"}), "were": _NON_3SG - {"1sg"},
}  # fmt: skip
LOCATIVE_PREPS = ("in", "on", "under", "near", "behind", "beside")
PREPOSITIONS = (*LOCATIVE_PREPS, "with", "of", "to")
RELATIVES = ("who", "that", "which")
ADVERBS = ("quickly", "slowly", "loudly", "quietly", "today", "again", "here", "outside")
ADJ_ANY = ("big", "small", "old", "new", "little")
ADJ_THING = ("red", "blue", "green", "brown", "heavy", "dirty", "broken")
ADJ_ANIMATE = ("happy", "sad", "tired", "hungry", "kind", "clever", "lazy", "young", "tall",
               "quiet", "brave")  # fmt: skip


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _build_lexicon() -> dict[str, dict[str, Agr]]:
    det_agr = {"sg": _SG, "pl": _PL, None: ALL_CELLS}
    entries = [("SUBJ", w, frozenset({cell})) for w, cell in SUBJECT_PRONOUNS.items()]
    entries += [("DET", w, det_agr[num]) for w, num in DETERMINERS.items()]
    entries += [("COP", w, agr) for w, agr in COPULA.items()]
    entries += [("NAME", w, _SG) for w in NAMES]
    for sg, pl in (ANIMATE_NOUNS | THING_NOUNS).items():
        entries += [("NOUN", sg, _SG), ("NOUN", pl, _PL)]
    for cat, verbs in (("VT", tuple(TRANSITIVE_VERBS)), ("VI", INTRANSITIVE_VERBS)):
        entries += [(cat, v, _NON_3SG) for v in verbs]
        entries += [(cat, _third_person(v), _SG) for v in verbs]
    unmarked = {
        "OBJ": OBJECT_PRONOUNS, "MASS": sum(MASS_NOUNS.values(), ()), "PREP": PREPOSITIONS,
        "REL": RELATIVES, "ADV": ADVERBS, "ADJ": ADJ_ANY + ADJ_THING + ADJ_ANIMATE, ".": (".",),
    }  # fmt: skip
    entries += [(cat, w, ALL_CELLS) for cat, words in unmarked.items() for w in words]
    lex: dict[str, dict[str, Agr]] = {}
    for cat, word, agr in entries:
        lex.setdefault(word, {})[cat] = agr
    return lex


#: word -> {word class: agreement cells}. Only "you" and "it" have two classes (SUBJ and OBJ),
#: which never compete at the same position, so parsing stays deterministic.
LEXICON: Mapping[str, Mapping[str, Agr]] = _build_lexicon()
VOCABULARY: frozenset[str] = frozenset(LEXICON)


_VERB_PAIRS = [(v, _third_person(v)) for v in (*TRANSITIVE_VERBS, *INTRANSITIVE_VERBS)]
_NOUN_PAIRS = list((ANIMATE_NOUNS | THING_NOUNS).items())
#: A same-class word of the other number, for corrupting samples. Swapping any verb or
#: number-marked determiner of an agreeing sentence always breaks agreement; swapping a noun
#: does only when something else constrains it (not for an object after "the").
NUMBER_SWAP: Mapping[str, str] = {
    "this": "these", "these": "this", "every": "many", "many": "every", "a": "some",
    "an": "some", "some": "a", "am": "is", "is": "are", "are": "is", "was": "were", "were": "was",
    **dict(_VERB_PAIRS + _NOUN_PAIRS), **{b: a for a, b in _VERB_PAIRS + _NOUN_PAIRS},
}  # fmt: skip


class _Generator:
    """Recursive-descent generator; its methods mirror the parser's."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def sentence(self) -> list[str]:
        agr, animate, words = self.subject(modify=True)
        return [*words, *self.vp(agr, animate), "."]

    def subject(self, *, modify: bool, inner: bool = False) -> tuple[str, bool, list[str]]:
        r = self.rng.random()
        if r < 0.25:
            # "it" as the subject of a relative clause reads badly ("the ball that it sees").
            word = self.rng.choice([p for p in SUBJECT_PRONOUNS if not (inner and p == "it")])
            return SUBJECT_PRONOUNS[word], True, [word]
        if r < 0.35:
            return "3sg", True, [self.rng.choice(NAMES)]
        animate = inner or self.rng.random() < 0.7
        agr, words = self.np("animate" if animate else "thing", modify=modify)
        return agr, animate, words

    def np(self, kind: str, *, modify: bool = False) -> tuple[str, list[str]]:
        """A noun phrase of ``kind`` "animate", "thing" or "place" (a thing one can be in)."""
        rng = self.rng
        animate = kind == "animate"
        nouns = ANIMATE_NOUNS if animate else THING_NOUNS
        sg = rng.choice(PLACES if kind == "place" else tuple(nouns))
        num = rng.choice(("sg", "pl"))
        # Mostly number-marked or neutral determiners rather than "the", so DET ~ NOUN bites.
        dets = [d for d, n in DETERMINERS.items() if n in (num, None) and d != "an"]
        det = "the" if rng.random() < 0.4 else rng.choice(dets)
        adjs = rng.sample(_adjectives(animate), rng.choices((0, 1, 2), weights=(5, 4, 1))[0])
        words = [det, *adjs, nouns[sg] if num == "pl" else sg]
        if det == "a" and words[1][0] in "aeiou":
            words[0] = "an"
        agr = "3" + num
        if modify and (r := rng.random()) < 0.7:
            words += self.pp(animate) if r < 0.35 else self.rel(agr, animate)
        return agr, words

    def pp(self, head_animate: bool | None) -> list[str]:
        """A noun modifier, or a locative predicate ("is in the box") when the head is None."""
        preps = LOCATIVE_PREPS
        if head_animate is not None:
            preps += ("with",) if head_animate else ("with", "of", "to")
        prep = self.rng.choice(preps)
        if head_animate is None or prep in ("in", "on", "under"):
            return [prep, *self.np("place")[1]]
        animate = prep not in ("of", "to") and self.rng.random() < 0.5
        return [prep, *self.np("animate" if animate else "thing")[1]]

    def rel(self, head: str, animate: bool) -> list[str]:
        rng = self.rng
        rel = rng.choice(("who", "that") if animate else ("that", "which"))
        r = rng.random()
        if animate and r < 0.3:
            verb = rng.choice(tuple(TRANSITIVE_VERBS))
            return [rel, _inflect(verb, head), *self.object(verb)]
        if animate and r < 0.45:
            return [rel, _inflect(rng.choice(INTRANSITIVE_VERBS), head)]
        if r < 0.6:
            return [rel, self.copula(head), rng.choice(_adjectives(animate))]
        kind = "animate" if animate else "thing"
        verb = rng.choice([v for v, kinds in TRANSITIVE_VERBS.items() if kind in kinds])
        inner, _, words = self.subject(modify=False, inner=True)
        return [rel, *words, _inflect(verb, inner)]

    def vp(self, agr: str, animate: bool) -> list[str]:
        rng = self.rng
        r = rng.random()
        if animate and r < 0.45:
            verb = rng.choice(tuple(TRANSITIVE_VERBS))
            return [_inflect(verb, agr), *self.object(verb, modify=True)]
        if animate and r < 0.65:
            adverb = [rng.choice(ADVERBS)] if rng.random() < 0.4 else []
            return [_inflect(rng.choice(INTRANSITIVE_VERBS), agr), *adverb]
        if rng.random() < 0.6:
            return [self.copula(agr), rng.choice(_adjectives(animate))]
        return [self.copula(agr), *self.pp(None)]

    def object(self, verb: str, *, modify: bool = False) -> list[str]:
        rng = self.rng
        kind = rng.choice(TRANSITIVE_VERBS[verb])
        if kind in MASS_NOUNS:
            return [rng.choice(MASS_NOUNS[kind])]
        if kind == "animate" and rng.random() < 0.35:
            return [rng.choice(OBJECT_PRONOUNS if rng.random() < 0.6 else NAMES)]
        # Object modifiers are rarer: they lengthen sentences without adding main-clause range.
        return self.np(kind, modify=modify and rng.random() < 0.4)[1]

    def copula(self, agr: str) -> str:
        forms = ("am", "is", "are") if self.rng.random() < 0.5 else ("was", "were")
        return next(f for f in forms if agr in COPULA[f])


def _inflect(verb: str, agr: str) -> str:
    return _third_person(verb) if agr == "3sg" else verb


def _adjectives(animate: bool) -> tuple[str, ...]:
    return ADJ_ANY + (ADJ_ANIMATE if animate else ADJ_THING)


def generate_documents(num_documents: int, *, seed: int = 0) -> list[str]:
    """Return ``num_documents`` documents of 3-8 sentences, deterministic in ``seed``.

    Sentences are joined by single spaces and each ends with `` .``; only a local
    ``random.Random(seed)`` is used, so global RNG state is neither read nor changed.
    """
    gen = _Generator(random.Random(seed))
    return [
        " ".join(" ".join(gen.sentence()) for _ in range(gen.rng.randint(3, 8)))
        for _ in range(num_documents)
    ]


def split_sentences(text: str) -> list[str]:
    """Split text into sentences at standalone ``.`` tokens (whitespace-normalised).

    Each returned sentence keeps its final `` .``; a trailing unterminated fragment (e.g. a
    truncated sample) is returned without one. Empty sentences (stray dots) are dropped.
    """
    words = text.split()
    ends = [i + 1 for i, word in enumerate(words) if word == "."]
    spans = zip([0, *ends], [*ends, len(words)], strict=True)
    return [" ".join(words[a:b]) for a, b in spans if words[a:b] not in ([], ["."])]


@dataclass(frozen=True)
class AgreementResult:
    """Outcome of :func:`check_agreement`.

    ``parsed``: the words fit the grammar's structure when number/person is ignored.
    ``agrees``: every agreement constraint holds (False when not parsed).
    ``distance``: words strictly between the main subject's head (noun, pronoun or name) and
    the main verb, e.g. 0 for "she likes tennis", 3 for "the key to the cabinets is old";
    None when not parsed.
    """

    parsed: bool
    agrees: bool
    distance: int | None


class _NoParse(Exception):
    pass


class _Parser:
    """Recursive descent over word classes; one LL(1) decision per alternative in the BNF."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.i = 0
        self.checks: list[bool] = []

    def accept(self, *cats: str) -> Agr | None:
        """Consume the next word if it has one of ``cats``; return its agreement cells."""
        classes = LEXICON.get(self.words[self.i], {}) if self.i < len(self.words) else {}
        for cat in cats:
            if cat in classes:
                self.i += 1
                return classes[cat]
        return None

    def expect(self, cat: str) -> Agr:
        agr = self.accept(cat)
        if agr is None:
            raise _NoParse
        return agr

    def agree(self, a: Agr, b: Agr) -> None:
        self.checks.append(bool(a & b))

    def sentence(self) -> int:
        head, agr = self.subject(modify=True)
        verb = self.i
        self.agree(agr, self.vp())
        if self.i != len(self.words):
            raise _NoParse
        return verb - head - 1

    def subject(self, *, modify: bool) -> tuple[int, Agr]:
        start = self.i
        agr = self.accept("SUBJ", "NAME")
        return (start, agr) if agr is not None else self.np(modify=modify)

    def np(self, *, modify: bool = False) -> tuple[int, Agr]:
        det = self.expect("DET")
        while self.accept("ADJ") is not None:
            pass
        head = self.i
        agr = self.expect("NOUN")
        self.agree(det, agr)
        if modify and self.accept("PREP") is not None:
            self.np()
        elif modify and self.accept("REL") is not None:
            self.rel(agr)
        return head, agr

    def rel(self, head: Agr) -> None:
        if (verb := self.accept("VT")) is not None:
            self.agree(head, verb)
            self.object()
        elif (verb := self.accept("VI")) is not None:
            self.agree(head, verb)
        elif (verb := self.accept("COP")) is not None:
            self.agree(head, verb)
            self.expect("ADJ")
        else:
            _, inner = self.subject(modify=False)
            self.agree(inner, self.expect("VT"))

    def vp(self) -> Agr:
        if (agr := self.accept("VT")) is not None:
            self.object(modify=True)
        elif (agr := self.accept("VI")) is not None:
            self.accept("ADV")
        else:
            agr = self.expect("COP")
            if self.accept("ADJ") is None:
                self.expect("PREP")
                self.np()
        return agr

    def object(self, *, modify: bool = False) -> None:
        if self.accept("OBJ", "NAME", "MASS") is None:
            self.np(modify=modify)


def check_agreement(sentence: str) -> AgreementResult:
    """Parse one sentence (trailing `` .`` optional, case-insensitive) and check agreement."""
    words = sentence.lower().split()
    if words and words[-1] == ".":
        words.pop()
    parser = _Parser(words)
    try:
        distance = parser.sentence()
    except _NoParse:
        return AgreementResult(parsed=False, agrees=False, distance=None)
    return AgreementResult(parsed=True, agrees=all(parser.checks), distance=distance)


def main_verb_index(sentence: str) -> int | None:
    """Word index of the main verb of a sentence that parses (trailing `` .`` optional), e.g. 4
    in "the key to the cabinets is old ."; None when it does not parse."""
    words = sentence.lower().split()
    if words and words[-1] == ".":
        words.pop()
    try:
        _Parser(words).sentence()
    except _NoParse:
        return None
    parser = _Parser(words)
    parser.subject(modify=True)  # the verb phrase starts where the subject ends
    return parser.i


def agreement_error_rate(texts: Iterable[str]) -> tuple[float, int]:
    """Fraction of parsed sentences in ``texts`` that violate agreement, and how many parsed.

    Unparsable sentences are excluded (they are a fluency failure, not an agreement one);
    the rate is NaN when nothing parses (no sentence, so no error rate: never a perfect 0.0).
    A bare string is treated as one text.
    """
    if isinstance(texts, str):
        texts = [texts]
    parsed = errors = 0
    for text in texts:
        for sentence in split_sentences(text):
            result = check_agreement(sentence)
            parsed += result.parsed
            errors += result.parsed and not result.agrees
    return (errors / parsed if parsed else math.nan), parsed
