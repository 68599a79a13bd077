"""`optim.master_weights=fused`: our multi-tensor master-weight AdamW trains exactly as DeepSpeed's
optimizer does (one process), and under data and tensor parallelism equals one process, with
bit-exact resume. Same tolerances as tests/test_parallel.py (fp32 on CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_parallel import (
    HALF,
    TINY,
    assert_losses_close,
    assert_params_close,
    launch,
    losses,
    overrides,
)

from pretrain.config import load_config
from pretrain.errors import ConfigError
from pretrain.parallel.master_adamw import MasterWeightAdamW
from pretrain.trainer import train

FUSED = {"optim.master_weights": "fused", "parallel.zero_stage": 0}
DEEPSPEED = {"optim.master_weights": "deepspeed", "parallel.zero_stage": 0}


@pytest.fixture(scope="module")
def single(runtime, demo_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("fused-single")
    runs = {}
    for micro in (4, 8):
        for name, extra in (
            ("deepspeed", {"parallel.zero_stage": 0, "optim.master_weights": "deepspeed"}),
            ("fused", FUSED),
        ):
            runs[name, micro] = train(
                load_config(TINY, overrides(demo_data, out, f"{name}{micro}", micro=micro, **extra))
            )
    return runs


def test_fused_master_weights_equal_deepspeed_optimizer(single):
    for micro in (4, 8):
        fused, deepspeed = single["fused", micro], single["deepspeed", micro]
        assert_losses_close(losses(fused), losses(deepspeed))
        assert_params_close(fused.checkpoint, deepspeed.checkpoint)
    assert losses(single["fused", 8])[6] < losses(single["fused", 8])[1]


def test_fused_master_weights_under_data_and_tensor_parallelism(single, demo_data, tmp_path):
    dp = overrides(demo_data, tmp_path, "dp2", **FUSED)
    tp = overrides(demo_data, tmp_path, "tp2", **FUSED, **{"parallel.tensor_parallel": 2})
    runs = [
        {"overrides": dp},
        {"overrides": overrides(demo_data, tmp_path, "resume", **FUSED), "stop_at": HALF},
        {"overrides": overrides(demo_data, tmp_path, "resume", **FUSED)},
    ]
    dp_result, first, second = launch(2, runs, tmp_path / "dp")
    (tp_result,) = launch(2, [{"overrides": tp}], tmp_path / "tp")  # a layout per process
    assert_losses_close(losses(dp_result), losses(single["fused", 8]))
    assert_params_close(Path(dp_result["checkpoint"]), single["fused", 8].checkpoint)
    assert_losses_close(losses(tp_result), losses(single["fused", 4]))
    assert_params_close(Path(tp_result["checkpoint"]), single["fused", 4].checkpoint)
    assert {**losses(first), **losses(second)} == losses(dp_result)  # bit-exact resume


def test_fused_master_weights_need_zero_stage_0_or_1():
    with pytest.raises(ConfigError, match="zero_stage 0 or 1"):
        load_config(TINY, ["optim.master_weights=fused", "parallel.zero_stage=2"])
    load_config(TINY, ["optim.master_weights=fused", "parallel.zero_stage=1"])


def test_gradients_accumulate_in_fp32_and_clip_on_device():
    import torch

    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    opt = MasterWeightAdamW(
        [{"params": [p], "weight_decay": 0.0}],
        lr=0.1,
        betas=(0.9, 0.95),
        eps=1e-8,
        max_grad_norm=1.0,
    )
    for _ in range(3):  # 1 + 2**-9 is not representable in bf16, but is in the fp32 buffer
        (p.float() * torch.tensor([1.0, 2**-9, 0.0, 0.0])).sum().backward()
    assert p.grad is None
    torch.testing.assert_close(opt.state[p]["grad"], torch.tensor([3.0, 3 * 2**-9, 0.0, 0.0]))
    opt.step()
    norm = opt._global_grad_norm
    assert norm.dim() == 0 and abs(norm.item() - (9 + 9 * 2**-18) ** 0.5) < 1e-5
    assert opt.state[p]["master"][0] < 0 and p[0] == opt.state[p]["master"][0].bfloat16()
    # the next step starts afresh: its first gradient replaces the buffer's old contents
    (p.float() * torch.tensor([0.0, 0.0, 5.0, 0.0])).sum().backward()
    torch.testing.assert_close(opt.state[p]["grad"], torch.tensor([0.0, 0.0, 5.0, 0.0]))


def test_a_parameter_without_gradient_in_a_step_contributes_nothing():
    import torch

    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(2))  # used in the first step only
    opt = MasterWeightAdamW(
        [{"params": [p, q], "weight_decay": 0.0}],
        lr=0.1,
        betas=(0.9, 0.95),
        eps=1e-8,
        max_grad_norm=0.0,
    )
    (3 * p.sum() + 4 * q.sum()).backward()
    opt.step()
    assert abs(opt._global_grad_norm.item() - (2 * 9 + 2 * 16) ** 0.5) < 1e-5
    (3 * p.sum()).backward()  # q gets no gradient: its old one must not count again
    opt.step()
    assert abs(opt._global_grad_norm.item() - (2 * 9) ** 0.5) < 1e-5
    assert opt.state[q]["grad"].abs().sum() == 0


@pytest.mark.parametrize("weights", ["bfloat16", "float32"])
def test_one_pass_update_equals_torch_adamw_and_compiles_to_the_same(weights):
    """`adamw_update_` (the step's one pass over the flat buffers) against torch.optim.AdamW on
    fp32 copies: 3 steps with clipping, weight decay and a changing lr. The compiled version
    (what GPUs run) equals the eager one, and a skipped step changes nothing."""
    import torch

    from pretrain.parallel.master_adamw import adamw_update_

    torch.manual_seed(0)
    n, dtype = 1000, getattr(torch, weights)
    grads = [torch.randn(n) for _ in range(3)]
    ref = torch.nn.Parameter(torch.randn(n))
    opt = torch.optim.AdamW([ref], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    runs = {}
    for name, fn in (("eager", adamw_update_), ("compiled", torch.compile(adamw_update_))):
        master = ref.detach().clone()
        param = master.to(dtype, copy=True)
        m, v, step = torch.zeros(n), torch.zeros(n), torch.zeros(())
        for i, g in enumerate(grads):
            step += 1
            kw = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, skip=None)
            fn(param, master, g, m, v, step=step, lr=torch.tensor(1e-2 / (i + 1)),
               clip=torch.tensor(0.5), **kw)  # fmt: skip
        before = master.clone()
        fn(param, master, grads[0], m, v, step=step, lr=torch.tensor(1.0), clip=None,
           **{**kw, "skip": torch.tensor(1.0)})  # fmt: skip
        assert torch.equal(master, before)
        assert torch.equal(param, master.to(dtype))
        runs[name] = master
    for i, g in enumerate(grads):
        for group in opt.param_groups:
            group["lr"] = 1e-2 / (i + 1)
        ref.grad = g * 0.5
        opt.step()
    torch.testing.assert_close(runs["eager"], ref.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(runs["compiled"], runs["eager"], rtol=1e-6, atol=1e-7)
