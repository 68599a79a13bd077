"""The model an evaluation runs: from a training checkpoint (any layout), an exported Hugging Face
directory, or the trainer's own replica, with what scoring needs beside the weights: the training
objective and schedule, the sequence length, the mask and eos ids, and the tokenizer."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.errors import CheckpointError, ConfigError
from pretrain.evaluation.backends import EngineNet, HFNet, ModuleNet

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class EvalModel:
    net: ModuleNet | EngineNet | HFNet
    diffusion: object
    """The `DiffusionConfig` the model was trained with."""
    seq_len: int
    """Training sequence length: the longest input scored, and the schedules' horizon."""
    mask_id: int
    eos_id: int
    tokenizer: object
    """A `tokenizers.Tokenizer` that encodes as the data pipeline did (special tokens literal)."""
    source: str

    @property
    def device(self) -> torch.device:
        return self.net.device

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def resolve_device(device: str | None) -> torch.device:
    """`auto`/None: this process's GPU under torchrun (LOCAL_RANK), else the CPU."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: '{dtype}' is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _tokenizer(file: str | Path):
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(file)
    tok.encode_special_tokens = True  # a literal "<mask>" in a task is text, as in the data
    return tok


def is_export(path: Path) -> bool:
    return (path / "config.json").is_file() and not (path / "config.yaml").is_file()


def load_eval_model(
    path: str | Path, *, device: str | None = None, dtype: str | None = None, data=None
) -> EvalModel:
    """A checkpoint (or run directory: its latest) or an exported directory, on one device."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or exported model directory")
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if is_export(path):
        return load_export(path, dev, resolve_dtype(dtype, dev))
    return load_checkpoint(path, dev, resolve_dtype(dtype, dev), data)


def load_checkpoint(path: Path, device: torch.device, dtype: torch.dtype, data) -> EvalModel:
    """Our training model at TP = PP = 1 through the project's loader (`load_model`: the
    checkpoint's config rebuilds it, any layout's shards are joined, hashes verified), which
    also sets up torch.distributed (a world of one, or the torchrun world as data-parallel
    replicas)."""
    from pretrain.model.attention import get_attention_backend
    from pretrain.probe.loading import load_model, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    overrides = [
        f"train.device={device.type}",
        "model.compile=false",
        "model.activation_checkpointing=false",
        "parallel.sequence_parallel=false",
    ]
    if data is not None:
        overrides.append(f"data.path={data}")
    if not get_attention_backend(_recorded_backend(ckpt)).supports_mask:
        overrides.append("model.attention_backend=sdpa")  # scoring needs patterns; same weights
    loaded = load_model(ckpt, overrides)
    cfg, tok = loaded.cfg, loaded.manifest.tokenizer
    if tok.eos_id is None:
        raise CheckpointError(
            f"{cfg.data.path}: the dataset's tokenizer has no eos token; evaluation pads and "
            "stops generation with it"
        )
    module = loaded.module.to(device=device, dtype=dtype).eval()
    loaded.tokenizer.encode_special_tokens = True  # a literal "<mask>" in a task is text
    return EvalModel(
        net=ModuleNet(module),
        diffusion=cfg.diffusion,
        seq_len=cfg.data.seq_len,
        mask_id=tok.mask_id,
        eos_id=tok.eos_id,
        tokenizer=loaded.tokenizer,
        source=str(ckpt),
    )


def _recorded_backend(ckpt: Path) -> str:
    from pretrain.config import load_config

    parallel = ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1"]
    return load_config(ckpt / "config.yaml", parallel).model.attention_backend


def load_export(path: Path, device: torch.device, dtype: torch.dtype) -> EvalModel:
    """An exported directory through the project's own copy of its modeling code (nothing from
    the directory is executed), with the objective recorded in its config.json."""
    from pretrain.config.loader import from_dict
    from pretrain.config.schema import DiffusionConfig
    from pretrain.hf.modeling_dlm import DLMForMaskedLM

    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    if config.get("model_type") != "dlm":
        raise ConfigError(
            f"{config_file}: model_type '{config.get('model_type')}' is not an exported dlm "
            "model (expected 'dlm', written by `dlm export`)"
        )
    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"{path}: no tokenizer.json; evaluation needs the tokenizer")
    recorded = config.get("diffusion")
    if recorded is None:
        print(f"[dlm] {config_file}: no diffusion section; scoring as masked diffusion, linear")
    diffusion = from_dict(
        DiffusionConfig, recorded or {}, source=str(config_file), prefix="diffusion"
    )
    model = DLMForMaskedLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    return EvalModel(
        net=HFNet(model),
        diffusion=diffusion,
        seq_len=int(config["max_position_embeddings"]),
        mask_id=int(config["mask_token_id"]),
        eos_id=int(config["eos_token_id"]),
        tokenizer=_tokenizer(path / "tokenizer.json"),
        source=str(path),
    )


def from_run(run) -> EvalModel:
    """The model of a training run (`pretrain.run.Run`) through its engine (`Engine.infer`: any
    layout; collective over each replica's ranks), with the run's config and tokenizer."""
    cfg, data = run.cfg, run.data
    tok = data.manifest.tokenizer
    return EvalModel(
        net=EngineNet(run.engine, device=run.rt.device, vocab_size=data.vocab_size),
        diffusion=cfg.diffusion,
        seq_len=cfg.data.seq_len,
        mask_id=tok.mask_id,
        eos_id=tok.eos_id,
        tokenizer=_tokenizer(data.data_dir / tok.file),
        source=f"{cfg.run.name} (in training)",
    )
