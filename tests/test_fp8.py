"""FP8 matmuls (`model.fp8`, pretrain/model/fp8.py), emulated on CPU (DLM_FP8_EMULATE: the same
scaled casts to float8_e4m3fn / e5m2, GEMMs in fp32 on the dequantised operands).

Tolerances, stated once: one linear equals a hand-written quantise-dequantise reference within
1e-5 relative (fp32 rounding only); the whole model in FP8 against fp32: loss within 1e-3
relative (observed <= 4e-4) and every parameter's gradient within 0.2 in relative L2 norm
(observed <= 0.12: e5m2 gradients carry 2 mantissa bits); FP8 at TP2 (real torchrun/gloo
processes) against one process with the same emulation: loss within 1e-6 and gradients within
1e-5 of their largest magnitude (observed <= 8e-7: the TP-group amax makes every shard quantise
as the whole tensor), while per-shard amaxes differ by > 1e-2.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_overrides
from fp8_worker import build, case_loss, inputs

from pretrain.checkpoint.format import CheckpointReader
from pretrain.config import ModelConfig, MoEConfig, load_config
from pretrain.errors import ConfigError
from pretrain.model import fp8
from pretrain.model.fp8 import Fp8LinearMixin, apply_fp8, fp8_linear, make_plan
from pretrain.trainer import train

pytest.importorskip("torchao.float8")

CPU = torch.device("cpu")
TINY = REPO / "configs" / "tiny.yaml"
VOCAB, MASK, SEED = 300, 299, 3
SHAPE = dict(hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=128)
RECIPES = ("tensorwise", "rowwise")


def model_cfg(recipe: str = "off", **extra) -> ModelConfig:
    """The output layer in FP8 too unless `extra` says otherwise (the default keeps it in bf16;
    these tests cover every FP8 linear)."""
    extra = {"fp8_output_layer": True, **extra}
    return ModelConfig(**SHAPE, fp8=False if recipe == "off" else recipe, **extra)


def loss_and_grads(recipe: str, sparse: bool = True, moe: MoEConfig | None = None, **apply):
    cfg = model_cfg(recipe) if moe is None else model_cfg(recipe, moe=moe)
    module = build(cfg, vocab=VOCAB, mask=MASK, seed=SEED, sequence_parallel=False)
    converted = apply_fp8(module, cfg, device=CPU, emulate=True, **apply)
    tokens, positions = inputs(VOCAB, MASK)
    loss = case_loss(module, tokens, positions, sparse)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return float(loss), grads, converted, module


# -- one linear against a quantise-dequantise written from the definition -------------------


def quantised(t: torch.Tensor, dtype: torch.dtype, axis: int | None, pow2: bool) -> torch.Tensor:
    """t as FP8 `dtype` represents it: scale = max(dtype) / amax (over `axis`, or the whole
    tensor), saturate, round to `dtype`, divide the scale back out (float64)."""
    t = t.detach().double()
    amax = t.abs().amax() if axis is None else t.abs().amax(dim=axis, keepdim=True)
    scale = torch.finfo(dtype).max / amax.clamp(min=1e-12)
    if pow2:
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    bits = (t * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).float().to(dtype)
    return bits.double() / scale


@pytest.mark.parametrize("recipe", RECIPES)
def test_one_linear_equals_its_definition(runtime, recipe):
    """Forward and both gradients of `fp8_linear` are the three GEMMs on quantised operands;
    37 rows exercise the padding of the row count to a multiple of 16."""
    plan = make_plan(recipe, "column", group_name=None, emulate=True, compiled=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 48, generator=g).requires_grad_()
    w = (torch.randn(32, 48, generator=g) * 0.05).requires_grad_()
    dy = torch.randn(37, 32, generator=g) * 1e-3
    y = fp8_linear(x, w, plan)
    y.backward(dy)

    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    rowwise = recipe == "rowwise"
    grad_dtype = e4 if rowwise else e5

    def axis(a):
        return a if rowwise else None

    want_y = quantised(x, e4, axis(-1), rowwise) @ quantised(w.t(), e4, axis(0), rowwise)
    want_dx = (
        quantised(dy, grad_dtype, axis(-1), rowwise) @ quantised(w.t(), e4, axis(-1), rowwise).t()
    )
    want_dw = quantised(dy, grad_dtype, axis(0), rowwise).t() @ quantised(x, e4, axis(0), rowwise)
    for got, want in ((y, want_y), (x.grad, want_dx), (w.grad, want_dw)):
        torch.testing.assert_close(
            got.detach().double(), want, rtol=1e-5, atol=1e-5 * want.abs().max()
        )
    exact = x.detach() @ w.detach().t()
    assert (y.detach() - exact).abs().max() > 1e-3 * exact.abs().max()  # really quantised


# -- the model ------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-head", "full-head"])
@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_model_matches_fp32(runtime, recipe, sparse):
    loss0, grads0, none, _ = loss_and_grads("off", sparse)
    loss, grads, converted, module = loss_and_grads(recipe, sparse)
    assert none == []
    assert len(converted) == 4 * SHAPE["num_layers"] + 1  # qkv, proj, fc1, fc2 per layer; head
    assert all(isinstance(module.get_submodule(n), Fp8LinearMixin) for n in converted)
    assert abs(loss - loss0) <= 1e-3 * abs(loss0)
    errors = {n: float((g - grads0[n]).norm() / grads0[n].norm()) for n, g in grads.items()}
    assert max(errors.values()) <= 0.2, errors
    assert errors["head.output_layer.weight"] > 1e-3  # the head runs in FP8 too


def test_a_linear_with_no_rows(runtime):
    """An expert no token was routed to: an empty output and a zero weight gradient (there is
    no amax of an empty tensor to take)."""
    for recipe in RECIPES:
        plan = make_plan(recipe, "column", group_name=None, emulate=True, compiled=False)
        x, w = torch.randn(0, 48, requires_grad=True), torch.randn(32, 48, requires_grad=True)
        y = fp8_linear(x, w, plan)
        y.sum().backward()
        assert y.shape == (0, 32) and x.grad.shape == (0, 48)
        assert torch.equal(w.grad, torch.zeros_like(w))


MOE_FIELDS = dict(
    num_experts=4, top_k=2, expert_ffn_hidden_size=64, shared_expert_ffn_hidden_size=32
)
MOE = MoEConfig(**MOE_FIELDS)
MOE_OVERRIDES = {f"model.moe.{k}": v for k, v in MOE_FIELDS.items()}


@pytest.mark.parametrize("recipe", RECIPES)
def test_moe_experts_run_in_fp8(runtime, recipe):
    """The routed and the shared experts' linears convert too (variable token counts per
    expert, padded to 16 rows); against fp32 within the model tolerances above."""
    loss0, grads0, _, _ = loss_and_grads("off", moe=MOE)
    loss, grads, converted, _ = loss_and_grads(recipe, moe=MOE)
    experts = [n for n in converted if ".mlp.experts." in n or ".mlp.shared_experts." in n]
    per_layer = 2 * (MOE.num_experts + 1)  # fc1 and fc2 of each routed and the shared expert
    assert len(experts) == per_layer * SHAPE["num_layers"]
    assert abs(loss - loss0) <= 1e-3 * abs(loss0)
    errors = {n: float((g - grads0[n]).norm() / grads0[n].norm()) for n, g in grads.items()}
    assert max(errors.values()) <= 0.2, errors
    fc1 = "layers.0.mlp.experts.local_experts.0.linear_fc1.weight"
    assert errors[fc1] > 1e-3  # really quantised


def test_parameters_and_state_dict_are_unchanged(runtime):
    cfg = model_cfg("tensorwise")
    plain = build(cfg, vocab=VOCAB, mask=MASK, seed=SEED, sequence_parallel=False)
    converted = build(cfg, vocab=VOCAB, mask=MASK, seed=SEED, sequence_parallel=False)
    apply_fp8(converted, cfg, device=CPU, emulate=True)
    a, b = plain.state_dict(), converted.state_dict()
    assert list(a) == list(b)
    for name, tensor in a.items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(tensor, b[name]) and tensor.dtype == b[name].dtype, name


@pytest.mark.parametrize("recipe", RECIPES)
def test_fp8_layers_compile_into_one_graph(runtime, recipe):
    """No graph break in the FP8 trunk; AOTAutograd (the compiled forward and backward) gives
    the eager FP8 result."""
    cfg = model_cfg(recipe)
    module = build(cfg, vocab=VOCAB, mask=MASK, seed=SEED, sequence_parallel=False)
    apply_fp8(module, cfg, device=CPU, emulate=True)
    hidden, rope = module.embedding(torch.randint(0, MASK, (2, 16))), module.rotary(16)
    explained = torch._dynamo.explain(module.trunk)(hidden, None, rope)
    assert explained.graph_break_count == 0, [str(b.reason)[:120] for b in explained.break_reasons]
    torch._dynamo.reset()
    results = []
    for trunk in (module.trunk, torch.compile(module.trunk, backend="aot_eager")):
        h = hidden.detach().requires_grad_()
        out = trunk(h, None, rope)
        out.square().sum().backward()
        results.append((out.detach(), h.grad))
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=0)
    torch._dynamo.reset()
    rows = torch.randn(37, 64)  # the head's matmul compiles with a dynamic row count
    head = module.head.output_layer
    explained = torch._dynamo.explain(fp8_linear)(rows, head.weight, head.fp8_plan)
    assert explained.graph_break_count == 0


# -- errors -----------------------------------------------------------------------------------


def test_refused_on_cpu_unless_emulated(runtime, demo_data, tmp_path, monkeypatch):
    """The trainer stops before writing anything; DLM_FP8_EMULATE=1 lets the same call run."""
    monkeypatch.delenv(fp8.EMULATE_ENV, raising=False)
    overrides = tiny_overrides(demo_data, tmp_path, "cpu", **{"model.fp8": "tensorwise"})
    with pytest.raises(ConfigError, match="model.fp8 'tensorwise' needs a GPU with FP8 tensor"):
        train(load_config(TINY, overrides))
    assert not (tmp_path / "cpu").exists()
    cfg = model_cfg("tensorwise")
    module = build(cfg, vocab=VOCAB, mask=MASK, seed=SEED, sequence_parallel=False)
    with pytest.raises(ConfigError, match="this run is on cpu"):
        apply_fp8(module, cfg, device=CPU)
    monkeypatch.setenv(fp8.EMULATE_ENV, "1")
    assert apply_fp8(module, cfg, device=CPU)


def test_refused_on_a_gpu_without_fp8_tensor_cores(monkeypatch):
    """What an A100 reports (no GPU here: the capability query is the part replaced)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ConfigError, match=r"capability >= 8.9.*A100\) has 8.0"):
        fp8.check_fp8_hardware("rowwise", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    fp8.check_fp8_hardware("rowwise", torch.device("cuda", 0))  # an H100/H200 passes


def test_missing_torchao_is_a_config_error(runtime, monkeypatch):
    monkeypatch.setattr(fp8, "_TORCHAO", None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import raises ImportError
    cfg = model_cfg("tensorwise")
    module = build(cfg, vocab=VOCAB, mask=MASK, seed=SEED, sequence_parallel=False)
    with pytest.raises(ConfigError, match=r"model.fp8 needs torchao: pip install"):
        apply_fp8(module, cfg, device=CPU, emulate=True)


def test_torchao_is_not_imported_when_fp8_is_off():
    code = (
        "import sys, torch; import pretrain.trainer, pretrain.model.fp8 as f; "
        "from pretrain.config import ModelConfig; "
        "assert f.apply_fp8(torch.nn.Linear(2, 2), ModelConfig(), device=torch.device('cpu')) "
        "== []; assert 'torchao' not in sys.modules"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_config_rejects_widths_fp8_gemms_cannot_take():
    overrides = ["model.fp8=tensorwise", "model.ffn_hidden_size=360"]
    with pytest.raises(ConfigError, match=r"model.ffn_hidden_size \(360\) divisible by 16"):
        load_config(TINY, overrides)
    with pytest.raises(ConfigError, match=r"hidden_size \(128\) divisible by 16 x .*\(16\)"):
        load_config(TINY, ["model.fp8=rowwise", "parallel.tensor_parallel=16"])
    load_config(TINY, ["model.fp8=rowwise", "parallel.tensor_parallel=2"])
    assert load_config(TINY, ["model.fp8=off"]).model.fp8 is False  # YAML's `off`
    with pytest.raises(ConfigError, match=r"model.fp8: expected one of \['tensorwise'"):
        load_config(TINY, ["model.fp8=tensor"])


# -- tensor parallelism: real processes -------------------------------------------------------


def launch_worker(spec: dict, workdir) -> dict:
    """tests/fp8_worker.py in a 2-process torchrun job (gloo); rank 0's results."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec_path, out = workdir / "spec.json", workdir / "out.pt"
    spec_path.write_text(json.dumps(spec))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(port), str(REPO / "tests" / "fp8_worker.py"), str(spec_path), str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out, weights_only=True)


TP_CASES = [
    {"recipe": r, "tp_scales": s, "sequence_parallel": False, "sparse": True}
    for r in RECIPES
    for s in ("group", "local")
] + [{"recipe": "tensorwise", "tp_scales": "group", "sequence_parallel": True, "sparse": False}]


def test_tp2_equals_one_process(runtime, demo_data, tmp_path, monkeypatch):
    """The same model and batch at TP2 and in one process, both in emulated FP8: with the TP
    group's amax (the default) equal within fp32 rounding, also with sequence parallelism and
    through the trainer (4 steps of configs/tiny.yaml at TP2 against one process); with
    per-shard amaxes the tensorwise gradients differ at FP8 resolution.

    The trainer runs have the output layer in FP8 as well: with it in full precision, the
    vocab-parallel CE's fp32 rounding (TP2) differs from the single-rank CE's, and once the
    optimizer has moved the weights such a difference can tip one of the trunk's FP8 roundings
    (observed: equal losses at steps 1-2, 4e-5 and 8e-5 apart at steps 3-4)."""
    monkeypatch.setenv(fp8.EMULATE_ENV, "1")
    steps = {"train.steps": 4, "model.fp8": "tensorwise", "model.fp8_output_layer": True}
    run = tiny_overrides(demo_data, tmp_path, "tp2", **steps, **{"parallel.tensor_parallel": 2})
    spec = {"model": SHAPE, "vocab": VOCAB, "mask": MASK, "seed": SEED, "cases": TP_CASES}
    got = launch_worker(
        {**spec, "layout": ["parallel.tensor_parallel=2"], "train": [run]}, tmp_path
    )
    one = {(r, sparse): loss_and_grads(r, sparse)[:2] for r in RECIPES for sparse in (True, False)}
    for case, result in zip(TP_CASES, got["cases"], strict=True):
        loss, grads = one[case["recipe"], case["sparse"]]
        worst = max(
            float((result["grads"][n] - g).abs().max() / g.abs().max()) for n, g in grads.items()
        )
        if case["tp_scales"] == "group":
            assert abs(result["loss"] - loss) <= 1e-6 * abs(loss), case
            assert worst <= 1e-5, (case, worst)
        elif case["recipe"] == "tensorwise":
            assert worst > 1e-2, (case, worst)  # per-shard scales quantise differently
    single = train(load_config(TINY, tiny_overrides(demo_data, tmp_path, "tp1", **steps)))
    (tp2,) = got["train"]
    assert sorted(tp2) == [1, 2, 3, 4]
    assert max(abs(tp2[s] - single.losses[s]) for s in tp2) <= 1e-5


def test_moe_in_fp8_with_recomputed_layers(runtime, demo_data, tmp_path, monkeypatch):
    """FP8 casts inside a recomputed MoE layer (its routing replayed by selective
    checkpointing): the losses of the run that keeps its activations."""
    monkeypatch.setenv(fp8.EMULATE_ENV, "1")
    losses = {}
    for ckpt in (False, True):
        values = {"train.steps": 3, "model.fp8": "tensorwise", **MOE_OVERRIDES}
        values["model.activation_checkpointing"] = ckpt
        overrides = tiny_overrides(demo_data, tmp_path, f"moe-ckpt-{ckpt}", **values)
        losses[ckpt] = train(load_config(TINY, overrides)).losses
    assert max(abs(losses[True][s] - losses[False][s]) for s in losses[False]) <= 1e-6


def test_moe_in_fp8_at_tp2_equals_one_process(runtime, demo_data, tmp_path, monkeypatch):
    """MoE in FP8: the experts' amaxes are all-reduced over the expert tensor-parallel group
    (every TP rank holds a slice of every expert and the same tokens), so one forward and
    backward at TP2 equals one process (loss within 1e-6, every gradient within 1e-5 of its
    largest magnitude), and so does the trainer's first step. Later steps drift apart a little
    (observed 4e-4 relative at step 4, 1e-7 without FP8): once fp32 rounding has moved a weight,
    an FP8 rounding or a routing decision near a tie can tip, and tokens then take other
    experts; the dense model, with no routing, stays within 1e-5 (test_tp2_equals_one_process)."""
    monkeypatch.setenv(fp8.EMULATE_ENV, "1")
    case = {"recipe": "tensorwise", "tp_scales": "group", "sequence_parallel": False}
    case["sparse"] = True
    steps = {"train.steps": 4, "model.fp8": "tensorwise", "model.fp8_output_layer": True}
    steps |= MOE_OVERRIDES
    run = tiny_overrides(demo_data, tmp_path, "moe-tp2", **steps, **{"parallel.tensor_parallel": 2})
    spec = {"model": {**SHAPE, "moe": MOE_FIELDS}, "vocab": VOCAB, "mask": MASK, "seed": SEED}
    spec |= {"layout": ["parallel.tensor_parallel=2"], "cases": [case], "train": [run]}
    got = launch_worker(spec, tmp_path)
    loss, grads, _, _ = loss_and_grads("tensorwise", moe=MOE)
    (result,) = got["cases"]
    assert abs(result["loss"] - loss) <= 1e-6 * abs(loss)
    for name, g in grads.items():
        worst = float((result["grads"][name] - g).abs().max() / g.abs().max())
        assert worst <= 1e-5, (name, worst)
    single = train(load_config(TINY, tiny_overrides(demo_data, tmp_path, "moe-tp1", **steps)))
    (tp2,) = got["train"]
    assert sorted(tp2) == [1, 2, 3, 4]
    assert abs(tp2[1] - single.losses[1]) <= 1e-6 * abs(single.losses[1])
    assert max(abs(tp2[s] - single.losses[s]) / single.losses[s] for s in tp2) <= 2e-3


# -- checkpoints: fp8 on and off share them ---------------------------------------------------


def test_checkpoints_resume_with_fp8_on_or_off(runtime, demo_data, tmp_path, monkeypatch):
    """A run checkpointed at step 4 with fp8 continues without it and the other way round:
    the checkpoints hold the same tensors either way, the first half equals the uninterrupted
    run exactly, and the resumed half follows the uninterrupted run of the new setting within
    FP8 resolution (the same weights, computed in the other precision)."""
    monkeypatch.setenv(fp8.EMULATE_ENV, "1")

    def cfg(name, recipe):
        return load_config(TINY, tiny_overrides(demo_data, tmp_path, name, **{"model.fp8": recipe}))

    straight = {r: train(cfg(f"straight-{r}", r)) for r in ("off", "tensorwise")}
    for first, then in (("tensorwise", "off"), ("off", "tensorwise")):
        name = f"{first}-then-{then}"
        head = train(cfg(name, first), stop_at=4)
        assert head.losses == {s: straight[first].losses[s] for s in (1, 2, 3, 4)}
        copy = tmp_path / f"{name}-same"  # the same checkpoint resumed in its own setting
        shutil.copytree(tmp_path / name, copy)
        tail = train(cfg(name, then))
        assert sorted(tail.losses) == [5, 6, 7, 8]
        for step, loss in tail.losses.items():
            want = straight[then].losses[step]
            assert abs(loss - want) <= 2e-2 * want and loss != want, (step, loss, want)
        same = train(cfg(copy.name, first))  # with the setting it was saved in: bit-exact
        assert same.losses == {s: straight[first].losses[s] for s in (5, 6, 7, 8)}
    saved = {r: CheckpointReader(straight[r].checkpoint) for r in straight}
    assert saved["off"].names() == saved["tensorwise"].names()
    for n in saved["off"].names():
        assert saved["off"].full(n).dtype == saved["tensorwise"].full(n).dtype, n


def test_pp2_equals_one_process(runtime, demo_data, tmp_path, monkeypatch):
    """The pipeline engine's layers and head convert too: 4 steps at PP2 (2 processes) equal
    one process, both in emulated FP8."""
    monkeypatch.setenv(fp8.EMULATE_ENV, "1")
    steps = {"train.steps": 4, "model.fp8": "rowwise", "model.fp8_output_layer": True}
    run = tiny_overrides(demo_data, tmp_path, "pp2", **steps, **{"parallel.pipeline_parallel": 2})
    spec = {"layout": ["parallel.pipeline_parallel=2"], "cases": [], "train": [run]}
    (pp2,) = launch_worker(spec, tmp_path)["train"]
    single = train(load_config(TINY, tiny_overrides(demo_data, tmp_path, "pp1", **steps)))
    assert sorted(pp2) == [1, 2, 3, 4]
    assert max(abs(pp2[s] - single.losses[s]) for s in pp2) <= 1e-5


def test_fp8_composes_with_activation_checkpointing_and_zero(
    runtime, demo_data, tmp_path, monkeypatch
):
    """Recomputed layers and ZeRO 0/3 give the losses of the plain FP8 run (the casts are
    deterministic, the parameters are DeepSpeed's as usual). The output layer is in FP8 too, as
    in the TP test above, so that ZeRO-3's fp32 reduction order cannot tip an FP8 rounding."""
    monkeypatch.setenv(fp8.EMULATE_ENV, "1")
    variants = {
        "plain": {},
        "recompute": {"model.activation_checkpointing": True},
        "zero0": {"parallel.zero_stage": 0},
        "zero3": {"parallel.zero_stage": 3},
    }
    losses = {}
    for name, extra in variants.items():
        values = {"train.steps": 3, "model.fp8": "tensorwise", "model.fp8_output_layer": True}
        values |= extra
        losses[name] = train(
            load_config(TINY, tiny_overrides(demo_data, tmp_path, name, **values))
        ).losses
    for name, got in losses.items():
        assert max(abs(got[s] - losses["plain"][s]) for s in got) <= 1e-6, name
