"""Running the probe and the distance-bucketed CE from a trained model: during training (every
`eval.probe_interval` steps, logged to MLflow) and from a checkpoint (`dlm probe`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain.errors import DataError
from pretrain.probe.buckets import distance_bucketed_ce
from pretrain.probe.probe import frequent_token_ids, run_probe, write_probe


def read_prompts(
    path: str | Path, tokenizer, *, field: str = "text", field_option: str = "--field"
) -> list[torch.Tensor]:
    """A jsonl file with one prompt per line under `field` -> token ids (1-D long tensors).
    `field_option` names the setting that chose the field, for the error message."""
    prompts = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{n}: expected a JSON object per line") from None
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{path}:{n}: expected a JSON object with a string '{field}' (the prompt field, "
                f"set by {field_option}); found: {keys}"
            )
        ids = tokenizer.encode(text).ids
        if not ids:
            raise DataError(f"{path}:{n}: prompt '{text[:40]}' encodes to no tokens")
        prompts.append(torch.tensor(ids, dtype=torch.long))
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def val_prompts(val: list[torch.Tensor], count: int, length: int) -> list[torch.Tensor]:
    """The first `length` tokens of the first `count` validation sequences."""
    rows = torch.cat(val)[:count] if val else torch.empty(0, length, dtype=torch.long)
    return [r[:length].clone() for r in rows]


class ModelProbe:
    """Probe + bucketed CE of one model on fixed prompts, frequent tokens and validation data.

    `logits(x [b, s]) -> [b, s, V]` and `ce(x_t, x0) -> [b, s]` run the model: a module's own
    forward (`for_module`), or the training engine's no-grad forward in any layout.
    """

    def __init__(
        self,
        *,
        logits,
        ce,
        mask_id,
        eos_id,
        prompts,
        frequent_ids,
        val,
        num_masks,
        decode=None,
        title: str = "",
    ):
        self._logits, self._ce = logits, ce
        self.mask_id, self.eos_id = mask_id, eos_id
        self.prompts, self.frequent_ids, self.val = prompts, frequent_ids, val
        self.num_masks = num_masks
        self.decode = decode
        """token id -> text, for the tokens in the JSON (None: ids only)."""
        self.title = title
        """The plot's title (default: the probe's name and size)."""
        self.last: tuple | None = None
        """(ProbeResult, bucketed CE) of the last run, for overlays of several models."""

    @classmethod
    def for_module(cls, module, **kwargs) -> ModelProbe:
        """The probe of a single-device model (`dlm probe`), run in eval mode."""
        device = next(module.parameters()).device

        def logits(x):
            return module(x.to(device))

        def ce(x_t, x0):
            return module(x_t.to(device), targets=x0.to(device))

        probe = cls(logits=logits, ce=ce, **kwargs)
        probe.module = module
        return probe

    @torch.no_grad()
    def run(
        self, out_dir: Path, *, name: str = "probe", write: bool = True
    ) -> tuple[dict, Path | None, Path | None]:
        """The probe's metrics, and with `write` its JSON and PNG files (else None, None)."""
        module = getattr(self, "module", None)
        was_training = module is not None and module.training
        if module is not None:
            module.eval()
        try:
            result = run_probe(
                self._logits,
                self.prompts,
                mask_id=self.mask_id,
                eos_id=self.eos_id,
                frequent_ids=self.frequent_ids,
                num_masks=self.num_masks,
                decode=self.decode,
            )
            buckets = (
                distance_bucketed_ce(self._ce, self.val, mask_id=self.mask_id) if self.val else {}
            )
        finally:
            if module is not None:
                module.train(was_training)
        self.last = (result, buckets)
        metrics = dict(result.summary())
        for label, row in buckets.items():
            metrics[f"val/ce_dist_{label}"] = row["ce"]
        if not write:
            return metrics, None, None
        json_path, png = write_probe(result, out_dir, name=name, title=self.title, buckets=buckets)
        return metrics, json_path, png


class TrainingProbe:
    """The trainer's hook: `maybe_run(step, tracker, say)` every `eval.probe_interval` steps."""

    def __init__(self, probe: ModelProbe | None, interval: int, out_dir: Path, is_main: bool):
        self.probe, self.interval, self.out_dir, self.is_main = probe, interval, out_dir, is_main

    @classmethod
    def build(cls, run, say=print) -> TrainingProbe:
        """The probe of a training run: every rank takes part (its forwards are the engine's,
        collective under pipeline parallelism), on the same prompts and global validation data
        whatever the layout; rank 0 writes."""
        from pretrain.diffusion.auxiliary.base import read_ce, read_logits
        from pretrain.model.inputs import ModelInputs

        cfg, data, engine, rt = run.cfg, run.data, run.engine, run.rt
        interval = cfg.eval.probe_interval
        if not interval:
            return cls(None, 0, Path(), rt.is_main)
        val = data.global_val()  # the same prompts and data for every layout
        tok = data.manifest.tokenizer
        from data_pipeline.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(data.data_dir / tok.file)
        if cfg.eval.probe_prompts:
            prompts = read_prompts(
                cfg.eval.probe_prompts,
                tokenizer,
                field=cfg.eval.probe_field,
                field_option="eval.probe_field",
            )
        else:
            prompts = val_prompts(val, cfg.eval.probe_prompt_count, cfg.eval.probe_prompt_tokens)
        if not prompts:
            raise DataError(f"{cfg.data.path}: eval.probe_interval needs a 'val' split for prompts")
        frequent = frequent_token_ids(val or prompts, cfg.eval.frequent_tokens, (tok.mask_id,))

        def logits(x):
            x = x.to(rt.device)
            return engine.infer(ModelInputs(x), read_logits, (*x.shape, data.vocab_size))

        def ce(x_t, x0):
            x_t = x_t.to(rt.device)
            return engine.infer(ModelInputs(x_t), read_ce(x0.to(rt.device)), tuple(x_t.shape))

        probe = ModelProbe(
            logits=logits,
            ce=ce,
            mask_id=tok.mask_id,
            eos_id=tok.eos_id,
            prompts=prompts,
            frequent_ids=frequent,
            val=val,
            num_masks=cfg.eval.probe_masks,
            decode=lambda i: tokenizer.decode([i]),
            title=f"{cfg.run.name}: probe",
        )
        return cls(probe, interval, run.run_dir / "probe", rt.is_main)

    def due(self, step: int) -> bool:
        return self.probe is not None and step % self.interval == 0

    def maybe_run(self, step: int, tracker, say) -> dict[str, float]:
        if not self.due(step):
            return {}
        name = f"probe_step_{step:08d}"
        metrics, json_path, png = self.probe.run(self.out_dir, name=name, write=self.is_main)
        if self.is_main:  # one writer: the replica's TP ranks compute the same probe
            tracker.log_metrics(metrics, step=step)
            tracker.log_artifact(png)
            tracker.log_artifact(json_path)
            say(f"[dlm] step {step} probe " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return metrics
