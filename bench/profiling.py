"""Where a GPU step's time goes: device time by kernel kind (torch.profiler), idle gaps, host
time, and the operations that make the host wait for the device. Used by bench/train_step.py and
bench/moe_step.py; every function takes a zero-argument `step_fn` that runs one training step."""

from __future__ import annotations

from pathlib import Path

import torch

# kernel-name fragments -> category, first match wins (CUDA kernel names of torch 2.11 / cuDNN 9)
KERNEL_CATEGORIES = [
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa", "mha")),
    # "pow_rsub_sqrt": inductor's name for the compiled AdamW pass of our fused optimizer
    # (pretrain.parallel.master_adamw.adamw_update_: 1 - beta ** step, sqrt(v))
    ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm", "unscale", "pow_rsub_sqrt")),
    ("loss", ("cross_entropy", "log_softmax", "logsumexp", "nll_loss", "softmax")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_xmma", "cublas", "matmul")),
]


def categorize(name: str) -> str:
    low = name.lower()
    for category, fragments in KERNEL_CATEGORIES:
        if any(f in low for f in fragments):
            return category
    return "other"


def profiled(step_fn, steps: int, activities: list):
    """torch.profiler over `steps` steps, from an idle GPU to the end of their device work."""
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step_fn()
        torch.cuda.synchronize()
    return prof


def profile(step_fn, steps: int = 3) -> dict[str, float]:
    """Device milliseconds per step by kernel category."""
    from torch.profiler import ProfilerActivity

    prof = profiled(step_fn, steps, [ProfilerActivity.CUDA])
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

    prof = profiled(step_fn, steps, [ProfilerActivity.CPU])
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
    """Source locations of the operations that make the host wait for the GPU in one step: the
    innermost calling frame outside torch itself (a `torch.cuda.synchronize()` inside a library
    is named by the library's line, not torch's)."""
    import traceback
    import warnings

    where: list[str] = []

    def record(message, category, filename, lineno, *rest):
        if "synchroniz" not in str(message):
            return
        frames = traceback.extract_stack()[:-1]
        outside = [f for f in frames if not any(t in f.filename for t in ("/torch/", "warnings"))]
        frame = outside[-1] if outside else frames[-1]
        where.append(f"{'/'.join(Path(frame.filename).parts[-3:])}:{frame.lineno}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step_fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
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


def gap_causes(step_fn, steps: int = 3, min_us: float = 50.0, top: int = 20) -> None:
    """What the host was doing while the device idled: for each device gap of at least `min_us`
    whose ending kernel was launched after the device went idle (the host was late), the host
    ranges (operators and `record_function` labels, nested ones counted at every level) that
    overlap the time from the gap's start to that launch, in ms per step. A gap whose kernel
    was launched before it began waited on something else (another stream, an event) and is
    counted apart. Reads the profiler's Chrome trace: its `correlation` ids tie each kernel to
    the runtime call that launched it."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity

    prof = profiled(step_fn, steps, [ProfilerActivity.CPU, ProfilerActivity.CUDA])
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        trace = json.loads(Path(f.name).read_text())["traceEvents"]
    events = [e for e in trace if e.get("ph") == "X"]
    print(summarize_gap_causes(events, steps, min_us, top), flush=True)


DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATS = ("cpu_op", "user_annotation", "python_function")


def summarize_gap_causes(events: list[dict], steps: int, min_us: float, top: int) -> str:
    """`gap_causes` on the complete ("ph": "X") events of a Chrome trace."""
    import bisect

    device = sorted((e for e in events if e.get("cat") in DEVICE_CATS), key=lambda e: e["ts"])
    launch = {
        e["args"]["correlation"]: e["ts"]
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    late: list[tuple[float, float]] = []  # (device idle from, late launch) windows
    other = 0.0
    busy_until = device[0]["ts"] + device[0]["dur"] if device else 0.0
    for e in device[1:]:
        gap = e["ts"] - busy_until
        if gap >= min_us:
            launched = launch.get(e.get("args", {}).get("correlation"))
            if launched is not None and launched > busy_until:
                late.append((busy_until, min(launched, e["ts"])))
            else:
                other += gap
        busy_until = max(busy_until, e["ts"] + e["dur"])
    starts = [s for s, _ in late]
    overlap: dict[str, float] = {}
    for e in events:
        if e.get("cat") not in HOST_CATS:
            continue
        a, b = e["ts"], e["ts"] + e["dur"]
        i = max(bisect.bisect_right(starts, a) - 1, 0)
        while i < len(late) and late[i][0] < b:
            lo, hi = max(a, late[i][0]), min(b, late[i][1])
            if hi > lo:
                overlap[e["name"][:90]] = overlap.get(e["name"][:90], 0.0) + hi - lo
            i += 1
    waited = sum(hi - lo for lo, hi in late)
    lines = [
        f"gap causes: {waited / 1e3 / steps:.2f} ms/step of device idle waiting for a late "
        f"launch in {len(late) / steps:.1f} gaps; {other / 1e3 / steps:.2f} ms/step of gaps "
        "whose kernel was already launched; host ranges during the late windows (ms/step):"
    ]
    ranked = sorted(overlap.items(), key=lambda kv: -kv[1])[:top]
    lines += [f"  {v / 1e3 / steps:7.2f}  {k}" for k, v in ranked]
    return "\n".join(lines)
