"""`dlm import HF_DIR OUT_DIR`: a Hugging Face Llama/Qwen2-style causal LM -> our model's weights.

For AR -> DLM adaptation: the causal LM's transformer is our architecture (pre-norm RMSNorm,
SwiGLU, RoPE, grouped KV heads, no biases), so its weights map one to one (`pretrain.hf.mapping`):
run with a causal attention mask, our model reproduces the causal LM's logits. What changes:

- the vocabulary gains the mask token (`<mask>`, a special token of the tokenizer, or the next
  free id): its input embedding starts as the mean embedding, its output row is zero (its logit is
  -inf anyway); the vocabulary is padded to `model.make_vocab_size_divisible_by` with zero rows;
- tied input/output embeddings become two tensors (our model has a separate output layer);
- q/k/v biases (Qwen2) are dropped when they are all zero and refused otherwise: our linears have
  no biases, and silently dropping non-zero ones would change the model.

The result is a weights-only checkpoint in our format (no optimizer state), sealed like any
checkpoint: `OUT_DIR/{config.yaml, shards/, common.json, tokenizer.json, COMPLETE.json}`. It loads
with `CheckpointReader` + `load_weights` in any tensor-parallel layout, and exports back with
`dlm export OUT_DIR HF_OUT`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.checkpoint.format import COMMON, open_safetensors, read_tensor, write_rank_shard
from pretrain.checkpoint.manager import seal
from pretrain.checkpoint.records import write_record
from pretrain.config import to_yaml
from pretrain.config.schema import Config, ModelConfig, padded_vocab_size
from pretrain.errors import CheckpointError, ConfigError, clip
from pretrain.hf.mapping import Shape, from_hf
from pretrain.hf.outdir import staging_dir
from pretrain.hf.source import TokenizerRecord

MASK_TOKEN = "<mask>"
_REQUIRED = object()
_KINDS = {
    int: "an integer",
    float: "a number",
    bool: "true/false",
    str: "a string",
    dict: "an object",
    list: "a list",
}


def field(cfg: dict, name: str, where: Path, kind: type, default=_REQUIRED, *, positive=False):
    """`cfg[name]` checked to be `kind` (or null when the default is None): a malformed
    config.json is a one-line error naming the file and the field, never a KeyError."""
    if name not in cfg and default is not _REQUIRED:
        return default
    if name not in cfg:
        raise CheckpointError(f"{where}: field '{name}' is missing; expected {_KINDS[kind]}")
    value = cfg[name]
    if value is None and default is None:
        return None
    accepted = (int, float) if kind is float else kind
    ok = isinstance(value, accepted) and (kind is bool or not isinstance(value, bool))
    if not ok or (positive and value <= 0):
        expected = f"a positive {_KINDS[kind].split(' ', 1)[1]}" if positive else _KINDS[kind]
        raise CheckpointError(f"{where}: field '{name}' is {clip(value)}; expected {expected}")
    return float(value) if kind is float else value


@dataclass(frozen=True)
class Architecture:
    """What a supported `model_type` may have beyond the Llama core, and how to check it."""

    check: Callable[[dict, Path], None]


def _check_llama(cfg: dict, where: Path) -> None:
    if field(cfg, "mlp_bias", where, bool, False):
        raise CheckpointError(f"{where}: mlp_bias is true; our SwiGLU MLP has no biases")


def _check_qwen2(cfg: dict, where: Path) -> None:
    if field(cfg, "use_sliding_window", where, bool, False):
        raise CheckpointError(
            f"{where}: use_sliding_window is true; our attention is full (no sliding window)"
        )


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(check=_check_llama),
    "qwen2": Architecture(check=_check_qwen2),
}


def _rope(cfg: dict, where: Path) -> float:
    """rope_theta from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x)."""
    params = field(cfg, "rope_parameters", where, dict, None) or {}
    scaling = field(cfg, "rope_scaling", where, dict, None) or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if rope_type not in (None, "default"):
        raise CheckpointError(
            f"{where}: RoPE scaling '{rope_type}' is not supported; expected default RoPE "
            "(plain theta)"
        )
    if "rope_theta" in params:
        return field(params, "rope_theta", where, float, positive=True)
    if "rope_theta" not in cfg:
        raise CheckpointError(f"{where}: no rope_theta (expected in rope_parameters or top level)")
    return field(cfg, "rope_theta", where, float, positive=True)


def check_architecture(cfg: dict, where: Path) -> None:
    """A supported `model_type` whose extras (biases, sliding window, ...) we can represent."""
    model_type = field(cfg, "model_type", where, str)
    if model_type not in ARCHITECTURES:
        names = field(cfg, "architectures", where, list, None) or []
        raise CheckpointError(
            f"{where}: model_type {clip(model_type)} ({clip(', '.join(map(str, names)))}) is "
            f"not supported; expected one of {', '.join(ARCHITECTURES)} (Llama-style causal LMs)"
        )
    ARCHITECTURES[model_type].check(cfg, where)


def model_config(cfg: dict, where: Path, vocab_size: int) -> ModelConfig:
    """Our ModelConfig for a Llama-style `config.json` (vocab including the mask token)."""
    act = field(cfg, "hidden_act", where, str, "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: hidden_act {clip(act)}, expected silu (SwiGLU)")
    hidden = field(cfg, "hidden_size", where, int, positive=True)
    heads = field(cfg, "num_attention_heads", where, int, positive=True)
    head_dim = field(cfg, "head_dim", where, int, None)
    if head_dim not in (None, hidden // heads):
        raise CheckpointError(
            f"{where}: head_dim {head_dim} != hidden_size / num_attention_heads "
            f"({hidden // heads}); our attention needs that head size"
        )
    model = ModelConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_layers=field(cfg, "num_hidden_layers", where, int, positive=True),
        num_attention_heads=heads,
        num_query_groups=field(cfg, "num_key_value_heads", where, int, None) or heads,
        ffn_hidden_size=field(cfg, "intermediate_size", where, int, positive=True),
        rope_base=_rope(cfg, where),
        norm_eps=field(cfg, "rms_norm_eps", where, float, 1e-6),
        init_std=field(cfg, "initializer_range", where, float, 0.02),
    )
    try:
        model.validate()
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    return model


def read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors` or of the shards its index lists."""
    index = hf_dir / "model.safetensors.index.json"
    if (hf_dir / "model.safetensors").is_file():
        files = [hf_dir / "model.safetensors"]
    elif index.is_file():
        files = [hf_dir / f for f in sorted(set(_weight_map(index).values()))]
    else:
        raise CheckpointError(
            f"{hf_dir}: no model.safetensors or model.safetensors.index.json "
            "(save the model with save_pretrained(..., safe_serialization=True))"
        )
    state = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"{file}: weight shard listed in {index.name} is missing")
        with open_safetensors(file) as f:
            keys = list(f.keys())
        state.update({k: read_tensor(file, k) for k in keys})
    return state


def _weight_map(index: Path) -> dict[str, str]:
    """The index's weight map; every file it names must be a plain name in the directory."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index}: not a safetensors index (no 'weight_map')") from None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: field 'weight_map' is not an object")
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise CheckpointError(
                f"{index}: field 'weight_map.{clip(name, 60, False)}' is {clip(file)}; expected "
                "a file name inside the model directory"
            )
    return weight_map


def drop_zero_biases(state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    for name in [n for n in state if n.endswith(".bias")]:
        if state[name].abs().max() > 0:
            raise CheckpointError(
                f"{where}: '{name}' is a non-zero bias; our model has no linear biases "
                "(Qwen2-style q/k/v biases cannot be represented; all-zero biases are dropped)"
            )
        del state[name]
    return state


def prepare_tokenizer(hf_dir: Path, cfg: dict, vocab: int):
    """(tokenizer or None, mask id, eos token, eos id): the mask token added as a special token."""
    eos_id = cfg.get("eos_token_id")
    eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id
    if eos_id is not None and (
        isinstance(eos_id, bool) or not isinstance(eos_id, int) or not 0 <= eos_id < vocab
    ):
        raise CheckpointError(
            f"{hf_dir / 'config.json'}: field 'eos_token_id' is {clip(cfg.get('eos_token_id'))}; "
            f"expected a token id below vocab_size {vocab} (or a list of them)"
        )
    if not (hf_dir / "tokenizer.json").is_file():
        return None, vocab, None, eos_id  # no tokenizer: the mask token takes the next id
    from data_pipeline.tokenizer import load_tokenizer, prepare_special_tokens

    tok = load_tokenizer(hf_dir / "tokenizer.json")
    eos = tok.id_to_token(eos_id) if eos_id is not None else None
    special = prepare_special_tokens(tok, mask_token=MASK_TOKEN, eos_token=eos)
    return tok, special.mask_id, special.eos_token, special.eos_id


def import_causal_lm(hf_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Convert the causal LM in `hf_dir` into a weights-only checkpoint at `out_dir`."""
    hf_dir = Path(hf_dir)
    where = hf_dir / "config.json"
    if not where.is_file():
        raise CheckpointError(f"{hf_dir}: no config.json; expected a Hugging Face model directory")
    out, staging = staging_dir(out_dir, overwrite=overwrite)
    try:
        return _import(hf_dir, where, out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after a success (sealed), or a failure


def _import(hf_dir: Path, where: Path, out: Path, staging: Path) -> Path:
    try:
        cfg = json.loads(where.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    check_architecture(cfg, where)
    vocab = field(cfg, "vocab_size", where, int, positive=True)
    tok, mask_id, eos_token, eos_id = prepare_tokenizer(hf_dir, cfg, vocab)
    new_vocab = max(vocab, mask_id + 1)
    model = model_config(cfg, where, new_vocab)
    state = drop_zero_biases(read_safetensors(hf_dir), hf_dir)
    if "lm_head.weight" not in state:
        if not field(cfg, "tie_word_embeddings", where, bool, False):
            raise CheckpointError(f"{hf_dir}: no lm_head.weight and tie_word_embeddings is false")
        if "model.embed_tokens.weight" in state:  # (else reported missing just below)
            state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied: copy it
    shape = Shape.of(model)
    try:
        canonical = {k: v.float() for k, v in from_hf(state, shape).items()}
    except KeyError as exc:
        raise CheckpointError(
            f"{hf_dir}: weight {exc} is missing for a {cfg['model_type']}"
        ) from None
    except RuntimeError as exc:  # tensors of other shapes than config.json describes
        raise CheckpointError(
            f"{hf_dir}: the weights do not have the shapes {where} describes ({exc})"
        ) from None
    embed_shape = tuple(canonical["embedding.word_embeddings.weight"].shape)
    if embed_shape != (vocab, model.hidden_size):
        raise CheckpointError(
            f"{hf_dir}: model.embed_tokens.weight has shape {embed_shape}; {where} says "
            f"vocab_size x hidden_size = ({vocab}, {model.hidden_size})"
        )
    padded = padded_vocab_size(new_vocab, model.make_vocab_size_divisible_by)
    embed = canonical["embedding.word_embeddings.weight"]  # [V, h]
    grown = torch.zeros(padded, embed.shape[1])
    grown[:vocab] = embed[:vocab]
    if mask_id >= vocab:  # a new row: start the mask token at the mean embedding
        grown[mask_id] = embed[:vocab].mean(0)
    canonical["embedding.word_embeddings.weight"] = grown
    head = torch.zeros(padded, embed.shape[1])
    head[:vocab] = canonical["head.output_layer.weight"][:vocab]
    canonical["head.output_layer.weight"] = head
    return _write(out, staging, hf_dir, model, canonical, tok, (mask_id, eos_token, eos_id))


def _write(out: Path, staging: Path, hf_dir: Path, model, canonical, tok, special) -> Path:
    mask_id, eos_token, eos_id = special
    config = Config(model=model)
    config.run.name = hf_dir.name
    tensors = {f"{name}#param": t.contiguous() for name, t in canonical.items()}
    write_rank_shard(staging, 0, tensors, dict.fromkeys(canonical, {"tp_rank": 0, "tp_size": 1}))
    common = {
        "step": 0,
        "optimizer_step": 0,
        "layout": {"tp": 1, "pp": 1, "dp": 1},
        "imported_from": str(hf_dir.resolve()),
        "weights_only": True,
    }
    write_record(staging / COMMON, common)
    if tok is not None:
        tok.save(str(staging / "tokenizer.json"))
        mask_token = MASK_TOKEN
    else:
        mask_token = ""  # no tokenizer: the id is reserved, there is no text form
    TokenizerRecord(
        file="tokenizer.json",
        vocab_size=model.vocab_size,
        mask_token=mask_token,
        mask_id=mask_id,
        eos_token=eos_token,
        eos_id=eos_id,
    ).save(staging)
    seal(staging, out, 0, to_yaml(config))  # replaces an existing `out` only once complete
    return out
