"""Mixture-of-experts models under expert parallelism: the same run as one process.

Real torchrun jobs on gloo (tests/test_parallel.py's helpers and tolerances: losses over 6
steps within 1e-5, final parameters within 1e-4): EP2 over DP4 (ZeRO-1 with the fused
optimizer, sharding the experts over their two expert-data-parallel ranks), EP2 x TP2 and
EP2 x PP2 (masked and block diffusion; DP2, so one rank per expert), each against one process of
the same config and seed whose micro-batch holds the same global batch. The MoE model routes
top-2 of 4 experts with a shared expert, the load-balancing loss and the z-loss on; a second
variant balances with the auxiliary-loss-free expert bias (sigmoid scores) and puts experts in
every other layer only (so under PP2 one stage holds no experts); at EP2 x TP2 the "moe" variant
also runs with activation checkpointing, against the same single process without it; TP2 with
sequence parallelism (the MoE layers gather the sequence, the shared expert has a gate) runs a
third variant. A checkpoint written at EP2 x DP4 resumes in one process (EP1) as the
uninterrupted run continues, and `ckpt convert --ep` places each expert on its EP rank's files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_parallel import (
    HALF,
    TINY,
    assert_losses_close,
    assert_params_close,
    launch,
    losses,
    overrides,
)

from pretrain.checkpoint.convert import convert_checkpoint
from pretrain.checkpoint.format import KINDS, CheckpointReader
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.config import load_config
from pretrain.model.sharding import expert_index
from pretrain.trainer import train

MOE = {
    "model.moe.num_experts": 4,
    "model.moe.top_k": 2,
    "model.moe.expert_ffn_hidden_size": 64,
    "model.moe.shared_expert_ffn_hidden_size": 64,
    "model.moe.aux_loss_coeff": 0.1,
    "model.moe.z_loss_coeff": 0.01,
}
VARIANTS: dict[str, dict] = {
    "moe": MOE,
    "bias": {
        **MOE,
        "model.moe.aux_loss_coeff": 0.0,
        "model.moe.score_function": "sigmoid",
        "model.moe.expert_bias_update_rate": 0.05,
        "model.moe.layer_frequency": 2,
    },
    "block": {**MOE, "diffusion.objective": "block", "diffusion.block_length": 8},
    "moe-ckpt": {**MOE, "model.activation_checkpointing": True},
    "gate": {**MOE, "model.moe.shared_expert_gate": True},
}
SAME_AS = {"moe-ckpt": "moe"}
"""Variants compared with another's single-process run: recomputed layers (replaying their
routing, with all-to-all and TP collectives in the recomputation) train what "moe" trains."""
EP2 = {"parallel.expert_parallel": 2}
# layout -> (processes, overrides, variants run there, micro-batch): every global batch is 8.
# ep2-dp4: two expert-data-parallel ranks per expert, so ZeRO-1 shards the experts' buffer too.
LAYOUTS = {
    "ep2-dp4": (4, EP2, ["moe"], 2),
    "ep2xtp2": (4, {**EP2, "parallel.tensor_parallel": 2}, ["moe", "moe-ckpt"], 4),
    "ep2xpp2": (4, {**EP2, "parallel.pipeline_parallel": 2}, ["bias", "block"], 4),
    "tp2-sp": (2, {"parallel.tensor_parallel": 2, "parallel.sequence_parallel": True}, ["gate"], 8),
}


@pytest.fixture(scope="module")
def single(runtime, demo_data, tmp_path_factory):
    """One process per variant at micro-batch 8 (the global batch of DP2 x 4)."""
    out = tmp_path_factory.mktemp("moe-single")
    runs = {}
    for name, extra in VARIANTS.items():
        if name in SAME_AS:
            continue
        runs[name] = train(load_config(TINY, overrides(demo_data, out, name, micro=8, **extra)))
    return runs


class _Jobs(dict):
    """One torchrun job per layout, launched when a test first asks for it (so `-k` selects)."""

    def __init__(self, demo_data, tmp_path_factory):
        super().__init__()
        self.data, self.paths = demo_data, tmp_path_factory

    def __missing__(self, layout):
        nproc, extra, names, micro = LAYOUTS[layout]
        work = self.paths.mktemp(layout)
        sp = bool(extra.get("parallel.sequence_parallel"))  # the worker's CPU buffer patch
        runs = [
            {
                "overrides": overrides(self.data, work, n, micro, **extra, **VARIANTS[n]),
                "cpu_sequence_parallel": sp,
            }
            for n in names
        ]
        if layout == "ep2-dp4":  # interrupted at HALF: resumed at EP1 below
            o = overrides(self.data, work, "resume", micro, **extra, **VARIANTS["moe"])
            runs.append({"overrides": o, "stop_at": HALF})
            names = [*names, "resume"]
        done = launch(nproc, runs, work)
        self[layout] = {"work": work, "runs": dict(zip(names, done, strict=True))}
        return self[layout]


@pytest.fixture(scope="module")
def jobs(demo_data, tmp_path_factory):
    return _Jobs(demo_data, tmp_path_factory)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_expert_parallel_layouts_equal_one_process(single, jobs, layout):
    for name in LAYOUTS[layout][2]:
        got, want = jobs[layout]["runs"][name], single[SAME_AS.get(name, name)]
        assert_losses_close(losses(got), losses(want))
        assert_params_close(Path(got["checkpoint"]), want.checkpoint)


def test_experts_are_stored_by_global_index(jobs):
    reader = CheckpointReader(Path(jobs["ep2-dp4"]["runs"]["moe"]["checkpoint"]))
    experts = {n for n in reader.names() if ".mlp.experts." in n}
    assert experts == {
        f"layers.{i}.mlp.experts.{e}.linear_fc{k}.weight"
        for i in range(2) for e in range(4) for k in (1, 2)
    }  # fmt: skip


def test_variants_differ_so_the_comparison_means_something(single):
    finals = {name: losses(run)[6] for name, run in single.items()}
    assert len(set(finals.values())) == len(finals), finals


def test_checkpoint_from_ep2_resumes_at_ep1(single, jobs, demo_data):
    work = jobs["ep2-dp4"]["work"]
    assert sorted(losses(jobs["ep2-dp4"]["runs"]["resume"])) == [1, 2, 3]
    shutil.copytree(work / "resume", work / "ep1")
    ckpts = CheckpointManager(work / "ep1" / "checkpoints", keep_last=9)
    for later in [p for p in ckpts.complete_checkpoints() if p.name != "step_00000003"]:
        shutil.rmtree(later)
    o = overrides(demo_data, work, "ep1", micro=8, **VARIANTS["moe"])
    resumed = train(load_config(TINY, o))
    want = losses(single["moe"])
    assert_losses_close(losses(resumed), {s: want[s] for s in (4, 5, 6)})
    assert_params_close(resumed.checkpoint, single["moe"].checkpoint)


def test_convert_splits_experts_over_expert_parallel_ranks(single, tmp_path):
    """`dlm ckpt convert --ep 2 --tp 2`: EP rank r's files hold experts 2r, 2r+1 (TP-sliced),
    dense tensors live on EP rank 0; converting back to one file gives the same tensors."""
    src = single["moe"].checkpoint
    out = convert_checkpoint(src, tmp_path / "ep2" / "checkpoints", tp=2, pp=1, ep=2)
    for rank in range(4):
        ep_rank = rank // 2
        with safe_open(out / "shards" / f"rank-{rank:05d}.safetensors", "pt") as f:
            names = {key.split("#")[0] for key in f.keys()}  # noqa: SIM118 - not iterable
        experts = {expert_index(n) for n in names} - {None}
        assert experts == {2 * ep_rank, 2 * ep_rank + 1}, (rank, experts)
        assert any(expert_index(n) is None for n in names) == (ep_rank == 0)
    back = convert_checkpoint(out, tmp_path / "ep1" / "checkpoints", tp=1, pp=1)
    a, b = CheckpointReader(src), CheckpointReader(back)
    assert a.names() == b.names() == CheckpointReader(out).names()
    for name in a.names():
        for kind in KINDS:
            assert torch.equal(a.full(name, kind), b.full(name, kind)), name
