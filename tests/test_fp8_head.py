"""The sparse output head's options with and without FP8 (emulated on CPU, DLM_FP8_EMULATE):
the output layer in bf16 or FP8 (`model.fp8_output_layer`), the chunk compiled as one graph
(`model.compile_head`), the logit gradient kept instead of recomputed
(`model.sparse_output_recompute=false`). Tolerances are stated in each test."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO
from fp8_worker import build, case_loss, inputs
from test_fp8 import CPU, MASK, SEED, SHAPE, VOCAB, model_cfg

from pretrain.config import load_config
from pretrain.model.fp8 import Fp8LinearMixin, apply_fp8, fp8_linear, make_plan

pytest.importorskip("torchao.float8")

TINY = REPO / "configs" / "tiny.yaml"


def test_the_heads_changing_row_count_compiles_once(runtime):
    """The sparse head's row count changes every step (and is a multiple of 16 now and then):
    one dynamic graph serves them all, no recompilation in the middle of a run."""
    from torch._dynamo.testing import CompileCounter

    plan = make_plan("tensorwise", "column", group_name=None, emulate=True, compiled=False)
    w = torch.randn(32, 48).requires_grad_()
    counter = CompileCounter()
    compiled = torch.compile(fp8_linear, backend=counter, dynamic=True)
    torch._dynamo.reset()
    for rows in (37, 48, 50, 64, 81):
        x = torch.randn(rows, 48, requires_grad=True)
        y = compiled(x, w, plan)
        y.sum().backward()
        assert y.shape == (rows, 32)
        torch.testing.assert_close(y, fp8_linear(x, w, plan), rtol=0, atol=0)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_the_output_layer_can_stay_in_bf16(runtime):
    cfg = model_cfg("tensorwise", fp8_output_layer=False)
    module = build(cfg, vocab=VOCAB, mask=MASK, seed=SEED, sequence_parallel=False)
    converted = apply_fp8(module, cfg, device=CPU, emulate=True)
    assert len(converted) == 4 * SHAPE["num_layers"] and "head.output_layer" not in converted
    assert not isinstance(module.head.output_layer, Fp8LinearMixin)
    tokens, positions = inputs(VOCAB, MASK)
    assert torch.isfinite(case_loss(module, tokens, positions, True))


def test_compile_flag_compiles_only_the_linears_outside_the_layers(runtime):
    cfg = model_cfg("tensorwise", compile=True, compile_head=False)  # the head's linear alone
    module = build(cfg, vocab=VOCAB, mask=MASK, seed=SEED, sequence_parallel=False)
    converted = apply_fp8(module, cfg, device=CPU, emulate=True)
    compiled = [n for n in converted if module.get_submodule(n).fp8_plan.compiled]
    assert compiled == ["head.output_layer"]


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "stored"])
@pytest.mark.parametrize("recipe", ["off", "tensorwise"])
def test_the_compiled_head_chunk_equals_the_eager_head_and_compiles_once(
    runtime, recipe, recompute
):
    """`model.compile_head` (through `compile_model`, layers compiled too): each chunk (final
    norm, output layer with its FP8 casts, CE; recomputed in the backward or keeping its logit
    gradient) is one dynamic graph. Loss and gradients equal
    the eager model's within 1e-5 of their largest magnitude (fp32 on CPU: only the fused
    kernels' order of operations differs); the second and third masked-row counts compile
    nothing new."""
    from torch._dynamo.utils import counters

    from pretrain.parallel.build import compile_model

    cfg = model_cfg(recipe, compile=True, compile_head=True, sparse_output_recompute=recompute)
    overrides = ["model.compile=true", "model.compile_head=true"]
    runs, graphs = {}, []
    torch._dynamo.reset()
    for compiled in (False, True):
        module = build(cfg, vocab=VOCAB, mask=MASK, seed=SEED, sequence_parallel=False)
        converted = apply_fp8(module, cfg, device=CPU, emulate=True)
        if recipe != "off":  # the head's own compile is off: the chunk graph covers it
            assert not module.head.output_layer.fp8_plan.compiled and converted
        if compiled:
            compile_model(module, load_config(TINY, overrides))
            chunk = module.head.chunk_ce if recompute else module.head.stored_chunk_ce
            assert hasattr(chunk, "_torchdynamo_orig_callable")
        tokens, _ = inputs(VOCAB, MASK)
        for fraction in (0.3, 0.45, 0.6):
            g = torch.Generator().manual_seed(int(fraction * 100))
            positions = torch.rand(tokens.shape, generator=g) < fraction
            module.zero_grad(set_to_none=True)
            loss = case_loss(module, tokens, positions, True)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in module.named_parameters()}
            runs.setdefault(compiled, []).append((loss.detach(), grads))
            if compiled:
                graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1] == graphs[0] and graphs[2] == graphs[0], graphs
    for (loss, grads), (want_loss, want_grads) in zip(runs[True], runs[False], strict=True):
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
        for name, want in want_grads.items():
            torch.testing.assert_close(
                grads[name], want, rtol=0, atol=1e-5 * float(want.abs().max()), msg=name
            )
    torch._dynamo.reset()


@pytest.mark.parametrize("recipe", ["off", "tensorwise"])
def test_the_stored_logit_gradient_equals_the_recomputed_head(runtime, recipe):
    """`model.sparse_output_recompute=false`, its CE and scaling compiled (`compile_loss`), the
    output layer in FP8 or not: loss and every gradient equal the recomputing head's within
    1e-5 of their largest magnitude (observed: 3e-7 in fp32; 0 in FP8, where the reordered
    rounding of d logits does not cross an FP8 rounding boundary)."""
    runs = []
    torch._dynamo.reset()
    for recompute in (True, False):
        cfg = model_cfg(recipe, sparse_output_recompute=recompute)
        module = build(cfg, vocab=VOCAB, mask=MASK, seed=SEED, sequence_parallel=False)
        apply_fp8(module, cfg, device=CPU, emulate=True)
        module.head.compile_loss()
        tokens, positions = inputs(VOCAB, MASK)
        loss = case_loss(module, tokens, positions, True)
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}))
    torch._dynamo.reset()
    (want_loss, want), (loss, got) = runs
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    for name, grad in want.items():
        worst = float((got[name] - grad).abs().max() / grad.abs().max())
        assert worst <= 1e-5, (name, worst)
