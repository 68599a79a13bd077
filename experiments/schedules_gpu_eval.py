"""Measurements of one trained checkpoint for `experiments/schedules_gpu_study.py`, and the
study's table and figures.

Every model is measured on the same validation sequences and the same masks (keyed by a fixed
seed, not the training seed), so differences between runs are paired:

    nearest-visible CE   CE of masked tokens bucketed by the distance to the nearest visible
                         token, under linear-schedule masks on a fixed t-grid; per sequence, so
                         that means get bootstrap intervals and runs paired differences
    linear NELBO         the same pass's NELBO per token slot (a valid bound for every model;
                         each run's own-schedule NELBO comes from the trainer's final eval)
    prefix CE            CE of the true continuation after a clean prefix, everything later
                         masked (the probe's input scored against the data), by distance
    probe                entropy / p(eos) / frequent-token share after held-out prompts
    generation           continuations of held-out prompts at several tokens per step, with the
                         decoder matching the training schedule; unigram / bigram statistics
                         against the validation text and repetition (`pretrain.probe.text_stats`)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

FAR = 9  # nearest-visible distances >= FAR are "far"
PREFIX_FAR = 32  # prefix-CE distances >= PREFIX_FAR are "far"


@torch.no_grad()
def masked_pass(module, val: list[torch.Tensor], mask_id: int) -> dict:
    """Per sequence [N, buckets]: CE sums and counts by nearest-visible distance, and the
    linear-schedule NELBO sum per sequence [N] (over L slots)."""
    from pretrain.diffusion.corruption import CorruptionKey
    from pretrain.diffusion.objective import MaskedDiffusion
    from pretrain.diffusion.schedules import build_schedule
    from pretrain.probe.buckets import bucket_edges, nearest_visible_distance

    corrupt = MaskedDiffusion(
        build_schedule("linear"), mask_id=mask_id, eps=1e-3, antithetic=True,
        normalization="token_slot",
    )  # fmt: skip
    device = next(module.parameters()).device
    edges = bucket_edges(val[0].shape[1])
    sums, counts, nelbo = [], [], []
    for i, x0 in enumerate(val):
        batch = corrupt.prepare_eval(x0, CorruptionKey(0, 0, i, 0, len(val), 1))
        ce = module(batch.inputs.to(device), targets=x0.to(device)).double().cpu()
        masked = batch.masked.cpu()
        dist = nearest_visible_distance(masked)
        weights = batch.loss_weights.double().cpu()
        nelbo.append(torch.where(masked, ce * weights, 0.0).sum(1) / x0.shape[1])
        s = torch.zeros(x0.shape[0], len(edges), dtype=torch.float64)
        c = torch.zeros_like(s)
        for k, (lo, hi) in enumerate(edges):
            sel = masked & (dist >= lo) & (dist <= hi)
            s[:, k] = torch.where(sel, ce, 0.0).sum(1)
            c[:, k] = sel.sum(1)
        sums.append(s)
        counts.append(c)
    labels = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in edges]
    return {
        "labels": labels,
        "lows": [lo for lo, _ in edges],
        "sums": torch.cat(sums).numpy(),
        "counts": torch.cat(counts).numpy(),
        "nelbo": torch.cat(nelbo).numpy(),
    }


@torch.no_grad()
def prefix_pass(module, val: list[torch.Tensor], mask_id: int, prefix: int) -> np.ndarray:
    """CE [N, S - prefix] of the true token at distance 1.. after a clean `prefix`."""
    device = next(module.parameters()).device
    rows = []
    for x0 in val:
        x = x0.clone()
        x[:, prefix:] = mask_id
        rows.append(module(x.to(device), targets=x0.to(device))[:, prefix:].double().cpu())
    return torch.cat(rows).numpy()


def bootstrap(values: np.ndarray, weights: np.ndarray | None = None, n: int = 1000, seed=0):
    """Ratio of sums over sequences (the mean when `weights` is None: CE sums over token
    counts otherwise) and its 95% bootstrap interval, resampling sequences."""
    rng = np.random.default_rng(seed)
    w = np.ones_like(values) if weights is None else weights
    idx = rng.integers(0, len(values), size=(n, len(values)))
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample without any weight: NaN
        draws = values[idx].sum(1) / w[idx].sum(1)
    point = values.sum() / w.sum() if w.sum() > 0 else math.nan
    return float(point), float(np.nanpercentile(draws, 2.5)), float(np.nanpercentile(draws, 97.5))


def far_values(passed: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence CE sums and counts over the far buckets (distance >= FAR)."""
    far = [k for k, lo in enumerate(passed["lows"]) if lo >= FAR]
    return passed["sums"][:, far].sum(1), passed["counts"][:, far].sum(1)


def summarize_masked(passed: dict) -> dict:
    out = {"nearest_visible_ce": {}, "linear_nelbo": bootstrap(passed["nelbo"])}
    for k, label in enumerate(passed["labels"]):
        if passed["counts"][:, k].sum() > 0:
            out["nearest_visible_ce"][label] = {
                "ce": bootstrap(passed["sums"][:, k], passed["counts"][:, k]),
                "count": int(passed["counts"][:, k].sum()),
            }
    sums, counts = far_values(passed)
    out["far_ce"] = bootstrap(sums, counts) if counts.sum() else (math.nan,) * 3
    return out


def paired_difference(a: dict, b: dict, n: int = 1000, seed: int = 0) -> tuple[float, ...]:
    """Far-bucket CE of run a minus run b on the same sequences and masks, with a paired 95%
    bootstrap interval over sequences."""
    sa, ca = far_values(a)
    sb, cb = far_values(b)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sa), size=(n, len(sa)))

    def diff(i):
        with np.errstate(invalid="ignore", divide="ignore"):
            return sa[i].sum(-1) / ca[i].sum(-1) - sb[i].sum(-1) / cb[i].sum(-1)

    point = float(diff(np.arange(len(sa))))
    draws = diff(idx)
    return point, float(np.nanpercentile(draws, 2.5)), float(np.nanpercentile(draws, 97.5))


def summarize_prefix(ce: np.ndarray) -> dict:
    d = np.arange(1, ce.shape[1] + 1)
    out = {"profile": ce.mean(0).tolist()}
    for name, sel in (("d<8", d < 8), ("d8-31", (d >= 8) & (d < PREFIX_FAR)),
                      ("d>=32", d >= PREFIX_FAR)):  # fmt: skip
        if sel.any():
            out[name] = bootstrap(ce[:, sel].mean(1))
    return out


@torch.no_grad()
def generation(loaded, val, *, prompt_len, gen_length, tokens_per_step, samples, seed=0):
    """Continuations of `samples` held-out prompts at each tokens-per-step setting and both
    temperatures, with the decoder that matches training; their statistics and 3 texts each."""
    from pretrain.probe.text_stats import bigrams, text_stats
    from pretrain.sampling.models import decode_defaults, objective_model_fn
    from pretrain.sampling.sampler import generate

    tok = loaded.manifest.tokenizer
    device = next(loaded.module.parameters()).device
    rows = torch.cat(val)
    prompts = rows[:samples, :prompt_len]
    reference = rows[samples:] if rows.shape[0] > 2 * samples else rows
    ref_bigrams = bigrams(reference.tolist())
    model_fn = objective_model_fn(loaded.module, loaded.cfg.diffusion)
    options = decode_defaults(loaded.cfg.diffusion, loaded.cfg.data.seq_len)
    out = {}
    for temperature in (1.0, 0.0):
        for k in tokens_per_step:
            x = generate(
                model_fn,
                prompts.to(device),
                gen_length=gen_length,
                tokens_per_step=k,
                mask_id=tok.mask_id,
                temperature=temperature,
                generator=torch.Generator(device=device).manual_seed(seed),
                **{key: v for key, v in options.items() if key != "tokens_per_step"},
            ).cpu()
            span = x[:, prompt_len:]
            stats = text_stats(span, reference, eos_id=tok.eos_id, reference_bigrams=ref_bigrams)
            stats["examples"] = [loaded.tokenizer.decode(r.tolist()) for r in x[:3]]
            out[f"T{temperature:g}_tps{k}"] = stats
    return out


def save_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")


def fmt_ci(ci) -> str:
    """`mean [low, high]` of a (mean, low, high) triple; `-` for none."""
    return "-" if ci is None or math.isnan(ci[0]) else f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"


def report(runs: list[dict], tokens_per_step: list[int]) -> str:
    """Markdown: the main table, far-bucket differences to `linear`, generation statistics."""
    lines = [
        "| variant | seed | steps | train tokens | train s | own-schedule val NELBO | "
        "linear NELBO | CE d=1 | d=2 | d 3-4 | d 5-8 | far CE d>=9 [95% CI] | "
        "prefix CE d<8 | d 8-31 | d>=32 | entropy near / far |",
        "|" + "---|" * 16,
    ]
    for r in runs:
        ce = r["masked"]["nearest_visible_ce"]
        near = [f"{ce[k]['ce'][0]:.3f}" if k in ce else "-" for k in ("1", "2", "3-4", "5-8")]
        p = r["prefix"]
        pre = [f"{p[k][0]:.3f}" if k in p else "-" for k in ("d<8", "d8-31", "d>=32")]
        s = r["probe"]["summary"]
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['steps']} | {r['train_tokens'] / 1e6:.1f}M | "
            f"{r['train_seconds']:.0f} | {r['own_nelbo']:.4f} | "
            f"{r['masked']['linear_nelbo'][0]:.4f} | " + " | ".join(near) + " | "
            f"{fmt_ci(r['masked']['far_ce'])} | " + " | ".join(pre) + " | "
            f"{s['probe/entropy_near']:.2f} / {s['probe/entropy_far']:.2f} |"
        )
    lines += [
        "",
        "Far-bucket CE (d >= 9) minus `linear` of the same seed, paired over the same sequences "
        "and masks [95% bootstrap CI]; seed spread where a variant ran with several seeds:",
        "",
        "| variant | seed | far CE - linear | prefix CE d>=32 - linear |",
        "|---|---|---|---|",
    ]
    for r in runs:
        if "vs_linear" in r:
            lines.append(
                f"| {r['variant']} | {r['seed']} | {fmt_ci(r['vs_linear']['far_ce'])} | "
                f"{fmt_ci(r['vs_linear'].get('prefix_far'))} |"
            )
    by_variant: dict[str, list[float]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], []).append(r["masked"]["far_ce"][0])
    for variant, values in by_variant.items():
        if len(values) > 1:
            lines.append(
                f"\n`{variant}` far CE over {len(values)} seeds: mean {np.mean(values):.4f}, "
                f"spread (max - min) {max(values) - min(values):.4f}"
            )
    head = " | ".join(f"T{t:g} tps {k}" for t in (1.0, 0.0) for k in tokens_per_step)
    lines += [
        "",
        "Generated continuations (unigram JS vs validation / share of bigrams seen in validation "
        "/ 4-gram repetition):",
        "",
        f"| variant | seed | {head} |",
        "|---|---|" + "---|" * (2 * len(tokens_per_step)),
    ]
    for r in runs:
        cells = []
        for t in (1.0, 0.0):
            for k in tokens_per_step:
                g = r["generation"][f"T{t:g}_tps{k}"]
                cells.append(
                    f"{g['unigram_js']:.3f} / {g['bigram_seen']:.2f} / {g['repetition_4gram']:.2f}"
                )
        lines.append(f"| {r['variant']} | {r['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figures(runs: list[dict], out: Path, tokens_per_step: list[int]) -> list[Path]:
    """ce_by_distance.png (bucketed CE with intervals, prefix CE) and generation.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pretrain.probe.buckets import bucket_edges

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for r in runs:
        name = f"{r['variant']} s{r['seed']}"
        ce = r["masked"]["nearest_visible_ce"]
        labels = list(ce)
        mid = [ce[k]["ce"][0] for k in labels]
        err = [[m - ce[k]["ce"][1] for k, m in zip(labels, mid, strict=True)],
               [ce[k]["ce"][2] - m for k, m in zip(labels, mid, strict=True)]]  # fmt: skip
        axes[0].errorbar(labels, mid, yerr=err, marker="o", capsize=2, label=name)
        profile = r["prefix"]["profile"]  # per distance; plotted as means over 1, 2, 3-4, ...
        edges = bucket_edges(len(profile))
        means = [float(np.mean(profile[lo - 1 : hi])) for lo, hi in edges]
        axes[1].plot([(lo + hi) / 2 for lo, hi in edges], means, "o-", label=name)
    axes[0].set_xlabel("distance to the nearest visible token (linear-schedule masks)")
    axes[0].set_ylabel("validation CE (nats), 95% CI")
    axes[0].set_title("distance-bucketed CE")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("distance from the end of the clean prefix (everything later masked)")
    axes[1].set_ylabel("CE of the true token (nats)")
    axes[1].set_title("prefix CE (means over distance buckets)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("schedules on the real corpus: validation CE by distance")
    fig.tight_layout()
    paths.append(out / "ce_by_distance.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    keys = (("unigram_js", "unigram JS divergence vs validation"),
            ("bigram_seen", "share of bigrams seen in validation"),
            ("repetition_4gram", "4-gram repetition within a sample"))  # fmt: skip
    for ax, (key, title) in zip(axes, keys, strict=True):
        for i, r in enumerate(runs):
            for t, style in ((1.0, "-"), (0.0, ":")):
                ys = [r["generation"][f"T{t:g}_tps{k}"][key] for k in tokens_per_step]
                label = f"{r['variant']} s{r['seed']} T{t:g}"
                ax.plot(tokens_per_step, ys, style, marker="o", color=f"C{i}", label=label)

        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per step")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    fig.suptitle("generated continuations of held-out prompts (solid: T=1, dotted: greedy)")
    fig.tight_layout()
    paths.append(out / "generation.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
