"""Attention kernels on the GPU: full bidirectional and document-masked, each backend of the
registry (`pretrain/model/attention.py`) timed forward + backward at a model's attention shape and
checked against the fp32 `masked` reference on the same inputs.

    python bench/attention_kernels.py --out attn.jsonl                    # llada-1b's shape
    python bench/attention_kernels.py --head-dim 128 --seq 4096 --batch 2  # llada-8b-like

Document lengths are drawn from an exponential distribution (`--mean-doc` tokens, at least 16)
and packed into the rows as `dlm data build` packs documents (the last one of a row is cut).
Throughput counts the FLOPs the mask leaves (4 b h d sum(len^2) forward, 2.5x that backward):
a kernel that skips nothing it could skip scores low. Needs CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch

from pretrain.model.attention import ATTENTION_BACKENDS, get_attention_backend
from pretrain.model.masks import AttentionMask, DocumentMask


def packed_ids(batch: int, seq: int, mean: float, gen: torch.Generator) -> torch.Tensor:
    """[batch, seq] int32 document ids of rows packed from exponential document lengths."""
    rows = []
    for _ in range(batch):
        ids, doc = [], 0
        while len(ids) < seq:
            n = max(16, int(torch.empty(1).exponential_(1 / mean, generator=gen)))
            ids += [doc] * n
            doc += 1
        rows.append(ids[:seq])
    return torch.tensor(rows, dtype=torch.int32)


def timed(fn, q, k, v, grad, iters: int) -> float:
    """Median ms of forward + backward."""
    for _ in range(3):
        torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.autograd.grad(fn(q, k, v), (q, k, v), grad)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def errors(fn, ref_out, ref_grads, q, k, v, grad) -> dict[str, float]:
    out = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    rel = {"out": (out.float() - ref_out).abs().max().item() / ref_out.abs().max().item()}
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        rel[f"d{name}"] = (g.float() - r).abs().max().item() / r.abs().max().item()
    return rel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--mean-doc", type=float, default=600.0)
    p.add_argument(
        "--backends",
        default="sdpa:cudnn,sdpa:flash,sdpa:efficient,flex,flash",
        help="registry names; sdpa:KERNEL pins one of PyTorch's SDPA kernels",
    )
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="append JSON lines here")
    a = p.parse_args()

    gen = torch.Generator().manual_seed(0)
    b, s, d = a.batch, a.seq, a.head_dim
    shape_q, shape_kv = (b, a.heads, s, d), (b, a.kv_heads, s, d)
    q, k, v = (
        torch.randn(sh, generator=gen).cuda().bfloat16().requires_grad_()
        for sh in (shape_q, shape_kv, shape_kv)
    )
    grad = torch.randn(shape_q, generator=gen).cuda().bfloat16()
    docs = DocumentMask.from_ids(packed_ids(b, s, a.mean_doc, gen)).map(lambda t: t.cuda())
    lengths = (docs.cu_seqlens[1:] - docs.cu_seqlens[:-1]).double()
    useful = {"full": b * s * s, "documents": lengths.pow(2).sum().item()}
    print(
        f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}: q {list(shape_q)}, kv "
        f"{list(shape_kv)}, {len(lengths)} documents (mean {lengths.mean():.0f} tokens), "
        f"{useful['documents'] / useful['full']:.1%} of the full score matrix"
    )

    reference = ATTENTION_BACKENDS["masked"].fn
    rows = []
    for case in ("full", "documents"):
        mask_of = {
            "full": lambda be: None,
            "documents": lambda be: be.prepare(AttentionMask(documents=docs)),
        }[case]
        ref_q, ref_k, ref_v = (t.detach().float().requires_grad_() for t in (q, k, v))
        ref_mask = None if case == "full" else docs.dense()
        ref_out = reference(ref_q, ref_k, ref_v, mask=ref_mask)
        ref_grads = torch.autograd.grad(ref_out, (ref_q, ref_k, ref_v), grad.float())
        del ref_q, ref_k, ref_v
        for name in a.backends.split(","):
            row = {"case": case, "backend": name, "mean_doc": a.mean_doc, "shape": list(shape_q)}
            try:
                backend = get_attention_backend(name.split(":")[0])
                mask = mask_of(backend)
                kernels = sdpa_only(name.split(":")[1]) if ":" in name else contextlib.nullcontext

                def fn(q_, k_, v_, backend=backend, mask=mask, kernels=kernels):
                    with kernels():  # the backward runs the kernel the forward chose
                        return backend.fn(q_, k_, v_, mask=mask)

                row.update(errors(fn, ref_out, ref_grads, q, k, v, grad))
                row["ms"] = timed(fn, q, k, v, grad, a.iters)
                flops = 4 * a.heads * d * useful[case] * 3.5
                row["tflops"] = flops / row["ms"] / 1e9
            except Exception as e:  # noqa: BLE001 - a backend that fails is a result, not a crash
                row["error"] = f"{type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(json.dumps(row))
        del ref_out, ref_grads
        torch.cuda.empty_cache()

    if "flash" in a.backends.split(",") and "error" not in rows[-1]:
        rows.append(compiled_flash_documents(q, k, v, gen, b, s, a.mean_doc))
        print(json.dumps(rows[-1]))

    print("\n| case | backend | fwd+bwd ms | TFLOP/s (useful) | max rel. error out/dq |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "ms" in r:
            err = f"{r['out']:.1e} / {r['dq']:.1e}"
            print(f"| {r['case']} | {r['backend']} | {r['ms']:.2f} | {r['tflops']:.0f} | {err} |")
        elif "error" in r:
            print(f"| {r['case']} | {r['backend']} | failed: {r['error'][:80]} | | |")
        else:  # the compiled flash row
            print(
                f"| {r['case']} | {r['backend']} | equal to eager within "
                f"{r['max_abs_diff_vs_eager']:.1e}, {r['graphs']} graphs | | |"
            )
    if a.out:
        with open(a.out, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def sdpa_only(kernel: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pretrain.parallel.build import SDPA_BACKENDS

    return lambda: sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[kernel])])


def compiled_flash_documents(q, k, v, gen, b, s, mean) -> dict:
    """The flash varlen path inside torch.compile (as the compiled layers run it), over three
    batches with different document counts: equal to eager, and how many graphs it took."""
    from torch._dynamo.utils import counters

    backend = get_attention_backend("flash")
    compiled = torch.compile(lambda q_, k_, v_, docs: backend.fn(q_, k_, v_, mask=docs))
    row = {"case": "documents", "backend": "flash+torch.compile"}
    try:
        worst = 0.0
        t0 = time.perf_counter()
        for _ in range(3):
            docs = DocumentMask.from_ids(packed_ids(b, s, mean, gen)).map(lambda t: t.cuda())
            with torch.no_grad():
                eager = backend.fn(q, k, v, mask=docs)
                got = compiled(q, k, v, docs)
            worst = max(worst, (got - eager).abs().max().item())
        row.update(max_abs_diff_vs_eager=worst, seconds=time.perf_counter() - t0)
        row["graphs"] = int(counters["stats"]["unique_graphs"])
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    return row


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = False
    assert torch.cuda.is_available(), "bench/attention_kernels.py needs a CUDA device"
    main()
