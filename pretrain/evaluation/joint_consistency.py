"""The joint-consistency metric, logged at evaluation: how much parallel decoding costs.

For each k in `auxiliary.eval_tokens_per_step`, `auxiliary.eval_samples` sequences of
`data.seq_len` tokens are sampled from all-masks with k tokens committed per model call
(temperature 1, confidence order, the same seed at every evaluation) and scored two ways:

  jc/agreement_error_tps{k}   fraction of the parsed sentences that break subject-verb (or
                              determiner-noun) agreement (`data_pipeline.grammar`); meaningful on
                              the demo grammar. NaN when no sentence parsed: an error rate of
                              nothing, never a perfect 0 (MLflow stores and plots NaN as a gap)
  jc/parsed_sentences_tps{k}  how many sentences parsed (what the error rate is a fraction of)
  jc/parsed_samples_tps{k}    how many of the `eval_samples` sampled sequences hold at least one
                              parsed sentence
  jc/sample_nelbo_tps{k}      the model's own validation NELBO (per token slot, fixed t-grid and
                              masks) of its samples (`jc/sample_surrogate_loss_tps{k}` under a
                              surrogate schedule, which has no NELBO: pretrain.diffusion.labels).
                              On any text, a model that decodes k tokens per step consistently
                              scores its k-step samples as well as its 1-step ones;
                              `jc/sample_nelbo_gap_tps{k}` is the difference to the smallest k
                              (the most sequential decoding evaluated)

Every rank samples the same sequences (one seeded generator, logits gathered over TP, forwards
through `Engine.infer` in every layout), so the metric needs no communication beyond the
model's own and the NELBO's all-reduce.
"""

from __future__ import annotations

import torch

from pretrain.diffusion.corruption import CorruptionKey, derived_generator
from pretrain.diffusion.labels import bound_name
from pretrain.parallel.engine import host_metrics


def engine_logits(run):
    """x [b, s] -> aligned fp32 logits [b, s, V] of `run`'s model, every rank, any layout."""
    from pretrain.diffusion.auxiliary.base import read_logits
    from pretrain.model.inputs import ModelInputs
    from pretrain.model.masks import AttentionMask

    objective, vocab = run.recipe.objective, run.data.vocab_size

    def logits(x: torch.Tensor) -> torch.Tensor:
        x = x.to(run.rt.device)
        mask = objective.generation_mask(x.shape[1], x.device)
        inputs = ModelInputs(x, None, None if mask is None else AttentionMask(pattern=mask))
        raw = run.engine.infer(inputs, read_logits, (*x.shape, vocab))
        return objective.align_logits(raw)

    return logits


@torch.no_grad()
def joint_consistency(run) -> dict[str, float]:
    from data_pipeline.grammar import agreement_error_rate
    from data_pipeline.tokenizer import load_tokenizer
    from pretrain.sampling.sampler import generate

    cfg, data, rt = run.cfg, run.data, run.rt
    tokenizer = load_tokenizer(data.data_dir / data.manifest.tokenizer.file)
    logits = engine_logits(run)
    n = cfg.auxiliary.eval_samples
    block = run.recipe.objective.decode_defaults(cfg.data.seq_len).get("block_length")
    bound = bound_name(run.recipe.objective.schedule)  # nelbo, or surrogate_loss
    out: dict[str, float] = {}
    for k in sorted(cfg.auxiliary.eval_tokens_per_step):
        samples = generate(
            logits,
            torch.zeros(n, 0, dtype=torch.long, device=rt.device),
            gen_length=cfg.data.seq_len,
            tokens_per_step=k,
            block_length=block,
            mask_id=data.mask_id,
            temperature=1.0,
            # on the model's device (the sampler draws there); same seed on every rank
            generator=torch.Generator(device=rt.device).manual_seed(
                derived_generator(cfg.train.seed, "jc-sample", k).initial_seed()
            ),
        )
        texts = [tokenizer.decode(row.tolist()) for row in samples.cpu()]
        error, parsed = agreement_error_rate(texts)  # NaN when nothing parsed
        parsed_samples = sum(agreement_error_rate(text)[1] > 0 for text in texts)
        key = CorruptionKey(cfg.train.seed, 0, 0, rt.dp_rank, 1, rt.dp)
        docs = data.document_ids(samples.cpu()) if cfg.data.document_mask else None
        batch = run.recipe.prepare_eval(samples.cpu(), key, rt.device, document_ids=docs)
        local = run.engine.eval_step(batch, run.recipe.loss)
        values = host_metrics(run.engine.global_metrics(local, run.recipe.eval_metric_names))
        out[f"jc/agreement_error_tps{k}"] = error
        out[f"jc/parsed_sentences_tps{k}"] = float(parsed)
        out[f"jc/parsed_samples_tps{k}"] = float(parsed_samples)
        out[f"jc/sample_{bound}_tps{k}"] = values[run.recipe.bound_name]
    base = min(cfg.auxiliary.eval_tokens_per_step)
    for k in cfg.auxiliary.eval_tokens_per_step:
        out[f"jc/sample_{bound}_gap_tps{k}"] = (
            out[f"jc/sample_{bound}_tps{k}"] - out[f"jc/sample_{bound}_tps{base}"]
        )
    return out
