"""`dlm import`: a tiny random Llama/Qwen2 built with `transformers` -> our model, run causally,
reproduces the causal LM's logits; unsupported models are clear errors.

Tolerance: the same fp32 function computed in another order (fused QKV/fc1, our RoPE and SDPA
calls): logits within 1e-4 absolute (observed ~1e-6). Weights are drawn with std 0.2 so that the
logits are of order 1 and a wrong mapping cannot hide below the tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint.format import CheckpointReader, load_weights
from pretrain.config.loader import from_dict
from pretrain.config.schema import Config
from pretrain.errors import CheckpointError
from pretrain.hf.import_ar import import_causal_lm

VOCAB, SEQ = 300, 24
LOGIT_ATOL = 1e-4
SHAPE = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "initializer_range": 0.2,
    "eos_token_id": 2,
}


def word_tokenizer(directory: Path) -> None:
    """A tokenizer.json of VOCAB whole words, `</s>` = id 2, no mask token."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab["</s>"] = vocab.pop("w2")
    tok = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))


def save_llama(directory: Path, *, tokenizer: bool, tied: bool = False, **extra) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPE, rms_norm_eps=1e-6, tie_word_embeddings=tied, **extra)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 50000.0}
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    if tokenizer:
        word_tokenizer(directory)
    return model


def ours_causal(checkpoint: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Our Megatron-core model from the imported checkpoint, run with a causal boolean mask."""
    import yaml

    from pretrain.model.parallelize import build_model

    cfg = from_dict(Config, yaml.safe_load((checkpoint / "config.yaml").read_text()), source="t")
    record = json.loads((checkpoint / "tokenizer_record.json").read_text())
    net = build_model(cfg.model, vocab_size=cfg.model.vocab_size, mask_token_id=record["mask_id"])
    load_weights(CheckpointReader(checkpoint), net.named_parameters(), tp_rank=0, tp_size=1)
    causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).tril()
    with torch.no_grad():
        return net.eval()(tokens, attention_mask=causal)  # [b, s, V_pad]


def assert_logits_match(got: torch.Tensor, want: torch.Tensor) -> None:
    worst = (got[..., :VOCAB] - want).abs().max().item()
    assert worst <= LOGIT_ATOL, f"max logit difference {worst:.3g}"
    assert want.abs().max() > 0.5  # not a comparison of near-zero numbers


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_imported_llama_reproduces_causal_logits(runtime, tmp_path, tied, monkeypatch):
    from launcher.cli import main

    llama = save_llama(tmp_path / "llama", tokenizer=False, tied=tied)
    monkeypatch.chdir(tmp_path)
    assert main(["import", "llama"]) == 0  # default output: ./llama-dlm
    ckpt = tmp_path / "llama-dlm"
    assert (ckpt / "COMPLETE.json").is_file()
    cfg = yaml_config(ckpt)
    assert cfg.model.rope_base == 50000.0 and cfg.model.norm_eps == 1e-6
    assert cfg.model.num_query_groups == 2 and cfg.model.vocab_size == VOCAB + 1
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = llama(input_ids=tokens).logits
    got = ours_causal(ckpt, tokens)
    assert_logits_match(got, want)
    assert torch.isinf(got[..., VOCAB]).all()  # the added mask token is never predicted
    # without the causal mask the model is a different (bidirectional) function
    assert not torch.allclose(ours_causal_bidirectional(ckpt, tokens)[..., :VOCAB], want, atol=1e-2)


def yaml_config(ckpt: Path) -> Config:
    import yaml

    return from_dict(Config, yaml.safe_load((ckpt / "config.yaml").read_text()), source="t")


def ours_causal_bidirectional(ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    from pretrain.model.parallelize import build_model

    cfg = yaml_config(ckpt)
    net = build_model(cfg.model, vocab_size=cfg.model.vocab_size, mask_token_id=VOCAB)
    load_weights(CheckpointReader(ckpt), net.named_parameters(), tp_rank=0, tp_size=1)
    with torch.no_grad():
        return net.eval()(tokens)


def test_import_adds_mask_token_and_exports_back(runtime, tmp_path):
    """Llama + tokenizer -> import (mask token added as id 300) -> export -> AutoModelForMaskedLM
    with a causal mask gives Llama's logits; the exported tokenizer knows the mask token."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from pretrain.hf.export import export_checkpoint

    llama = save_llama(tmp_path / "llama", tokenizer=True)
    ckpt = import_causal_lm(tmp_path / "llama", tmp_path / "ours")
    record = json.loads((ckpt / "tokenizer_record.json").read_text())
    assert record["mask_id"] == VOCAB and record["mask_token"] == "<mask>"
    assert record["eos_token"] == "</s>" and record["eos_id"] == 2
    embed = CheckpointReader(ckpt).full("embedding.word_embeddings.weight")
    assert embed.shape[0] == 384  # 301 padded to a multiple of 128
    assert torch.allclose(embed[VOCAB], llama.model.embed_tokens.weight.mean(0), atol=1e-6)
    assert (embed[VOCAB + 1 :] == 0).all()

    hf = export_checkpoint(ckpt, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(hf)
    assert tok.mask_token == "<mask>" and tok.mask_token_id == VOCAB
    assert tok("w5 <mask> </s>").input_ids == [5, VOCAB, 2]
    model = AutoModelForMaskedLM.from_pretrained(hf, trust_remote_code=True).eval()
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(3))
    causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        want = llama(input_ids=tokens).logits
        got = model(input_ids=tokens, attention_mask=causal).logits
    assert_logits_match(got, want)


def test_qwen2_with_zero_biases_imports_and_nonzero_biases_are_refused(runtime, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for layer in qwen.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.zero_()
    qwen.save_pretrained(tmp_path / "qwen")
    ckpt = import_causal_lm(tmp_path / "qwen", tmp_path / "ours")
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = qwen(input_ids=tokens).logits
    assert_logits_match(ours_causal(ckpt, tokens), want)

    with torch.no_grad():
        qwen.model.layers[1].self_attn.k_proj.bias.fill_(0.1)
    qwen.save_pretrained(tmp_path / "qwen-bias")
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.k_proj\.bias' is a non-zero"):
        import_causal_lm(tmp_path / "qwen-bias", tmp_path / "x")


def test_unsupported_models_are_clear_errors(tmp_path, capsys):
    from transformers import GPT2Config

    from launcher.cli import main

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match=r"model_type 'gpt2' .* not supported; expected one"):
        import_causal_lm(tmp_path / "gpt2", tmp_path / "x")
    assert main(["import", str(tmp_path / "gpt2"), str(tmp_path / "x")]) == 2

    save_llama(tmp_path / "scaled", tokenizer=False)
    cfg = json.loads((tmp_path / "scaled" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}
    (tmp_path / "scaled" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="RoPE scaling 'llama3' is not supported"):
        import_causal_lm(tmp_path / "scaled", tmp_path / "x")

    with pytest.raises(CheckpointError, match="no config.json"):
        import_causal_lm(tmp_path / "nothing", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    capsys.readouterr()
    assert main(["import", str(tmp_path / "scaled"), str(tmp_path / "busy")]) == 2
    assert "busy: already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"


def test_a_training_run_starts_from_imported_weights(runtime, demo_data, tmp_path):
    """A Llama with the dataset's tokenizer -> `dlm import` -> `train.init_from`: the run's
    weights after one step at a negligible learning rate are the imported ones (a fresh init
    would be ~0.02 away everywhere)."""
    import shutil

    from conftest import REPO, tiny_overrides
    from transformers import LlamaConfig, LlamaForCausalLM

    from pretrain.config import load_config
    from pretrain.trainer import train

    tok = json.loads((demo_data / "manifest.json").read_text())["tokenizer"]
    shape = {**SHAPE, "vocab_size": tok["vocab_size"], "eos_token_id": tok["eos_id"]}
    shape["intermediate_size"] = 128
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**shape, rms_norm_eps=1e-6)).save_pretrained(tmp_path / "llama")
    shutil.copy(demo_data / tok["file"], tmp_path / "llama" / "tokenizer.json")
    ckpt = import_causal_lm(tmp_path / "llama", tmp_path / "imported")
    record = json.loads((ckpt / "tokenizer_record.json").read_text())
    assert record["mask_id"] == tok["mask_id"]  # the tokenizer's own <mask> is reused
    overrides = {
        "model.num_query_groups": 2,
        "model.norm_eps": 1e-6,
        "train.steps": 1,
        "train.checkpoint_interval": 1,
        "optim.lr": 1e-9,
        "train.init_from": str(ckpt),
    }
    cfg = load_config(
        REPO / "configs" / "tiny.yaml", tiny_overrides(demo_data, tmp_path, "ad", **overrides)
    )
    result = train(cfg)
    trained, imported = CheckpointReader(result.checkpoint), CheckpointReader(ckpt)
    assert trained.names() == imported.names()
    worst = max((trained.full(n) - imported.full(n)).abs().max().item() for n in imported.names())
    assert worst < 1e-5, f"weights moved by {worst:.3g} from the imported ones"
