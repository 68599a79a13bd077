"""Where a GPU step's time goes: device time by kernel kind (torch.profiler), idle gaps, host
time, and the operations that make the host wait for the device. Used by bench/train_step.py and
bench/moe_step.py; every function takes a zero-argument `step_fn` that runs one training step."""

from __future__ import annotations

from pathlib import Path

import torch

# kernel-name fragments -> category, first match wins (CUDA kernel names of torch 2.11 / cuDNN 9)
KERNEL_CATEGORIES = [
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "mha")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm", "unscale")),
    ("loss", ("cross_entropy", "log_softmax", "logsumexp", "nll_loss", "softmax")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "matmul")),
]


def categorize(name: str) -> str:
    low = name.lower()
    for category, fragments in KERNEL_CATEGORIES:
        if any(f in low for f in fragments):
            return category
    return "other"


def profiled(step_fn, steps: int, activity):
    """torch.profiler over `steps` steps, from an idle GPU to the end of their device work."""
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[activity]) as prof:
        for _ in range(steps):
            step_fn()
        torch.cuda.synchronize()
    return prof


def profile(step_fn, steps: int = 3) -> dict[str, float]:
    """Device milliseconds per step by kernel category."""
    from torch.profiler import ProfilerActivity

    prof = profiled(step_fn, steps, ProfilerActivity.CUDA)
    totals: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us and event.device_type.name == "CUDA":
            cat = categorize(event.key)
            totals[cat] = totals.get(cat, 0.0) + us / 1e3 / steps
            kernels[f"{cat}: {event.key[:90]}"] = us / 1e3 / steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    print("top kernels (ms/step):\n" + "\n".join(f"  {v:7.2f}  {k}" for k, v in top), flush=True)
    idle_gaps(prof, steps)
    return dict(sorted(totals.items()))


def idle_gaps(prof, steps: int, min_us: float = 50.0) -> None:
    """Where the device idles: gaps of at least `min_us` between consecutive kernels, summed per
    step and grouped by the kernel that ends each gap (what the device was waiting for)."""
    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start
    )
    by_next: dict[str, list[float]] = {}
    busy_until = spans[0][1] if spans else 0.0
    for start, end, name in spans[1:]:
        if start - busy_until >= min_us:
            by_next.setdefault(name[:80], []).append((start - busy_until) / 1e3)
        busy_until = max(busy_until, end)
    total = sum(sum(v) for v in by_next.values()) / steps
    top = sorted(by_next.items(), key=lambda kv: -sum(kv[1]))[:10]
    lines = [f"  {sum(v) / steps:7.2f} ms in {len(v) / steps:5.1f} gaps before {k}" for k, v in top]
    print(f"idle gaps >= {min_us:.0f} us: {total:.1f} ms/step\n" + "\n".join(lines), flush=True)


# CUDA runtime calls in which the host waits for the device (a sync, or a full launch queue)
WAITS = ("Synchronize", "cudaMemcpy", "cudaStreamWait")


def host_profile(step_fn, steps: int = 3) -> dict[str, float]:
    """Host milliseconds per step: the CUDA runtime calls that wait for the device (including the
    synchronise that ends the profiled steps, i.e. how far the host ran ahead), the kernel
    launches, and the busiest host operations by self time (the profiler's own cost included,
    so compare the shares, not the totals, with the step time)."""
    from torch.profiler import ProfilerActivity

    prof = profiled(step_fn, steps, ProfilerActivity.CPU)
    ops = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
    out = {
        "host_total": sum(ops.values()),
        "waiting_for_device": sum(v for k, v in ops.items() if any(w in k for w in WAITS)),
        "kernel_launches": sum(v for k, v in ops.items() if "Launch" in k),
    }
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:15]
    print("host time (ms/step): " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()), flush=True)
    print("top host ops (self ms/step):\n" + "\n".join(f"  {v:7.2f}  {k[:90]}" for k, v in top))
    return out


def host_syncs(step_fn) -> list[str]:
    """Source locations of the operations that make the host wait for the GPU in one step."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step_fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    where = [
        f"{'/'.join(Path(w.filename).parts[-3:])}:{w.lineno}"
        for w in caught
        if "synchroniz" in str(w.message)
    ]
    return sorted(set(where), key=where.index)


def sync_trace(step_fn) -> None:
    """Print the Python stack of the first operation in a step that makes the host wait."""
    import traceback

    torch.cuda.set_sync_debug_mode("error")
    try:
        step_fn()
        print("no host sync in a step", flush=True)
    except RuntimeError:
        print("first host sync in a step:\n" + traceback.format_exc(limit=-12), flush=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
