"""The information-decay probe (the seed experiment).

For each prompt, append K masks (default 128), run one forward pass, and record for every masked
position k = 0..K-1 (k = distance from the prompt's end): the top-3 tokens and probabilities, the
entropy H = -sum_v p_v log p_v (nats), p(<eos>), and whether the top-1 token is one of the corpus's
most frequent tokens. Averaged over prompts, the profiles show how fast the visible context stops
informing the prediction: far positions collapse to frequent tokens and <eos>.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

ModelFn = Callable[[torch.Tensor], torch.Tensor]  # tokens [b, s] -> logits [b, s, V]


@dataclass
class ProbeResult:
    num_masks: int
    entropy: list[float]
    """[K]: mean over prompts of the predictive entropy (nats) at distance k."""
    p_eos: list[float]
    """[K]: mean p(<eos>)."""
    frequent_share: list[float]
    """[K]: share of prompts whose top-1 token is a high-frequency token."""
    top1_prob: list[float]
    """[K]: mean top-1 probability."""
    prompts: list[dict] = field(default_factory=list)
    """Per prompt: its ids (and tokens, with a tokenizer) and per-position top-3 ids (tokens) and
    probabilities, entropy, p(eos), frequent flag."""

    def summary(self, near: int = 8) -> dict[str, float]:
        """Scalar summaries: means over the first `near` and the last `near` positions."""
        out = {}
        for name in ("entropy", "p_eos", "frequent_share"):
            values = getattr(self, name)
            out[f"probe/{name}_near"] = sum(values[:near]) / len(values[:near])
            out[f"probe/{name}_far"] = sum(values[-near:]) / len(values[-near:])
        return out

    def bucket_summary(self) -> dict[str, dict[str, float]]:
        """Profile means per distance bucket from the prompt end (1, 2, 3-4, 5-8, ...: the
        bucketed CE's buckets; the first mask is at distance 1)."""
        from pretrain.probe.buckets import bucket_edges

        out = {}
        for lo, hi in bucket_edges(self.num_masks):
            label = str(lo) if lo == hi else f"{lo}-{hi}"
            row = {"count": hi - lo + 1}
            for name in ("entropy", "p_eos", "frequent_share", "top1_prob"):
                values = getattr(self, name)[lo - 1 : hi]
                row[name] = sum(values) / len(values)
            out[label] = row
        return out


@torch.no_grad()
def run_probe(
    model_fn: ModelFn,
    prompts: Sequence[torch.Tensor],
    *,
    mask_id: int,
    eos_id: int,
    frequent_ids: torch.Tensor,
    num_masks: int = 128,
    top_k: int = 3,
    decode: Callable[[int], str] | None = None,
) -> ProbeResult:
    """prompts: 1-D long tensors (any lengths; each runs as its own sequence, no padding).
    `decode` (token id -> text) adds the prompt's and the top predictions' tokens as text."""
    if not prompts:
        raise ValueError("the probe needs at least one prompt")
    records = []
    for prompt in prompts:
        device = prompt.device
        x = torch.cat(
            [prompt, torch.full((num_masks,), mask_id, dtype=prompt.dtype, device=device)]
        )
        logits = model_fn(x[None])[0, prompt.numel() :].float()  # [K, V]
        logp = torch.log_softmax(logits, dim=-1)
        p = logp.exp()
        entropy = -(p * torch.where(p > 0, logp, 0.0)).sum(-1)  # [K]
        top_p, top_i = p.topk(top_k, dim=-1)  # [K, k]
        frequent = torch.isin(top_i[:, 0], frequent_ids.to(top_i.device))
        record = {
            "prompt_ids": prompt.tolist(),
            "top_ids": top_i.tolist(),
            "top_probs": top_p.tolist(),
            "entropy": entropy.tolist(),
            "p_eos": p[:, eos_id].tolist(),
            "top1_frequent": frequent.tolist(),
        }
        if decode is not None:
            record["prompt_tokens"] = [decode(i) for i in record["prompt_ids"]]
            record["top_tokens"] = [[decode(i) for i in row] for row in record["top_ids"]]
        records.append(record)

    def mean(key):
        rows = torch.tensor([r[key] for r in records], dtype=torch.float64)
        return rows.mean(0).tolist()

    top1 = [[probs[0] for probs in r["top_probs"]] for r in records]
    return ProbeResult(
        num_masks=num_masks,
        entropy=mean("entropy"),
        p_eos=mean("p_eos"),
        frequent_share=mean("top1_frequent"),
        top1_prob=torch.tensor(top1, dtype=torch.float64).mean(0).tolist(),
        prompts=records,
    )


def frequent_token_ids(batches: Sequence[torch.Tensor], count: int, exclude=()) -> torch.Tensor:
    """The `count` most frequent token ids in `batches` (excluding e.g. the mask id)."""
    counts = torch.bincount(torch.cat([b.reshape(-1) for b in batches]).cpu())
    for i in exclude:
        if i < counts.numel():
            counts[i] = -1
    return counts.argsort(descending=True)[:count]


def plot_profiles(
    curves: dict[str, ProbeResult],
    path: Path,
    title: str = "",
    ce: dict[str, dict[str, dict]] | None = None,
) -> Path:
    """One PNG: entropy, p(<eos>) and high-frequency share against distance, one line per curve,
    and with `ce` ({curve: distance-bucketed CE}) a fourth panel of the bucketed validation CE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("entropy", "entropy (nats)"),
        ("p_eos", "p(<eos>)"),
        ("frequent_share", "top-1 is a frequent token"),
    ]
    ce = {k: v for k, v in (ce or {}).items() if v}
    fig, axes = plt.subplots(1, 3 + bool(ce), figsize=(4.4 * (3 + bool(ce)), 3.8))
    for ax, (key, label) in zip(axes, panels, strict=False):
        for name, result in curves.items():
            values = getattr(result, key)
            ax.plot(range(1, len(values) + 1), values, label=name)
        ax.set_xlabel("distance from the prompt end")
        ax.set_ylabel(label)
        ax.set_title(f"probe: {label}", fontsize=9)
        ax.grid(alpha=0.3)
    if ce:
        ax = axes[3]
        for name, buckets in ce.items():
            labels = list(buckets)
            ax.plot(labels, [buckets[k]["ce"] for k in labels], "o-", label=name)
        ax.set_xlabel("distance to the nearest visible token")
        ax.set_ylabel("validation CE (nats)")
        ax.set_title("bucketed CE (linear-schedule masks)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=45)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "information-decay probe")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def probe_record(result: ProbeResult, buckets: dict | None = None) -> dict:
    """The JSON of one probe: profiles, summaries (near/far and per bucket), bucketed CE, and
    the per-prompt records."""
    return {
        "num_masks": result.num_masks,
        "summary": result.summary(),
        "bucket_summary": result.bucket_summary(),
        "profiles": {
            "entropy": result.entropy,
            "p_eos": result.p_eos,
            "frequent_share": result.frequent_share,
            "top1_prob": result.top1_prob,
        },
        "distance_bucketed_ce": buckets or {},
        "prompts": result.prompts,
    }


def write_probe(
    result: ProbeResult,
    out_dir: Path,
    *,
    name: str = "probe",
    title: str = "",
    buckets: dict | None = None,
) -> tuple[Path, Path]:
    """`<name>.json` (`probe_record`) and `<name>.png` (titled; with the bucketed CE)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(probe_record(result, buckets)))
    title = title or f"{name}: {len(result.prompts)} prompts + {result.num_masks} masks"
    png = plot_profiles({name: result}, out_dir / f"{name}.png", title, {name: buckets or {}})
    return json_path, png
