"""A trained model from a checkpoint, on one process (for `dlm probe`, `dlm generate` and
analysis scripts): the checkpoint's own config.yaml rebuilds the model and names its data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.errors import CheckpointError


@dataclass
class LoadedModel:
    module: torch.nn.Module
    cfg: object
    manifest: object
    tokenizer: object

    def logits(self, x: torch.Tensor, attention_mask=None) -> torch.Tensor:
        """x [b, s] -> logits [b, s, V_pad] (mask and padding ids at -inf)."""
        return self.module(x, attention_mask=attention_mask)


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run's `checkpoints/` / run directory (-> its latest)."""
    from pretrain.checkpoint.manager import read_latest

    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (name := read_latest(candidate)) is not None:
            return candidate / name
    if (path / "config.yaml").is_file():
        return path
    raise CheckpointError(f"{path}: not a checkpoint (no config.yaml) nor a run with 'latest'")


def load_model(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, verify: bool = True
) -> LoadedModel:
    """The model of a checkpoint (or a run's latest), verified (content hashes unless `verify`
    is False), with its dataset's manifest and tokenizer (checked against the manifest)."""
    from data_pipeline.manifest import MANIFEST_FILE, Manifest
    from data_pipeline.tokenizer import check_dataset_tokenizer, load_tokenizer
    from pretrain.checkpoint.format import load_weights
    from pretrain.checkpoint.manager import open_checkpoint
    from pretrain.config import load_config
    from pretrain.model.parallelize import build_model
    from pretrain.parallel.runtime import init_runtime

    ckpt = resolve_checkpoint(path)
    cfg = load_config(
        ckpt / "config.yaml",
        ["parallel.tensor_parallel=1", "parallel.pipeline_parallel=1", *overrides],
    )
    rt = init_runtime(cfg)
    manifest = Manifest.load(cfg.data.path)
    tok = manifest.tokenizer
    model = build_model(
        cfg.model,
        vocab_size=cfg.model.vocab_size or tok.vocab_size,
        mask_token_id=tok.mask_id,
    )
    load_weights(
        open_checkpoint(ckpt, num_layers=cfg.model.num_layers, verify=verify),
        model.named_parameters(),
        tp_rank=0,
        tp_size=1,
    )
    model.to(rt.device).eval()
    data_dir = Path(cfg.data.path)
    tokenizer = load_tokenizer(check_dataset_tokenizer(data_dir, tok, data_dir / MANIFEST_FILE))
    return LoadedModel(model, cfg, manifest, tokenizer)
