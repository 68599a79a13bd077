"""The layout-independent checkpoint format: what each rank writes and how any layout reads it.

    shards/rank-00003.safetensors   tensors "<canonical name>#<kind>" (kind: param, exp_avg,
                                    exp_avg_sq), each the writing rank's TP shard, complete over DP;
                                    header metadata: per name its tp_rank and tp_size
    common.json                     optimizer step, LR scheduler, layout it was written with
    trainer_rank_00003.json         per-rank trainer state (data position, RNG, tracking run)

The JSON records are plain data (`records.py`): loading a checkpoint never unpickles anything.

Every rank writes its own shard file. Within a data-parallel group the parameters of one
(pipeline stage, TP rank) are dealt out round-robin, so all ranks share the writing; a TP-replicated
parameter (RMSNorm weight) is written by TP rank 0 only. Reading never needs the writer's layout:
a tensor written under the same TP size is read as is, otherwise the TP shards are joined into the
canonical tensor and re-split (`pretrain.model.sharding`). This is why resuming at another
data-parallel size, or another tensor/pipeline layout, is the same code path as a plain resume.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pretrain.checkpoint.optim_state import KINDS, get_param_state, link_fragments
from pretrain.checkpoint.records import read_record
from pretrain.errors import CheckpointError
from pretrain.model.sharding import shard, shard_spec, unshard

FORMAT_VERSION = 1
SHARD_DIR = "shards"
COMMON = "common.json"
LEGACY_COMMON = "common.pt"
"""Written before the JSON records; read with the restricted unpickler only."""


def shard_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def trainer_state_file(rank: int) -> str:
    return f"trainer_rank_{rank:05d}.json"


def legacy_trainer_state_file(rank: int) -> str:
    return f"trainer_rank_{rank:05d}.pt"


def capture_rank_shard(
    ds, named_params, *, dp_rank: int, dp_size: int, tp_rank: int, tp_size: int
) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Collective over each DP group: the tensors this rank writes and their metadata."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    link_fragments(ds)
    for i, (name, param) in enumerate(named_params):
        state = get_param_state(ds, param)  # every DP rank takes part, owner or not
        replicated = shard_spec(name).dim is None
        if i % dp_size != dp_rank or (replicated and tp_rank != 0):
            continue
        for kind in KINDS:
            tensors[f"{name}#{kind}"] = state[kind].detach().to("cpu", torch.float32).contiguous()
        meta[name] = {"tp_rank": tp_rank, "tp_size": tp_size}
    return tensors, meta


def write_rank_shard(directory: Path, rank: int, tensors, meta) -> None:
    (directory / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    metadata = {"dlm": json.dumps({"format": FORMAT_VERSION, "tensors": meta})}
    save_file(tensors, str(directory / SHARD_DIR / shard_file(rank)), metadata=metadata)


@contextmanager
def open_safetensors(file: Path):
    """`safe_open` whose failures (a corrupt or truncated header, a missing file, a tensor
    whose bytes are not there) are one-line `CheckpointError`s naming the file."""
    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        raise CheckpointError(f"{file}: not a readable safetensors file ({_detail(exc)})") from None
    with handle as f:
        yield f


def read_tensor(file: Path, key: str) -> torch.Tensor:
    with open_safetensors(file) as f:
        try:
            return f.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{file}: cannot read tensor '{key}' ({_detail(exc)})") from None


def _detail(exc: Exception) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def _shard_header(file: Path) -> dict[str, dict]:
    """{canonical name: {tp_rank, tp_size}} from a shard's `dlm` metadata, checked."""
    with open_safetensors(file) as f:
        metadata = f.metadata() or {}
        keys = set(f.keys())
    try:
        header = json.loads(metadata.get("dlm", "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{file}: malformed 'dlm' header metadata (not JSON)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        found = header.get("format") if isinstance(header, dict) else None
        raise CheckpointError(
            f"{file}: checkpoint shard format {found!r}, expected {FORMAT_VERSION}"
        )
    tensors = header.get("tensors")
    ok = isinstance(tensors, dict) and all(
        isinstance(info, dict)
        and all(isinstance(info.get(k), int) for k in ("tp_rank", "tp_size"))
        and 0 <= info["tp_rank"] < info["tp_size"]
        and f"{name}#param" in keys
        for name, info in tensors.items()
    )
    if not ok:
        raise CheckpointError(
            f"{file}: malformed 'dlm' header metadata (expected tensors with tp_rank < tp_size "
            "and a '#param' tensor each)"
        )
    return tensors


@dataclass(frozen=True)
class _Entry:
    file: Path
    tp_rank: int
    tp_size: int


class CheckpointReader:
    """Index of a checkpoint's shard files; reads any tensor for any tensor-parallel layout."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.index: dict[str, list[_Entry]] = {}
        files = sorted((self.path / SHARD_DIR).glob("rank-*.safetensors"))
        if not files:
            raise CheckpointError(f"{self.path}: no {SHARD_DIR}/rank-*.safetensors files")
        for file in files:
            for name, info in _shard_header(file).items():
                self.index.setdefault(name, []).append(
                    _Entry(file, int(info["tp_rank"]), int(info["tp_size"]))
                )
        for entries in self.index.values():
            entries.sort(key=lambda e: e.tp_rank)
        self.common = read_record(self.path / COMMON, legacy=self.path / LEGACY_COMMON)

    def names(self) -> set[str]:
        return set(self.index)

    def _read(self, entry: _Entry, key: str) -> torch.Tensor:
        return read_tensor(entry.file, key)

    def full(self, name: str, kind: str = "param") -> torch.Tensor:
        """The canonical (unsharded) tensor."""
        entries = self._entries(name)
        spec = shard_spec(name)
        if spec.dim is None:
            return self._read(entries[0], f"{name}#{kind}")
        if [e.tp_rank for e in entries] != list(range(entries[0].tp_size)):
            raise CheckpointError(f"{self.path}: TP shards of '{name}' are incomplete")
        return unshard([self._read(e, f"{name}#{kind}") for e in entries], spec)

    def local(self, name: str, kind: str, tp_rank: int, tp_size: int) -> torch.Tensor:
        """This TP rank's shard of the tensor, for a layout with `tp_size` TP ranks."""
        entries = self._entries(name)
        spec = shard_spec(name)
        if spec.dim is not None and entries[0].tp_size == tp_size:
            return self._read(entries[tp_rank], f"{name}#{kind}")  # same TP layout: no re-split
        return shard(self.full(name, kind), spec, tp_rank, tp_size)

    def _entries(self, name: str) -> list[_Entry]:
        if name not in self.index:
            raise CheckpointError(
                f"{self.path}: has no parameter '{name}' (was it written by another model "
                "architecture? compare model.* in its config.yaml)"
            )
        return self.index[name]

    def check_matches(self, expected: set[str]) -> None:
        """The checkpoint must hold exactly the parameters of the model being built."""
        missing, extra = expected - self.names(), self.names() - expected
        if missing or extra:
            raise CheckpointError(
                f"{self.path}: parameters do not match the model: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(extra)[:3]} ({len(missing)} missing, {len(extra)} unexpected)"
            )


def canonical_names(num_layers: int) -> set[str]:
    """Every canonical parameter name of a `num_layers` model."""
    per_layer = [
        "input_layernorm.weight",
        "self_attention.linear_qkv.weight",
        "self_attention.linear_proj.weight",
        "pre_mlp_layernorm.weight",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc2.weight",
    ]
    names = {
        "embedding.word_embeddings.weight",
        "head.final_norm.weight",
        "head.output_layer.weight",
    }
    names.update(f"layers.{i}.{p}" for i in range(num_layers) for p in per_layer)
    return names


def load_weights(reader: CheckpointReader, named_params, *, tp_rank: int, tp_size: int) -> None:
    """Fill local parameters (before the engine exists) with the checkpoint's master weights."""
    with torch.no_grad():
        for name, param in named_params:
            value = reader.local(name, "param", tp_rank, tp_size)
            if value.shape != param.shape:
                raise CheckpointError(
                    f"{reader.path}: '{name}' has shape {tuple(value.shape)} for this layout, "
                    f"the model expects {tuple(param.shape)}"
                )
            check_finite(reader, name, "param", value)
            param.copy_(value)


def check_finite(reader: CheckpointReader, name: str, kind: str, value: torch.Tensor) -> None:
    """A NaN or infinite weight or moment would silently turn every later loss into NaN."""
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise CheckpointError(
            f"{reader.path}: '{name}' ({kind}) holds NaN or infinite values; the run had "
            "diverged when this checkpoint was written (resume an earlier one)"
        )
