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
    """Per prompt: its ids and per-position top-3 ids/probs, entropy, p(eos), frequent flag."""

    def summary(self, near: int = 8) -> dict[str, float]:
        """Scalar summaries: means over the first `near` and the last `near` positions."""
        out = {}
        for name in ("entropy", "p_eos", "frequent_share"):
            values = getattr(self, name)
            out[f"probe/{name}_near"] = sum(values[:near]) / len(values[:near])
            out[f"probe/{name}_far"] = sum(values[-near:]) / len(values[-near:])
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
) -> ProbeResult:
    """prompts: 1-D long tensors (any lengths; each runs as its own sequence, no padding)."""
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
        records.append(
            {
                "prompt_ids": prompt.tolist(),
                "top_ids": top_i.tolist(),
                "top_probs": top_p.tolist(),
                "entropy": entropy.tolist(),
                "p_eos": p[:, eos_id].tolist(),
                "top1_frequent": frequent.tolist(),
            }
        )

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


def plot_profiles(curves: dict[str, ProbeResult], path: Path, title: str = "") -> Path:
    """One PNG: entropy, p(<eos>) and high-frequency share against distance, one line per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = (
        ("entropy", "entropy (nats)"),
        ("p_eos", "p(<eos>)"),
        ("frequent_share", "top-1 is a frequent token"),
    )
    for ax, (key, label) in zip(axes, panels, strict=True):
        for name, result in curves.items():
            values = getattr(result, key)
            ax.plot(range(len(values)), values, label=name)
        ax.set_xlabel("distance from the prompt end (masked position)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_probe(result: ProbeResult, out_dir: Path, *, name: str = "probe") -> tuple[Path, Path]:
    """`<name>.json` (profiles, summary, per-prompt records) and `<name>.png`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "num_masks": result.num_masks,
        "summary": result.summary(),
        "profiles": {
            "entropy": result.entropy,
            "p_eos": result.p_eos,
            "frequent_share": result.frequent_share,
            "top1_prob": result.top1_prob,
        },
        "prompts": result.prompts,
    }
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(data))
    png = plot_profiles({name: result}, out_dir / f"{name}.png")
    return json_path, png
