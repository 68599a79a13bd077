"""FP8 under tensor parallelism, in a real multi-process job; launched by tests/test_fp8.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/fp8_worker.py SPEC OUT

SPEC is JSON: {"layout": [override, ...], "model": {...ModelConfig fields}, "vocab": V, "mask":
id, "seed": s, "cases": [{"recipe", "tp_scales", "sequence_parallel", "sparse"}], "train":
[[override, ...], ...]}. `layout` sets the process groups (e.g. parallel.tensor_parallel=2).
Each case (TP layouts) builds the model, applies emulated FP8 (`apply_fp8`), runs one forward and
backward on fixed tokens and gathers the full (canonical) gradients; each `train` entry is a
`pretrain.trainer.train` run of configs/tiny.yaml (emulated FP8 when it sets model.fp8). Rank 0
writes the loss and gradients of every case and the per-step losses of every run to OUT
(torch.save of plain tensors and floats).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def inputs(vocab: int, mask: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed tokens [4, 32] and loss positions (~40%), the same in every process."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mask, (4, 32), generator=g)
    return tokens, torch.rand(4, 32, generator=g) < 0.4


def case_loss(module, tokens, positions, sparse: bool) -> torch.Tensor:
    """Mean CE over the loss positions, through the sparse head or the full one."""
    ce = module(tokens, targets=tokens, loss_positions=positions if sparse else None)
    return torch.where(positions, ce, 0.0).sum() / positions.sum()


def build(model_cfg, *, vocab: int, mask: int, seed: int, sequence_parallel: bool):
    """The model for the current TP layout (`build_model`), optionally sequence-parallel."""
    from pretrain.model.parallelize import build_model

    return build_model(
        model_cfg,
        vocab_size=vocab,
        mask_token_id=mask,
        seed=seed,
        sequence_parallel=sequence_parallel,
    )


def full_gradients(module) -> dict[str, torch.Tensor]:
    """Canonical name -> the full gradient, gathered over the TP group."""
    from megatron.core import parallel_state

    from pretrain.model.sharding import canonical_expert_name, shard_spec, unshard

    group = parallel_state.get_tensor_model_parallel_group()
    tp = torch.distributed.get_world_size(group)
    out = {}
    for name, param in module.named_parameters():
        pieces = [torch.empty_like(param.grad) for _ in range(tp)]
        torch.distributed.all_gather(pieces, param.grad.contiguous(), group=group)
        canonical = canonical_expert_name(name, ep_rank=0, local_experts=0)  # no EP here
        out[name] = unshard(pieces, shard_spec(canonical))
    return out


def main(spec_path: str, out_path: str) -> None:
    from pretrain.config import ModelConfig, MoEConfig, load_config
    from pretrain.model.fp8 import apply_fp8
    from pretrain.parallel.runtime import init_runtime

    spec = json.loads(Path(spec_path).read_text())
    if any(case["sequence_parallel"] for case in spec["cases"]):
        # Megatron allocates its sequence-parallel gather buffers on torch.cuda.current_device();
        # on a CPU-only machine point them at the CPU (every collective still runs, on gloo).
        torch.cuda.current_device = lambda: torch.device("cpu")
    rt = init_runtime(load_config(None, ["train.device=cpu", *spec["layout"]]))
    results: dict = {"cases": [], "train": []}
    for case in spec["cases"]:
        tokens, positions = inputs(spec["vocab"], spec["mask"])
        shape = dict(spec["model"])
        moe = MoEConfig(**shape.pop("moe", {}))
        model_cfg = ModelConfig(**shape, moe=moe, fp8=case["recipe"], fp8_output_layer=True)
        module = build(
            model_cfg,
            vocab=spec["vocab"],
            mask=spec["mask"],
            seed=spec["seed"],
            sequence_parallel=case["sequence_parallel"],
        )
        apply_fp8(module, model_cfg, device=rt.device, emulate=True, tp_scales=case["tp_scales"])
        loss = case_loss(module, tokens, positions, case["sparse"])
        loss.backward()
        results["cases"].append({"loss": float(loss), "grads": full_gradients(module)})
    if spec["train"]:
        from pretrain.trainer import train

        os.environ["DLM_FP8_EMULATE"] = "1"
        for overrides in spec["train"]:
            result = train(load_config(REPO / "configs" / "tiny.yaml", overrides))
            results["train"].append(dict(result.losses))
    if rt.rank == 0:
        torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    from pretrain.parallel.runtime import shutdown_runtime

    shutdown_runtime()  # every run succeeded: no gloo threads left to the interpreter's exit
