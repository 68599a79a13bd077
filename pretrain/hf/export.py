"""`dlm export CKPT OUT_DIR`: a training checkpoint -> a Hugging Face model directory.

    OUT_DIR/config.json                 DLMConfig, `auto_map` -> the modeling code below
    OUT_DIR/configuration_dlm.py        self-contained (torch + transformers only)
    OUT_DIR/modeling_dlm.py             DLMModel, DLMForMaskedLM (SDPA, gradient checkpointing)
    OUT_DIR/model.safetensors           or model-0000i-of-0000n.safetensors + index above a size
    OUT_DIR/generation_config.json      mask/eos ids and diffusion sampling defaults
    OUT_DIR/tokenizer.json, tokenizer_config.json, ...   the training tokenizer, mask token set
    OUT_DIR/README.md                   model card: architecture, training config, final metrics

The directory is staged in `OUT_DIR.partial` and renamed when complete. When the run was tracked,
the directory is logged as an artifact of its MLflow run and registered as a model version.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from pretrain.errors import ConfigError
from pretrain.hf.mapping import Shape, to_hf_items
from pretrain.hf.model_card import final_metrics, write_model_card
from pretrain.hf.outdir import publish, staging_dir
from pretrain.hf.source import TrainedModel, read_checkpoint

HERE = Path(__file__).resolve().parent
MODELING_FILES = ("configuration_dlm.py", "modeling_dlm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_dlm.DLMConfig",
    "AutoModel": "modeling_dlm.DLMModel",
    "AutoModelForMaskedLM": "modeling_dlm.DLMForMaskedLM",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
"""Recorded in tokenizer_config.json, so that AutoTokenizer needs no model config to pick it."""


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2KiB' or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ConfigError(f"--max-shard-size: cannot read '{text}' (expected e.g. 5GB, 500MB)")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3}[unit[0]]
    return int(float(m.group(1)) * base**power)


def hf_config(model: TrainedModel, dtype: str) -> dict:
    """The keyword arguments of the exported DLMConfig."""
    m = model.config.model
    return {
        "vocab_size": model.padded_vocab,
        "prediction_vocab_size": model.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_base,
        "max_position_embeddings": model.config.data.seq_len,
        "initializer_range": m.init_std,
        "mask_token_id": model.tokenizer.mask_id,
        "eos_token_id": model.tokenizer.eos_id,
        **moe_config(m),
        # the objective and schedule, so that `dlm eval` scores an export as it was trained
        "diffusion": asdict(model.config.diffusion),
        "architectures": ["DLMForMaskedLM"],
        "auto_map": AUTO_MAP,
        "dtype": dtype,
    }


def moe_config(m) -> dict:
    """The MoE fields of the exported DLMConfig (none for a dense model)."""
    moe = m.moe
    if not moe.enabled:
        return {}
    return {
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.expert_ffn_hidden_size or m.ffn_hidden_size,
        "moe_layers": [i for i in range(m.num_layers) if moe.is_moe_layer(i)],
        "shared_expert_intermediate_size": moe.shared_expert_ffn_hidden_size,
        "shared_expert_gate": moe.shared_expert_gate,
        "router_score_function": moe.score_function,
        "router_pre_softmax": moe.pre_softmax,
        "router_expert_bias": moe.expert_bias_update_rate > 0,
    }


def hf_tensors(model: TrainedModel, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The exported (name, tensor) pairs in `dtype`, produced one layer at a time."""
    for name, tensor in to_hf_items(model.state, Shape.of(model.config.model)):
        yield name, tensor.to(dtype)


def write_weights(
    tensors: Iterable[tuple[str, torch.Tensor]], out: Path, max_shard_bytes: int
) -> list[str]:
    """One `model.safetensors`, or shards of at most `max_shard_bytes` (a larger tensor gets a
    shard of its own) plus the index that `from_pretrained` follows. Returns the files.

    Streams: a shard is written as soon as it is full, so memory holds one shard and the layer
    being converted, not the model. Shards get their final `-of-N` names once N is known.
    """
    parts: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        part = out / f"part-{len(parts):05d}.safetensors"
        save_file(shard, str(part), metadata={"format": "pt"})
        make_readable(part)
        parts.append((part, list(shard)))

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
        total += nbytes
    flush()
    if len(parts) == 1:
        parts[0][0].rename(out / WEIGHTS)
        return [WEIGHTS]
    files = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    weight_map = {}
    for file, (part, names) in zip(files, parts, strict=True):
        part.rename(out / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*files, INDEX]


def make_readable(path: Path) -> None:
    """The mode an ordinary new file gets (0666 less the umask, 0644 by default): safetensors
    creates its files 0600, which would leave the weights unreadable to the others who can read
    the rest of the directory (a shared model store, an MLflow artifact server)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def write_tokenizer(model: TrainedModel, out: Path) -> None:
    """The training tokenizer as a `PreTrainedTokenizerFast` with its mask and eos tokens set."""
    from transformers import PreTrainedTokenizerFast

    from data_pipeline.tokenizer import load_tokenizer

    rec = model.tokenizer
    if not rec.mask_token:
        print("[dlm] no tokenizer recorded (imported without one): tokenizer files not written")
        return
    tok = PreTrainedTokenizerFast(
        tokenizer_object=load_tokenizer(rec.file),
        mask_token=rec.mask_token,
        eos_token=rec.eos_token,
        model_max_length=model.config.data.seq_len,
    )
    tok.save_pretrained(str(out))
    # transformers 5 records its backend class name; naming the fast class keeps the directory
    # loadable by transformers 4, whose AutoTokenizer then skips the model config (whose
    # auto_map would ask whether to run the custom code)
    config_file = out / "tokenizer_config.json"
    recorded = json.loads(config_file.read_text())
    recorded["tokenizer_class"] = TOKENIZER_CLASS
    config_file.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    dtype: str = "float32",
    max_shard_size: str | int = "5GB",
    register: bool = True,
    registered_name: str | None = None,
    overwrite: bool = False,
    verify: bool = True,
) -> Path:
    """Write the Hugging Face directory of `checkpoint` to `out_dir`; returns `out_dir`.
    `verify=False` skips the checkpoint's content hashes (file set and sizes still checked)."""
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    max_bytes = parse_size(max_shard_size)
    out, staging = staging_dir(out_dir, overwrite=overwrite)
    try:
        model = read_checkpoint(checkpoint, data_dir=data_dir, verify=verify)
        tracking = tracking_client(model)
        write_directory(model, staging, dtype, max_bytes, final_metrics(tracking, model.run_id))
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only left over when something failed
    if register and tracking is not None and model.run_id:
        from pretrain.hf.registry import register_export

        version = register_export(
            tracking, model.run_id, out, registered_name or model.config.run.name
        )
        print(f"[dlm] registered {version.name} version {version.version} ({version.source})")
    return out


def write_directory(
    model: TrainedModel, staging: Path, dtype: str, max_bytes: int, metrics: dict | None
) -> None:
    """Every file of the Hugging Face directory, into `staging`."""
    from pretrain.hf.configuration_dlm import DLMConfig

    DLMConfig(**hf_config(model, dtype)).save_pretrained(str(staging))
    for name in MODELING_FILES:
        shutil.copy2(HERE / name, staging / name)
    write_weights(hf_tensors(model, DTYPES[dtype]), staging, max_bytes)
    generation = {
        "mask_token_id": model.tokenizer.mask_id,
        "eos_token_id": model.tokenizer.eos_id,
        "max_new_tokens": 64,
        "steps": 64,
        "block_length": 32,
        "remasking": "low_confidence",
    }
    (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer(model, staging)
    write_model_card(staging, model, metrics, hf_config(model, dtype))


def tracking_client(model: TrainedModel):
    """The MLflow client of the run's tracking store; None when the run was not tracked or its
    store no longer has it (moved run directory): the export still works, without metrics."""
    if not model.config.tracking.enabled or not model.run_id:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pretrain.tracking.mlflow_tracker import resolve_tracking_uri

    uri = resolve_tracking_uri(model.config.tracking.uri, model.config.run.output_dir)
    missing = f"[dlm] MLflow run {model.run_id} not found in {uri}"
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        print(f"{missing} (no such file): no metrics in the model card, nothing registered")
        return None  # opening it would create an empty store as a side effect
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        client.get_run(model.run_id)
    except MlflowException as exc:
        reason = str(exc).splitlines()[0]
        print(f"{missing} ({reason}): no metrics in the model card, nothing registered")
        return None
    return client
