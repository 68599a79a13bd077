"""Uniform (linear) vs `distance` noise schedule at the same token budget, on the demo grammar
corpus and on tinyshakespeare: probe profiles and distance-bucketed CE (docs/schedules.md).

    python experiments/schedules_study.py data     # build both datasets under data/
    python experiments/schedules_study.py train    # 4 runs under runs/schedules/ (CPU, minutes)
    python experiments/schedules_study.py analyze  # figures in docs/figures/, table on stdout

Both schedules train with the same prefix conditioning (probability 0.5), model, data order,
seed and steps; only `diffusion.schedule` differs. Every measurement uses the same prompts and
masks for both runs: (1) the probe (16-token validation prompt + 112 masks, one forward);
(2) prefix CE: the probe's setting scored against the true continuation, per distance from the
prompt end; (3) CE bucketed by the distance to the nearest visible token under linear-schedule
masks on a fixed t-grid (the training schedule never chooses the evaluation masks).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO / "tests" / "data" / "tinyshakespeare.txt"
CORPORA = {"grammar": REPO / "data/exp-grammar", "shakespeare": REPO / "data/exp-shakespeare"}
SCHEDULES = ("linear", "distance")
OUT = REPO / "runs/schedules"
FIGURES = REPO / "docs/figures"
DLM = [sys.executable, "-m", "launcher.cli"]
STEPS, BATCH, SEQ, PROMPT, MASKS = 600, 32, 128, 16, 112


def build_data() -> None:
    common = ["--seq-len", str(SEQ), "--vocab-size", "1024", "--overwrite", "--no-progress"]
    subprocess.run(
        [
            *DLM,
            "data",
            "build",
            "--demo",
            "--demo-documents",
            "20000",
            "--out",
            str(CORPORA["grammar"]),
            *common,
        ],
        check=True,
    )
    subprocess.run(
        [*DLM, "data", "build", str(SHAKESPEARE), "--out", str(CORPORA["shakespeare"]), *common],
        check=True,
    )


def train_runs(only: list[str], device: str, seed: int) -> None:
    for corpus, path in CORPORA.items():
        for schedule in SCHEDULES:
            name = f"{corpus}-{schedule}"
            if only and name not in only:
                continue
            overrides = [
                f"run.name={name}",
                f"run.output_dir={OUT}",
                f"data.path={path}",
                f"data.seq_len={SEQ}",
                f"diffusion.schedule={schedule}",
                "diffusion.prefix_probability=0.5",
                "diffusion.distance_strength=2.0",
                f"train.steps={STEPS}",
                f"train.seed={seed}",
                f"train.micro_batch_size={BATCH}",
                "train.log_interval=50",
                "train.eval_interval=0",
                "train.checkpoint_interval=0",
                "train.keep_last=1",
                "optim.lr=0.002",
                "optim.warmup_steps=50",
                "tracking.enabled=false",
                f"train.device={device}",
                "train.precision=fp32",
            ]
            subprocess.run([*DLM, "train", "configs/tiny.yaml", *overrides], check=True, cwd=REPO)


@torch.no_grad()
def prefix_ce(module, val: list[torch.Tensor], mask_id: int) -> list[float]:
    """Mean CE [SEQ - PROMPT] of the true token at distance k after a clean PROMPT-token prefix,
    all later positions masked (the probe's input, scored against the data)."""
    sums = torch.zeros(SEQ - PROMPT, dtype=torch.float64)
    n = 0
    for x0 in val:
        x = x0.clone()
        x[:, PROMPT:] = mask_id
        dev = next(module.parameters()).device
        ce = module(x.to(dev), targets=x0.to(dev))[:, PROMPT:].double().cpu()
        sums += ce.sum(0)
        n += x0.shape[0]
    return (sums / n).tolist()


def analyze(device: str, only: list[str]) -> dict:
    from data_pipeline.reader import eval_batches
    from pretrain.probe.buckets import distance_bucketed_ce
    from pretrain.probe.hook import val_prompts
    from pretrain.probe.loading import load_model
    from pretrain.probe.probe import frequent_token_ids, plot_profiles, run_probe

    results: dict = {}
    for corpus, path in CORPORA.items():
        if only and not any(name.startswith(corpus) for name in only):
            continue
        val = list(
            eval_batches(
                str(path),
                "val",
                batch_size=BATCH,
                num_batches=4,
                dp_rank=0,
                dp_size=1,
                verify_checksums=False,
            )
        )
        curves = {}
        for schedule in SCHEDULES:
            loaded = load_model(OUT / f"{corpus}-{schedule}", [f"train.device={device}"])
            tok = loaded.manifest.tokenizer
            module = loaded.module
            frequent = frequent_token_ids(val, 20, (tok.mask_id,))
            dev = next(module.parameters()).device
            probe = run_probe(
                lambda x, m=module, d=dev: m(x.to(d)),
                val_prompts(val, 32, PROMPT),
                mask_id=tok.mask_id,
                eos_id=tok.eos_id,
                frequent_ids=frequent,
                num_masks=MASKS,
            )
            buckets = distance_bucketed_ce(
                lambda xt, x0, m=module, d=dev: m(xt.to(d), targets=x0.to(d)),
                val,
                mask_id=tok.mask_id,
            )
            pce = prefix_ce(module, val, tok.mask_id)
            curves[schedule] = probe
            results[f"{corpus}-{schedule}"] = {
                "probe_summary": probe.summary(),
                "probe": {
                    "entropy": probe.entropy,
                    "p_eos": probe.p_eos,
                    "frequent_share": probe.frequent_share,
                },
                "prefix_ce": pce,
                "nearest_visible_ce": buckets,
            }
        plot_profiles(
            curves,
            FIGURES / f"schedules_probe_{corpus}.png",
            title=f"{corpus}: probe (16-token prompt + {MASKS} masks), mean of 32",
        )
        _plot_ce(corpus, results)
    (OUT / "results.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    return results


def _plot_ce(corpus: str, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for schedule in SCHEDULES:
        r = results[f"{corpus}-{schedule}"]
        axes[0].plot(range(len(r["prefix_ce"])), r["prefix_ce"], label=schedule)
        labels = list(r["nearest_visible_ce"])
        axes[1].plot(
            labels, [r["nearest_visible_ce"][k]["ce"] for k in labels], "o-", label=schedule
        )
    axes[0].set_xlabel("distance from the prompt end (all later tokens masked)")
    axes[0].set_ylabel("CE of the true token (nats)")
    axes[1].set_xlabel("distance to the nearest visible token (linear-schedule masks)")
    axes[1].set_ylabel("CE (nats)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{corpus}: validation CE by distance")
    fig.tight_layout()
    fig.savefig(FIGURES / f"schedules_ce_{corpus}.png", dpi=110)
    plt.close(fig)


def table(results: dict) -> str:
    head = (
        "| corpus | schedule | prefix CE d<8 | prefix CE d 8-31 | prefix CE d>=32 | "
        "nearest-visible CE d=1 | d=2 | d 3-4 | d 5-8 | d>=9 | entropy near/far | "
        "p(eos) near/far | frequent top-1 near/far |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        corpus, schedule = name.split("-", 1)
        p = r["prefix_ce"]
        b = r["nearest_visible_ce"]
        far = [v for k, v in b.items() if k not in ("1", "2", "3-4", "5-8")]
        far_ce = sum(v["ce"] * v["count"] for v in far) / max(1, sum(v["count"] for v in far))
        s = r["probe_summary"]
        lines.append(
            f"| {corpus} | {schedule} | {sum(p[:8]) / 8:.3f} | {sum(p[8:32]) / 24:.3f} | "
            f"{sum(p[32:]) / len(p[32:]):.3f} | {b['1']['ce']:.3f} | {b['2']['ce']:.3f} | "
            f"{b['3-4']['ce']:.3f} | {b['5-8']['ce']:.3f} | {far_ce:.3f} | "
            f"{s['probe/entropy_near']:.2f} / {s['probe/entropy_far']:.2f} | "
            f"{s['probe/p_eos_near']:.3f} / {s['probe/p_eos_far']:.3f} | "
            f"{s['probe/frequent_share_near']:.2f} / {s['probe/frequent_share_far']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    global OUT, FIGURES, STEPS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["data", "train", "analyze"])
    parser.add_argument("--only", nargs="*", default=[], help="run names, e.g. grammar-linear")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=STEPS, help="optimizer steps per run")
    parser.add_argument("--seed", type=int, default=1234, help="train.seed of every run")
    parser.add_argument("--runs", default=str(OUT), help="where the runs are written")
    parser.add_argument("--figures", default=str(FIGURES), help="where the figures go")
    args = parser.parse_args()
    OUT, FIGURES, STEPS = Path(args.runs), Path(args.figures), args.steps
    stages = {
        "data": build_data,
        "train": lambda: train_runs(args.only, args.device, args.seed),
        "analyze": lambda: analyze(args.device, args.only),
    }
    stages[args.stage]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
