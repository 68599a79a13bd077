"""Small checkpoint records (common metadata, per-rank trainer state) as plain JSON.

Checkpoints are shared and downloaded, so reading one must never run code: Python's pickle (what
`torch.save` writes and `torch.load(weights_only=False)` reads) can execute anything on load.
These records hold only numbers, strings, lists and dicts, plus the odd small tensor (the CPU RNG
state), which is written as `{"__tensor__": <base64 bytes>, "dtype": ..., "shape": [...]}`.
Large tensors live in safetensors files (`format.py`), which are data by construction.

Checkpoints written before this format (`common.pt`, `trainer_rank_*.pt`) are still read, with
`torch.load(weights_only=True)`: PyTorch's restricted unpickler, which only rebuilds tensors and
plain containers and refuses every other global (an allow-list, not a block-list).
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.errors import CheckpointError

_TENSOR = "__tensor__"


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {
            _TENSOR: base64.b64encode(raw).decode("ascii"),
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
        }
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string")
            out[k] = _encode(v, f"{where}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: non-finite float {value} cannot be written")
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{where}: {type(value).__name__} is not a plain-data checkpoint value")


_DTYPES = {
    name: getattr(torch, name)
    for name in ("uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32")
}


def _decode(value: Any, where: str) -> Any:
    if isinstance(value, dict) and _TENSOR in value:
        dtype = _DTYPES.get(value.get("dtype"))
        shape = value.get("shape")
        if (
            dtype is None
            or not isinstance(shape, list)
            or not all(isinstance(n, int) and n >= 0 for n in shape)
        ):
            raise CheckpointError(f"{where}: malformed tensor record")
        raw = base64.b64decode(value[_TENSOR], validate=True)
        flat = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy())
        try:
            return flat.view(dtype).reshape(shape)
        except RuntimeError as exc:
            raise CheckpointError(f"{where}: tensor bytes do not fit {shape} {dtype}") from exc
    if isinstance(value, dict):
        return {k: _decode(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def encode_record(value: dict, name: str) -> str:
    """`value` (plain data and small tensors) as the JSON text of record file `name`: a copy
    that later changes to `value` cannot touch (what a background save writes)."""
    return json.dumps(_encode(value, name), sort_keys=True)


def write_encoded(path: Path, text: str) -> None:
    """Write a record encoded by `encode_record`."""
    path.write_text(text)


def write_record(path: Path, value: dict) -> None:
    """Write `value` (plain data and small tensors) as JSON at `path`."""
    write_encoded(path, encode_record(value, path.name))


def read_record(path: Path, legacy: Path | None = None) -> dict:
    """Read a JSON record; if it is absent, the pre-JSON `legacy` file with the restricted
    unpickler. Anything else (a malformed file, a pickle asking for a global) is a one-line
    `CheckpointError` naming the file."""
    if path.is_file():
        try:
            value = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not a JSON checkpoint record ({exc})") from None
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return _decode(value, path.name)
    if legacy is not None and legacy.is_file():
        try:
            value = torch.load(legacy, weights_only=True, map_location="cpu")
        except Exception as exc:  # UnpicklingError for a disallowed global, EOFError, ...
            detail = " ".join(str(exc).split())[:300]
            raise CheckpointError(
                f"{legacy}: refused to load (only tensors and plain containers are allowed): "
                f"{type(exc).__name__}: {detail}"
            ) from None
        if not isinstance(value, dict):
            raise CheckpointError(f"{legacy}: expected a dict")
        return value
    raise CheckpointError(f"{path}: missing")
