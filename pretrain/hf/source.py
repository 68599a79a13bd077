"""Reading a training checkpoint as one canonical state dict, with its config and tokenizer.

Whatever layout wrote the checkpoint (TP x PP x DP, any ZeRO stage), `CheckpointReader` joins the
tensor-parallel shards of every canonical parameter; pipeline stages and data-parallel ranks only
decide which shard file holds which tensor. So export reads the same tensors from every layout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pretrain.checkpoint.format import (
    CheckpointReader,
    canonical_names,
    legacy_trainer_state_file,
    trainer_state_file,
)
from pretrain.checkpoint.manager import load_trainer_state, verify_checkpoint
from pretrain.config.loader import from_dict, load_yaml_text
from pretrain.config.schema import Config, padded_vocab_size
from pretrain.errors import CheckpointError, DataError

TOKENIZER_RECORD = "tokenizer_record.json"
"""Written next to an imported checkpoint's tokenizer.json: its special tokens (no manifest)."""


@dataclass(frozen=True)
class TokenizerRecord:
    file: str
    """Path of the `tokenizer.json` the model was trained with."""
    vocab_size: int
    mask_token: str
    mask_id: int
    eos_token: str | None
    eos_id: int | None

    def save(self, directory: Path) -> None:
        record = dict(asdict(self), file=Path(self.file).name)  # relative to its directory
        (directory / TOKENIZER_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def tokenizer_record(data_dir: Path) -> TokenizerRecord:
    """The tokenizer of a dataset (its manifest, its tokenizer file checked against it) or of
    an imported checkpoint (its record)."""
    record = data_dir / TOKENIZER_RECORD
    if record.is_file():
        try:
            raw = json.loads(record.read_text())
            fields = {f: raw[f] for f in TokenizerRecord.__dataclass_fields__}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise CheckpointError(
                f"{record}: malformed (expected {', '.join(TokenizerRecord.__dataclass_fields__)})"
            ) from None
        if not isinstance(fields["file"], str) or Path(fields["file"]).name != fields["file"]:
            raise CheckpointError(f"{record}: field 'file' must be a file name in {data_dir}")
        return TokenizerRecord(**dict(fields, file=str(data_dir / fields["file"])))
    if not (data_dir / "manifest.json").is_file():
        raise DataError(
            f"{data_dir}: no manifest.json; the export needs the training data's tokenizer and "
            "mask token (pass --data DIR, the directory of the dataset the model was trained on)"
        )
    from data_pipeline.manifest import MANIFEST_FILE, Manifest
    from data_pipeline.tokenizer import check_dataset_tokenizer

    tok = Manifest.load(data_dir).tokenizer
    file = check_dataset_tokenizer(data_dir, tok, data_dir / MANIFEST_FILE)
    return TokenizerRecord(
        file=str(file),
        vocab_size=tok.vocab_size,
        mask_token=tok.mask_token,
        mask_id=tok.mask_id,
        eos_token=tok.eos_token,
        eos_id=tok.eos_id,
    )


@dataclass
class TrainedModel:
    """A checkpoint's model: config, canonical fp32 weights, tokenizer, step, tracking run."""

    path: Path
    config: Config
    config_yaml: str
    state: Mapping[str, torch.Tensor]
    """Canonical tensors by name, read from the checkpoint on access (`CanonicalState`)."""
    tokenizer: TokenizerRecord
    step: int
    run_id: str | None

    @property
    def vocab_size(self) -> int:
        """Ids the model may predict (below this; minus the mask)."""
        return self.config.model.vocab_size or self.tokenizer.vocab_size

    @property
    def padded_vocab(self) -> int:
        return padded_vocab_size(self.vocab_size, self.config.model.make_vocab_size_divisible_by)


class CanonicalState(Mapping[str, torch.Tensor]):
    """A checkpoint's canonical tensors as a read-only mapping that reads (and joins the TP
    shards of) a tensor when it is looked up, and keeps nothing: an export streams through it,
    so exporting an 8B model never holds its 32 GB of fp32 weights at once."""

    def __init__(self, reader: CheckpointReader):
        self._reader = reader
        self._names = sorted(reader.names())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._reader.index:
            raise KeyError(name)
        return self._reader.full(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def read_checkpoint(
    path: str | Path, *, data_dir: str | Path | None = None, verify: bool = True
) -> TrainedModel:
    """Verify a complete checkpoint (content hashes too unless `verify` is False); its
    canonical tensors are read when looked up."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory does not exist")
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(
            f"{path}: no config.yaml; cannot tell which model the checkpoint holds "
            "(expected the resolved run config that every checkpoint is sealed with)"
        )
    verify_checkpoint(path, hashes=verify)
    config_yaml = config_file.read_text()
    cfg = from_dict(Config, load_yaml_text(config_yaml, str(config_file)), source=str(config_file))
    cfg.validate()
    reader = CheckpointReader(path)
    reader.check_matches(canonical_names(cfg.model.num_layers))
    state = CanonicalState(reader)
    if data_dir is None:
        data_dir = path if (path / TOKENIZER_RECORD).is_file() else Path(cfg.data.path)
    run_id = None
    if any((path / f(0)).is_file() for f in (trainer_state_file, legacy_trainer_state_file)):
        run_id = load_trainer_state(path, 0).get("tracking_run_id")
    return TrainedModel(
        path=path,
        config=cfg,
        config_yaml=config_yaml,
        state=state,
        tokenizer=tokenizer_record(Path(data_dir)),
        step=int(reader.common["step"]),
        run_id=run_id,
    )
