"""docs/design.md's worked example of adding an objective runs as written: the class in one new
file plus its registry entry, and nothing else, trains through the real trainer."""

from __future__ import annotations

import re
import sys

import torch
from conftest import REPO, tiny_overrides

from pretrain.config import load_config
from pretrain.diffusion import registry
from pretrain.diffusion.corruption import CorruptionKey
from pretrain.diffusion.objective import build_objective
from pretrain.trainer import train


def _example_blocks() -> tuple[str, str]:
    text = (REPO / "docs" / "design.md").read_text()
    section = text.split("### Adding an objective", 1)[1].split("### Adding a noise", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "the section shows the objective's file and its registration"
    return blocks[0], blocks[1]


def test_worked_example_objective_trains(runtime, demo_data, tmp_path, monkeypatch):
    module_code, registration = _example_blocks()
    package = tmp_path / "example"
    package.mkdir()
    (package / "quarter_prefix.py").write_text(module_code)
    monkeypatch.syspath_prepend(str(package))
    spec = eval(registration, {"ObjectiveSpec": registry.ObjectiveSpec})
    spec = registry.ObjectiveSpec(**{**spec.__dict__, "target": "quarter_prefix:QuarterPrefix"})
    monkeypatch.setitem(registry.OBJECTIVES, spec.name, spec)
    try:
        cfg = load_config(
            REPO / "configs" / "tiny.yaml",
            tiny_overrides(
                demo_data,
                tmp_path,
                "example",
                **{"diffusion.objective": "quarter_prefix", "train.steps": 3},
            ),
        )
        objective = build_objective(cfg.diffusion, mask_id=511, seq_len=cfg.data.seq_len)
        x0 = torch.randint(0, 500, (8, cfg.data.seq_len))
        batch = objective.prepare(x0, CorruptionKey(0, 0))
        quarter = cfg.data.seq_len // 4
        assert not batch.masked[:, :quarter].any() and batch.masked[:, quarter:].any()
        result = train(cfg)
        assert sorted(result.losses) == [1, 2, 3]
        assert all(torch.isfinite(torch.tensor(v)) for v in result.losses.values())
    finally:
        sys.modules.pop("quarter_prefix", None)
