"""Our model class for lm-evaluation-harness, registered as `dlm`:

    import pretrain.evaluation.harness  # registers "dlm"
    lm_eval.simple_evaluate(model="dlm", model_args="path=runs/tiny,mc_samples=128", tasks=[...])

Model arguments (all optional but `path`, or `model` from Python):
    path            checkpoint / run directory (its latest checkpoint) / exported directory
    data            dataset directory holding the tokenizer, when a checkpoint's data.path moved
    mc_samples      Monte-Carlo samples per loglikelihood request (default 128)
    batch_size      sequences per forward pass (default 32; "auto" = 32)
    seed            seeds every request's masks together with its tokens (default 1234)
    device, dtype   default: this process's GPU in bf16, else the CPU in fp32
    max_length      longest input in tokens (default: the training sequence length)
    steps, block_length, tokens_per_step, gen_length   generation (`pretrain.evaluation.decoding`)
    pad_multiple    rows are padded to a multiple of this (default 8)
    future_masks    fill bidirectional models' inputs with masks up to max_length (default false)

Under torchrun every process loads the model, scores its share of each request list and receives
everyone's scores, so the harness sees one process's results on every rank (`distributed.py`).
After a run, `estimator_report()` gives the Monte-Carlo standard errors per task and the
requests per second of each request type.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from pretrain.evaluation.decoding import DecodeOptions, Decoder
from pretrain.evaluation.distributed import DataParallel
from pretrain.evaluation.layouts import build_layout
from pretrain.evaluation.scoring import Request, Score, Scorer

DEFAULT_MC_SAMPLES = 128
DEFAULT_BATCH_SIZE = 32


def _int(value, default: int | None) -> int | None:
    if value is None or value == "" or (isinstance(value, str) and value.startswith("auto")):
        return default
    return int(value)


@register_model("dlm")
class DLMEvalHarness(TemplateLM):
    """Masked / block diffusion and causal models of dlm-pretrain for lm-evaluation-harness."""

    backend = "causal"  # the harness's pair encoding: whole text, then split (no re-tokenising)

    def __init__(
        self,
        path: str | None = None,
        *,
        model=None,
        data: str | None = None,
        mc_samples=DEFAULT_MC_SAMPLES,
        batch_size=DEFAULT_BATCH_SIZE,
        seed=1234,
        device: str | None = None,
        dtype: str | None = None,
        max_length=None,
        steps=None,
        block_length=None,
        tokens_per_step=None,
        gen_length=256,
        pad_multiple=8,
        future_masks=False,
        dp: DataParallel | None = None,
        max_batch_size=None,  # passed by simple_evaluate; batches are fixed-size here
    ):
        super().__init__()
        if model is None:
            if not path:
                raise ValueError("model_args: path=CHECKPOINT_OR_EXPORT is required")
            from pretrain.evaluation.loading import load_eval_model

            model = load_eval_model(path, device=device, dtype=dtype, data=data)
        self.model = model
        self.dp = dp or DataParallel.from_environment()
        self.mc_samples = _int(mc_samples, DEFAULT_MC_SAMPLES)
        self.batch_size = _int(batch_size, DEFAULT_BATCH_SIZE)
        self.seed = int(seed)
        self._max_length = _int(max_length, model.seq_len)
        self.layout = build_layout(model.diffusion, seq_len=model.seq_len, mask_id=model.mask_id)
        self.scorer = Scorer(
            model.net,
            self.layout,
            samples=self.mc_samples,
            batch_size=self.batch_size,
            seed=self.seed,
            max_length=self._max_length,
            pad_id=model.eos_id,
            pad_multiple=int(pad_multiple),
            future_masks=str(future_masks).lower() in ("1", "true", "yes"),
            dp=self.dp,
        )
        options = DecodeOptions(
            steps=_int(steps, None),
            block_length=_int(block_length, None),
            tokens_per_step=_int(tokens_per_step, None),
            gen_length=int(gen_length),
        )
        self.decoder = Decoder(model, options, batch_size=self.batch_size, seed=self.seed)
        self.records: list[dict] = []
        self.timing: dict[str, dict] = defaultdict(lambda: {"requests": 0, "seconds": 0.0})

    # -- what the harness asks of a model ----------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.model.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self.model.device

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.model.encode(string)  # as the data pipeline encodes: no special tokens

    def tok_decode(self, tokens) -> str:
        return self.model.decode(list(tokens))

    def get_model_info(self) -> dict:
        return {
            "model_source": self.model.source,
            "estimator": self.layout.describe(),
            "mc_samples": 0 if self.layout.exact else self.mc_samples,
            "seed": self.seed,
            "processes": self.dp.size,
        }

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        start = time.perf_counter()
        self._pending = []
        out = super().loglikelihood(requests, disable_tqdm=True)
        for instance, score in zip(requests, self._pending, strict=True):
            self.records.append(
                {"task": instance.task_name, "doc_id": instance.doc_id, "score": score}
            )
        self._time("loglikelihood", len(requests), start)
        return out

    def _loglikelihood_tokens(self, requests, **kwargs):
        fitted = [self.scorer.fit(ctx, cont) for _, ctx, cont in requests]
        scores = self.scorer.score(fitted)
        self._pending = scores
        for (key, _, _), s in zip(requests, scores, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, (s.loglik, s.greedy))
        return [(s.loglik, s.greedy) for s in scores]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) >= the sum over disjoint windows of each window's NELBO bound given the
        tokens before it in the window (a bound, not the likelihood; exact for `ar`)."""
        start = time.perf_counter()
        windows, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            pieces = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.eot_token_id,
                max_seq_len=self.max_length - 1,  # context + continuation <= max_length
                context_len=1,
            )
            for ctx, cont in map(make_disjoint_window, pieces):
                windows.append(Request(tuple(ctx), tuple(cont)))
                owner.append(n)
        scores = self.scorer.score(windows)
        totals = [0.0] * len(requests)
        variances = [0.0] * len(requests)
        for n, s in zip(owner, scores, strict=True):
            totals[n] += s.loglik
            variances[n] += s.stderr**2
        for instance, total, var in zip(requests, totals, variances, strict=True):
            score = Score(total, math.sqrt(var), False, 0)
            self.records.append(
                {"task": instance.task_name, "doc_id": instance.doc_id, "score": score}
            )
            self.cache_hook.add_partial("loglikelihood_rolling", instance.args, total)
        self._time("loglikelihood_rolling", len(requests), start)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        start = time.perf_counter()
        gens = [self.decoder.request(ctx, kwargs) for ctx, kwargs in (r.args for r in requests)]
        mine = list(range(self.dp.rank, len(gens), self.dp.size))  # decoding is per request
        local = dict(zip(mine, self.decoder.run([gens[i] for i in mine]), strict=True))
        texts = self.dp.gather_dict(local)
        out = [texts[i] for i in range(len(gens))]
        for instance, text in zip(requests, out, strict=True):
            self.cache_hook.add_partial("generate_until", instance.args, text)
        self._time("generate_until", len(requests), start)
        return out

    def _time(self, kind: str, count: int, start: float) -> None:
        entry = self.timing[kind]
        entry["requests"] += count
        entry["seconds"] += time.perf_counter() - start

    # -- what we report beyond the harness ----------------------------------------------------
    def estimator_report(self) -> dict:
        """Per task: Monte-Carlo standard errors of the log-likelihoods and how many decisions
        (the best choice of a multiple-choice document) are within 2 standard errors of the
        runner-up (of their difference); per request type: requests and requests/s."""
        tasks: dict[str, dict] = {}
        by_doc = defaultdict(list)
        for r in self.records:
            by_doc[(r["task"], r["doc_id"])].append(r)
        for task in sorted({r["task"] for r in self.records}, key=str):
            rows = [r for r in self.records if r["task"] == task]
            errors = [r["score"].stderr for r in rows if not math.isnan(r["score"].stderr)]
            docs = [v for (t, _), v in by_doc.items() if t == task and len(v) > 1]
            close = sum(_close_call(v) for v in docs)
            tasks[str(task)] = {
                "requests": len(rows),
                "mc_stderr_mean": sum(errors) / len(errors) if errors else 0.0,
                "mc_stderr_max": max(errors, default=0.0),
                "decisions_within_2se": close / len(docs) if docs else 0.0,
            }
        speed = {
            kind: {
                "requests": v["requests"],
                "seconds": round(v["seconds"], 3),
                "requests_per_s": v["requests"] / v["seconds"] if v["seconds"] else 0.0,
            }
            for kind, v in self.timing.items()
        }
        return {"estimator": self.get_model_info(), "tasks": tasks, "speed": speed}


def _close_call(choices: list[dict]) -> bool:
    """The best and second-best log-likelihoods differ by less than 2 standard errors of their
    difference (paired when the two were scored on the same masks)."""
    ranked = sorted((r["score"] for r in choices), key=lambda s: s.loglik, reverse=True)
    a, b = ranked[0], ranked[1]
    return a.loglik - b.loglik < 2 * a.difference_stderr(b)
