"""Config strictness: presets load, unknown keys and wrong types are errors naming the key."""

from __future__ import annotations

import dataclasses

import pytest
import yaml
from conftest import REPO

from pretrain.config import Config, field_docs, flatten, load_config, to_yaml
from pretrain.errors import ConfigError

PRESETS = ["tiny", "llada-1b", "llada-8b"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load_and_round_trip(name, tmp_path):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    # The resolved YAML loads back to the same config: nothing is lost or coerced.
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg


def test_llada_presets_have_llada_shapes():
    one = load_config(REPO / "configs" / "llada-1b.yaml").model
    eight = load_config(REPO / "configs" / "llada-8b.yaml").model
    assert (eight.hidden_size, eight.num_layers, eight.num_attention_heads) == (4096, 32, 32)
    assert (eight.ffn_hidden_size, eight.vocab_size) == (12288, 126464)
    assert (one.hidden_size, one.num_layers, one.num_query_groups) == (2048, 22, 4)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"model": {"hiden_size": 3}}))
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'model\.hiden_size'"):
        load_config(path)


def test_unknown_section_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("modle:\n  hidden_size: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'modle'"):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.steps=abc", r"train\.steps: expected an integer, got str 'abc'"),
        ("train.steps=1.5", r"train\.steps: expected an integer, got float"),
        ("train.steps=true", r"train\.steps: expected an integer, got bool"),
        ("tracking.enabled=1", r"tracking\.enabled: expected true/false, got int"),
        ("optim.lr=fast", r"optim\.lr: expected a number"),
        ("parallel.zero_stage=4", r"parallel\.zero_stage: expected one of \[0, 1, 2, 3\]"),
        ("parallel.zero_stage=true", r"parallel\.zero_stage: expected one of"),
        ("optim.betas=[0.9]", r"optim\.betas: expected a list of 2 items"),
        ("train.stepz=3", r"unknown key 'train\.stepz'"),
        ("trian.steps=3", r"unknown key 'trian'"),
        ("train.steps", r"expected key=value"),
        ("model=3", r"model: expected a mapping"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "tiny.yaml", [override])


def test_overrides_apply_with_yaml_types():
    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        ["train.steps=7", "optim.lr=3e-4", "optim.betas=[0.8, 0.9]", "model.vocab_size=null"],
    )
    assert cfg.train.steps == 7 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.optim.betas == (0.8, 0.9) and cfg.model.vocab_size is None
    assert isinstance(load_config(None, ["optim.lr=1"]).optim.lr, float)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.num_attention_heads=5", r"model\.hidden_size \(128\) must be divisible"),
        ("parallel.tensor_parallel=3", r"divisible by parallel\.tensor_parallel \(3\)"),
        ("train.steps=0", r"train\.steps must be positive"),
        ("diffusion.eps=1.5", r"diffusion\.eps must be in \[0, 1\)"),
    ],
)
def test_cross_field_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "configs" / "tiny.yaml", [override])


def test_config_classes_are_keyword_only():
    with pytest.raises(TypeError):
        Config(None)  # type: ignore[misc]


def test_every_field_is_documented():
    rows = field_docs()
    assert len(rows) == len(flatten(Config()))
    undocumented = [key for key, _, doc in rows if len(doc) < 10]
    assert not undocumented, undocumented
    assert all(
        dataclasses.is_dataclass(getattr(Config(), f.name)) for f in dataclasses.fields(Config)
    )


def test_time_limits_stay_strings_without_quotes(tmp_path):
    """YAML 1.1 reads 12:00:00 as the base-60 integer 43200; our loader keeps it a string, in a
    file and in an override, while ordinary integers stay integers."""
    path = tmp_path / "c.yaml"
    path.write_text("launch:\n  time: 12:00:00\n  nodes: 2\ntrain:\n  steps: 17\n")
    cfg = load_config(path)
    assert cfg.launch.time == "12:00:00" and cfg.launch.nodes == 2 and cfg.train.steps == 17
    assert load_config(path, ["launch.time=4:30:00"]).launch.time == "4:30:00"
    assert load_config(to_yaml_file(cfg, tmp_path)).launch.time == "12:00:00"  # round trip


def to_yaml_file(cfg: Config, tmp_path) -> str:
    out = tmp_path / "round.yaml"
    out.write_text(to_yaml(cfg))
    return str(out)
