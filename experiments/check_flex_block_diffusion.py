"""GPU check of the `flex` attention backend on the block-diffusion mask: FlexAttention against
the explicit-mask reference (`masked`), first on the attention op, then through the model on a
real `block` objective batch (CE at the noisy positions), and the time of one forward+backward
against `sdpa` with the same boolean mask.

    python experiments/check_flex_block_diffusion.py   # needs CUDA; prints JSON lines
"""

from __future__ import annotations

import json
import time

import torch

from pretrain.config import DiffusionConfig, ModelConfig, load_config
from pretrain.diffusion.corruption import CorruptionKey
from pretrain.diffusion.masks import block_diffusion_mask
from pretrain.diffusion.objective import build_objective
from pretrain.model.attention import ATTENTION_BACKENDS


def op_check(length=512, block=64, heads=8, dim=64) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, heads, 2 * length, dim, device="cuda", generator=g) for _ in "qkv")
    mask = block_diffusion_mask(length, block, device="cuda")[None, None]
    ref = ATTENTION_BACKENDS["masked"].fn(q, k, v, mask=mask)
    out = ATTENTION_BACKENDS["flex"].fn(q, k, v, mask=mask)
    return {"check": "op", "max_abs_diff": (out - ref).abs().max().item()}


def model_check(length=1024, block=128) -> dict:
    from pretrain.model.parallelize import build_model
    from pretrain.parallel.runtime import init_runtime

    init_runtime(load_config(None, ["train.device=cuda"]))
    obj = build_objective(
        DiffusionConfig(objective="block", block_length=block), mask_id=999, seq_len=length
    )
    x0 = torch.randint(0, 999, (4, length), generator=torch.Generator().manual_seed(0)).cuda()
    batch = obj.prepare(x0, CorruptionKey(seed=0, step=0))
    ce = {}
    timing = {}
    for backend in ("masked", "flex", "sdpa"):
        cfg = ModelConfig(
            hidden_size=256,
            num_layers=4,
            num_attention_heads=4,
            ffn_hidden_size=704,
            attention_backend=backend,
        )
        model = build_model(cfg, vocab_size=1000, mask_token_id=999, seed=1).cuda()
        out = model(
            batch.inputs,
            targets=batch.targets,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        )
        ce[backend] = out[batch.masked]
        for _ in range(3):  # warm-up (compilation)
            model(
                batch.inputs,
                targets=batch.targets,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            ).sum().backward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            model(
                batch.inputs,
                targets=batch.targets,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
            ).sum().backward()
        torch.cuda.synchronize()
        timing[backend] = (time.perf_counter() - t0) / 10 * 1e3
    return {
        "check": "model",
        "max_abs_ce_diff_flex_vs_masked": (ce["flex"] - ce["masked"]).abs().max().item(),
        "max_abs_ce_diff_sdpa_vs_masked": (ce["sdpa"] - ce["masked"]).abs().max().item(),
        "fwd_bwd_ms": timing,
    }


if __name__ == "__main__":
    for result in (op_check(), model_check()):
        print(json.dumps(result))
