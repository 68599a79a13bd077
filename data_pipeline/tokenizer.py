"""Tokenizer helpers built on Hugging Face ``tokenizers`` only (no ``transformers`` dependency).

A diffusion LM needs two reserved ids besides the vocabulary: an end-of-sequence token that
separates packed documents, and a mask token that the forward process substitutes for clean tokens.
The mask token must never occur in data, so it is registered as a *special* added token and the
build encodes text with ``encode_special_tokens=True`` (a literal ``"<mask>"`` in the text is then
ordinary text).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from pretrain.errors import ConfigError, DataError

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MASK_TOKEN = "<mask>"
DEFAULT_EOS_TOKEN = "<eos>"
# Names used for end-of-sequence by common tokenizer families, in the order we try them.
EOS_CANDIDATES: tuple[str, ...] = ("<eos>", "</s>", "<|endoftext|>", "<|eos|>", "<|end_of_text|>")
# The byte-level alphabet (256 symbols) plus our two special tokens is the smallest useful vocab.
MIN_BPE_VOCAB = 256 + 2


@dataclass(frozen=True)
class SpecialTokens:
    """The reserved tokens of a tokenizer, as the data pipeline and the model see them."""

    mask_token: str
    mask_id: int
    eos_token: str
    eos_id: int


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a ``tokenizer.json`` file or a directory that contains one.

    Raises:
        DataError: the path does not exist, the directory has no ``tokenizer.json``, or the file
            is not a valid serialized tokenizer.
    """
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not path.exists():
        raise DataError(
            f"{path}: tokenizer not found; expected a {TOKENIZER_FILE} file or a "
            f"directory containing one"
        )
    if not file.is_file():
        return _from_auto_tokenizer(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON or schema
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{file}: not a valid Hugging Face tokenizer file ({detail})") from exc


def _from_auto_tokenizer(path: Path) -> Tokenizer:
    """The fast (Rust) tokenizer of a local ``AutoTokenizer`` directory without tokenizer.json
    (e.g. only a SentencePiece ``tokenizer.model``, which transformers converts)."""
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # OSError, ValueError, missing sentencepiece, ...
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(
            f"{path}: directory has no {TOKENIZER_FILE} and is not a loadable AutoTokenizer "
            f"directory ({detail}); expected a Hugging Face tokenizer"
        ) from exc
    backend = getattr(hf, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise DataError(f"{path}: AutoTokenizer loaded a slow tokenizer; a fast one is required")
    return backend


def train_bpe(texts: Iterable[str], *, vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` with special tokens ``<eos>`` and ``<mask>``.

    Byte-level means every UTF-8 string is encodable (no unknown token). The result is
    deterministic for the same input (the trainer breaks ties between equally frequent pairs by
    the pair itself). ``<eos>`` gets id 0 and ``<mask>`` id 1. The vocabulary may come out smaller
    than ``vocab_size`` when the input has fewer distinct merges than requested.

    Raises:
        ConfigError: ``vocab_size`` is too small to hold the byte alphabet and special tokens.
    """
    if vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(
            f"vocab_size is {vocab_size}; a byte-level BPE needs at least {MIN_BPE_VOCAB} "
            f"(256 bytes + <eos> + <mask>)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[DEFAULT_EOS_TOKEN, DEFAULT_MASK_TOKEN],
        # Seed the full byte alphabet so that text unseen in training still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(bounded_words(texts), trainer=trainer)
    return tok


MAX_TRAIN_WORD = 256
"""Longest run of non-space characters the BPE trainer sees as one word. Its cost grows with
the square of a word's length (a 320k-character word: 22 s, a 5 MB one: over an hour), so longer
runs (base64 blobs, minified code, a file without spaces) are cut into pieces of this many
characters for training (the 5 MB word then trains in 11 s); encoding is unchanged (linear)."""


def bounded_words(texts: Iterable[str], limit: int = MAX_TRAIN_WORD) -> Iterator[str]:
    """`texts` with every run of more than `limit` non-space characters yielded in pieces of
    at most `limit` characters, each its own training text (so no piece joins a neighbour)."""
    long_word = re.compile(rf"\S{{{limit + 1},}}")
    for text in texts:
        start = 0
        for match in long_word.finditer(text):
            if match.start() > start:
                yield text[start : match.start()]
            for i in range(match.start(), match.end(), limit):
                yield text[i : min(i + limit, match.end())]
            start = match.end()
        if start == 0:
            yield text
        elif start < len(text):
            yield text[start:]


def _special_added_tokens(tok: Tokenizer) -> dict[str, int]:
    """Map content -> id for the tokenizer's added tokens that are flagged special."""
    return {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}


def prepare_special_tokens(
    tok: Tokenizer, *, mask_token: str = DEFAULT_MASK_TOKEN, eos_token: str | None = None
) -> SpecialTokens:
    """Find the EOS token and reserve the mask token, adding it to ``tok`` (in place) if absent.

    EOS is ``eos_token`` if given (it must exist), otherwise the first of :data:`EOS_CANDIDATES`
    that the tokenizer knows. The mask token is added as a special token when missing; if it is
    present it must already be a *special* added token, because an ordinary vocabulary token could
    be produced by encoding text and would then leak into the data.

    Raises:
        DataError: no EOS token can be found, the mask token is an ordinary token, or the mask
            and EOS tokens coincide.
    """
    if eos_token is not None:
        eos_id = tok.token_to_id(eos_token)
        if eos_id is None:
            raise DataError(f"tokenizer: eos token {eos_token!r} is not in the vocabulary")
    else:
        found = [(name, tok.token_to_id(name)) for name in EOS_CANDIDATES]
        found = [(name, i) for name, i in found if i is not None]
        if not found:
            raise DataError(
                "tokenizer: no end-of-sequence token found; expected one of "
                + ", ".join(EOS_CANDIDATES)
            )
        eos_token, eos_id = found[0]
    if mask_token == eos_token:
        raise DataError(f"tokenizer: mask token {mask_token!r} is also the eos token")

    mask_id = tok.token_to_id(mask_token)
    if mask_id is None:
        tok.add_special_tokens([AddedToken(mask_token, special=True, normalized=False)])
        mask_id = tok.token_to_id(mask_token)
        assert mask_id is not None, "tokenizers failed to add the mask token"
    elif _special_added_tokens(tok).get(mask_token) != mask_id:
        raise DataError(
            f"tokenizer: mask token {mask_token!r} (id {mask_id}) is an ordinary vocabulary token; "
            f"choose a token that is absent or registered as a special token"
        )
    return SpecialTokens(mask_token=mask_token, mask_id=mask_id, eos_token=eos_token, eos_id=eos_id)


_CHECKED: set[tuple] = set()
"""Tokenizer files already checked in this process (path, mtime, size, manifest record)."""


def check_dataset_tokenizer(data_dir: str | Path, info, manifest_path: str | Path) -> Path:
    """Check a dataset's tokenizer file against its manifest record (`TokenizerInfo`); return
    the file's path.

    The file must hash to the manifest's sha256 (the ids in the shards were made with it), have
    the recorded vocabulary size, hold the EOS token at `eos_id` and the mask token at `mask_id`
    as a *special* token: an ordinary token could be produced by text, and the model would be
    asked to predict it. Each file is checked once per process (again when it changes).

    Raises:
        DataError: naming the tokenizer file, the manifest and what differs.
    """
    file = Path(data_dir) / info.file
    if not file.is_file():
        raise DataError(f"{file}: tokenizer file is missing; listed in {manifest_path}")
    stat = file.stat()
    key = (str(file.resolve()), stat.st_mtime_ns, stat.st_size, info)
    if key in _CHECKED:
        return file
    tok = load_tokenizer(file)
    got = tokenizer_sha256(tok)
    if got != info.sha256:
        raise DataError(
            f"{file}: sha256 is {got[:12]}... but {manifest_path} says {info.sha256[:12]}...; "
            "the tokenizer was replaced after the build (the shards were made with another one)"
        )
    mask_at = _special_added_tokens(tok).get(info.mask_token)
    checks = (
        ("vocab_size", tok.get_vocab_size(with_added_tokens=True), info.vocab_size, ""),
        ("eos_id", tok.token_to_id(info.eos_token), info.eos_id, f" for {info.eos_token!r}"),
        ("mask_id", mask_at, info.mask_id, f" for {info.mask_token!r} as a special token"),
    )
    for name, have, expected, what in checks:
        if have != expected:
            raise DataError(
                f"{manifest_path}: field 'tokenizer.{name}' is {expected} but {file} gives "
                f"{'none' if have is None else have}{what}"
            )
    _CHECKED.add(key)
    return file


def tokenizer_sha256(tok: Tokenizer) -> str:
    """SHA-256 hex digest of the tokenizer's canonical JSON (sorted keys, compact separators).

    Canonicalising makes the digest independent of pretty-printing and key order, so the digest of
    a tokenizer equals that of the same tokenizer saved to and reloaded from ``tokenizer.json``.
    """
    canonical = json.dumps(
        json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
