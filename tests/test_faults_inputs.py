"""Bad and pathological inputs: configs (duplicate keys, alias bombs, NaN/inf and out-of-range
floats in every float field, unsafe run names), datasets (a replaced tokenizer, a mask id that
is EOS or an ordinary token, mask ids inside samples, paths out of the dataset), a huge
whitespace-free word for the BPE trainer, and malformed `dlm import` inputs. Every case is one
line naming the file or key, and fast."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import shutil
import tarfile
import time
import typing
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, one_line_error, tiny_overrides

from data_pipeline.manifest import Manifest
from data_pipeline.reader import TokenBlockStream
from data_pipeline.tokenizer import bounded_words, check_dataset_tokenizer, train_bpe
from pretrain.config import load_config
from pretrain.config.schema import Config
from pretrain.errors import ConfigError, DataError

TINY = REPO / "configs" / "tiny.yaml"


# ----------------------------------------------------------------------------------- config
def test_a_repeated_section_or_key_is_an_error_naming_it_and_its_line(tmp_path, capsys):
    (tmp_path / "a.yaml").write_text("train:\n  steps: 3\nmodel:\n  hidden_size: 64\ntrain:\n")
    err = one_line_error(capsys, ["config", "show", str(tmp_path / "a.yaml")])
    assert err == (
        f"error: {tmp_path / 'a.yaml'}: line 5: duplicate key 'train' (first at line 1); "
        "write each key once"
    )
    (tmp_path / "b.yaml").write_text("optim:\n  lr: 1.0e-3\n  betas: [0.9, 0.95]\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=r"b.yaml: line 4: duplicate key 'optim.lr'"):
        load_config(tmp_path / "b.yaml")
    with pytest.raises(ConfigError, match=r"override .*: line 1: duplicate key 'path'"):
        load_config(TINY, ["data.sources=[{path: a, path: b}]"])


def test_yaml_merge_keys_still_merge(tmp_path):
    (tmp_path / "m.yaml").write_text("train: {<<: {steps: 3, seed: 7}, steps: 5}\n")
    cfg = load_config(tmp_path / "m.yaml")
    assert (cfg.train.steps, cfg.train.seed) == (5, 7)


def _alias_bomb(levels: int = 12) -> str:
    items, prev = ['&a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]'], "a"
    for name in "bcdefghijklmnop"[: levels - 1]:
        items.append(f"&{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
        prev = name
    return "[" + ", ".join(items) + "]"  # 9**12 strings if expanded


def test_an_alias_bomb_gives_a_short_error_fast(tmp_path, capsys):
    (tmp_path / "bomb.yaml").write_text(f"train:\n  steps: {_alias_bomb()}\n")
    started = time.monotonic()
    err = one_line_error(capsys, ["config", "show", str(tmp_path / "bomb.yaml")])
    assert time.monotonic() - started < 5
    assert "train.steps: expected an integer, got list" in err and len(err) < 300
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [f"launch.env={_alias_bomb()}"])
    assert time.monotonic() - started < 5 and len(str(info.value)) < 400


def test_deeply_nested_yaml_is_one_line(tmp_path, capsys):
    (tmp_path / "deep.yaml").write_text("train: " + "[" * 20000 + "]" * 20000 + "\n")
    err = one_line_error(capsys, ["config", "show", str(tmp_path / "deep.yaml")])
    assert "deep.yaml: not valid YAML" in err


def _float_fields(cls=Config, prefix="") -> list[tuple[str, str]]:
    """(dotted key as errors name it, override that sets it to {v}) for every float field."""
    out, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += _float_fields(tp, f"{key}.")
        elif tp is float:
            out.append((key, f"{key}={{v}}"))
        elif typing.get_origin(tp) is tuple and float in typing.get_args(tp):
            out.append((f"{key}[0]", f"{key}=[{{v}}, 0.5]"))
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            item = typing.get_args(tp)[0]
            required = {"path": "x", "name": "self_correction"}
            base = {k: v for k, v in required.items() if k in item.__dataclass_fields__}
            for sub, _ in _float_fields(item):
                fields = ", ".join(f"{k}: {v}" for k, v in base.items())
                out.append((f"{key}[0].{sub}", f"{key}=[{{{{{fields}, {sub}: {{v}}}}}}]"))
    return out


FLOATS = _float_fields()


def test_the_schema_has_the_float_fields_this_test_knows():
    assert len(FLOATS) >= 18 and ("optim.betas[0]", "optim.betas=[{v}, 0.5]") in FLOATS


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("key, override", FLOATS, ids=[k for k, _ in FLOATS])
def test_every_float_field_rejects_non_finite_values(key, override, value):
    with pytest.raises(ConfigError, match=re.escape(key) + r": expected a finite number"):
        load_config(TINY, [override.format(v=value)])


@pytest.mark.parametrize("key, override", FLOATS, ids=[k for k, _ in FLOATS])
def test_every_float_field_has_a_range(key, override):
    with pytest.raises(ConfigError) as info:
        load_config(TINY, [override.format(v=-1)])
    assert key in str(info.value), str(info.value)


@pytest.mark.parametrize("name", ["/", "../x", "a/b", "/abs", "", ".", "..", "a\\b", "x\ny"])
def test_run_name_is_one_plain_directory_name(name, capsys):
    err = one_line_error(capsys, ["config", "show", str(TINY), f"run.name={json.dumps(name)}"])
    assert "run.name is" in err and "one plain directory name" in err


def test_data_checks_run_at_config_time(capsys):
    err = one_line_error(capsys, ["config", "show", str(TINY), "data.num_workers=-1"])
    assert err == "error: data.num_workers must be >= 0, got -1"


# ----------------------------------------------------------------------------------- data
@pytest.fixture
def data(demo_data, tmp_path) -> Path:
    shutil.copytree(demo_data, tmp_path / "data")
    return tmp_path / "data"


def _edit_manifest(data: Path, change) -> None:
    raw = json.loads((data / "manifest.json").read_text())
    change(raw)
    (data / "manifest.json").write_text(json.dumps(raw))


def test_a_replaced_tokenizer_is_refused_for_training_and_export(data, tmp_path, capsys):
    other = train_bpe(["completely different text " * 20], vocab_size=300)
    other.save(str(data / "tokenizer.json"))
    with pytest.raises(DataError, match=r"tokenizer.json: sha256 is .* but .*manifest.json says"):
        TokenBlockStream(data, batch_size=2)
    err = one_line_error(capsys, ["train", str(TINY), *tiny_overrides(data, tmp_path)])
    assert f"{data / 'tokenizer.json'}: sha256 is" in err and "replaced after the build" in err
    from pretrain.hf.source import tokenizer_record

    with pytest.raises(DataError, match="replaced after the build"):
        tokenizer_record(data)  # what `dlm export --data` reads
    TokenBlockStream(data, batch_size=2, verify_checksums=False)  # the user's explicit choice


def test_a_mask_id_equal_to_eos_is_refused(data):
    _edit_manifest(data, lambda raw: raw["tokenizer"].update(mask_id=raw["tokenizer"]["eos_id"]))
    with pytest.raises(DataError, match=r"field 'tokenizer.mask_id' is 0, the same as .*eos_id"):
        Manifest.load(data)


def test_a_mask_id_of_an_ordinary_token_is_refused(data, capsys, tmp_path):
    _edit_manifest(data, lambda raw: raw["tokenizer"].update(mask_id=300))
    manifest = Manifest.load(data)
    with pytest.raises(DataError, match=r"'tokenizer.mask_id' is 300 but .* gives 1 for '<mask>'"):
        check_dataset_tokenizer(data, manifest.tokenizer, data / "manifest.json")
    err = one_line_error(capsys, ["train", str(TINY), *tiny_overrides(data, tmp_path)])
    assert "field 'tokenizer.mask_id' is 300" in err


def _plant_mask(data: Path, shard: int) -> str:
    """Write the mask id into position 3 of the first sample of train shard `shard` and fix
    the manifest's checksum, as a hand-made (or damaged and rehashed) shard would be."""
    manifest = Manifest.load(data)
    src = data / manifest.splits["train"][shard].name
    out, key = io.BytesIO(), None
    with tarfile.open(src) as tin, tarfile.open(fileobj=out, mode="w") as tout:
        for member in tin.getmembers():
            payload = tin.extractfile(member).read()
            if key is None and member.name.endswith(".tok"):
                tokens = np.frombuffer(payload, dtype="<u2").copy()
                tokens[3] = manifest.tokenizer.mask_id
                payload, key = tokens.tobytes(), member.name.removesuffix(".tok")
            tout.addfile(member, io.BytesIO(payload))
    src.write_bytes(out.getvalue())
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    _edit_manifest(
        data,
        lambda raw: raw["splits"]["train"][shard].update(
            sha256=digest, num_bytes=src.stat().st_size
        ),
    )
    return f"{src}: sample {key} holds the mask id {manifest.tokenizer.mask_id} at position 3"


def test_a_mask_id_inside_a_sample_is_refused_naming_shard_and_sample(data, tmp_path, capsys):
    from data_pipeline.shards import read_shard

    expected = [_plant_mask(data, k) for k in range(len(Manifest.load(data).splits["train"]))]
    with pytest.raises(DataError) as info:
        read_shard(data, Manifest.load(data), "train", 0)
    assert str(info.value).startswith(expected[0])
    err = one_line_error(capsys, ["train", str(TINY), *tiny_overrides(data, tmp_path)])
    assert any(e in err for e in expected), err  # whichever shard the stream opens first


def test_manifest_file_names_stay_inside_the_dataset(data):
    _edit_manifest(data, lambda raw: raw["tokenizer"].update(file="../tokenizer.json"))
    with pytest.raises(DataError, match=r"field 'tokenizer.file' is '../tokenizer.json'"):
        Manifest.load(data)


def test_a_huge_word_does_not_stall_the_bpe_trainer():
    """A 1 MB run without whitespace: cut into bounded pieces for training (unbounded, the
    trainer's cost grows with the square of its length: ~3.5 minutes for this one)."""
    word = "".join(np.random.default_rng(0).choice(list("abcdefghij"), 1_000_000))
    started = time.monotonic()
    tok = train_bpe(["a few ordinary words " * 50, f"x {word} y"], vocab_size=400)
    assert time.monotonic() - started < 60
    assert tok.decode(tok.encode(word[:5000]).ids) == word[:5000]
    assert list(bounded_words(["ab abcdefg c"], limit=3)) == ["ab ", "abc", "def", "g", " c"]


# ----------------------------------------------------------------------------------- import
LLAMA = {
    "model_type": "llama",
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_theta": 10000.0,
    "eos_token_id": 2,
}
BAD_CONFIGS = {
    "missing": ({k: v for k, v in LLAMA.items() if k != "hidden_size"}, "field 'hidden_size' is "
                "missing; expected an integer"),
    "string-int": ({**LLAMA, "hidden_size": "64"}, "field 'hidden_size' is '64'; expected a "
                   "positive integer"),
    "negative": ({**LLAMA, "vocab_size": -3}, "field 'vocab_size' is -3; expected a positive"),
    "bool-int": ({**LLAMA, "num_hidden_layers": True}, "field 'num_hidden_layers' is True"),
    "theta": ({**LLAMA, "rope_theta": "fast"}, "field 'rope_theta' is 'fast'; expected a "
              "positive number"),
    "eos": ({**LLAMA, "eos_token_id": "2"}, "field 'eos_token_id' is '2'"),
    "type": ({**LLAMA, "model_type": None}, "field 'model_type' is None; expected a string"),
    "list": ([1, 2], "expected a JSON object, got list"),
    "rope-dict": ({**LLAMA, "rope_scaling": [1]}, "field 'rope_scaling' is [1]; expected an "
                  "object"),
    "heads": ({**LLAMA, "num_key_value_heads": 3}, "model.num_attention_heads (4) must be "
              "divisible by model.num_query_groups (3)"),
}  # fmt: skip


@pytest.mark.parametrize("config, message", BAD_CONFIGS.values(), ids=list(BAD_CONFIGS))
def test_a_malformed_import_config_is_one_line_naming_file_and_field(
    tmp_path, capsys, config, message
):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    err = one_line_error(capsys, ["import", str(tmp_path / "hf"), str(tmp_path / "out")])
    assert err.startswith(f"error: {tmp_path / 'hf' / 'config.json'}: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_an_import_index_may_not_point_out_of_the_model_directory(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(LLAMA))
    index = {"weight_map": {"model.embed_tokens.weight": "../../etc/x.safetensors"}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    err = one_line_error(capsys, ["import", str(tmp_path / "hf"), str(tmp_path / "out")])
    assert "index.json: field 'weight_map.model.embed_tokens.weight' is '../../etc/x" in err


def test_a_corrupt_safetensors_header_in_an_import_is_one_line(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(LLAMA))
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    err = one_line_error(capsys, ["import", str(tmp_path / "hf"), str(tmp_path / "out")])
    assert f"{tmp_path / 'hf' / 'model.safetensors'}: not a readable safetensors file" in err
