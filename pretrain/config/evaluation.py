"""Configuration of evaluation and of the joint-consistency auxiliary losses.

Sections of the run's configuration (`pretrain.config.schema.Config`); the string literal under
a field is its documentation, as everywhere in the schema.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pretrain.errors import ConfigError


@dataclass(kw_only=True)
class AuxiliaryLossConfig:
    name: str
    """Auxiliary loss (registry in `pretrain.diffusion.auxiliary`): `self_correction`,
    `energy_nce`, `multistep_consistency`."""
    weight: float = 1.0
    """Peak weight of this loss, added to the objective's loss."""
    schedule: str = "constant"
    """Weight schedule (registry): `constant` (0 before `start_step`, then `weight`) or
    `linear_ramp` (0 before `start_step`, rising linearly to `weight` over `ramp_steps`)."""
    start_step: int = 0
    """First optimizer step (0-based) at which the loss runs; before it, it costs nothing."""
    ramp_steps: int = 0
    """Steps of the `linear_ramp` schedule."""
    fill_fraction: float = 0.5
    """`self_correction`: fraction of the masked positions filled with the model's samples."""
    rollout_steps: int = 2
    """`multistep_consistency`: decoding steps of the no-grad multi-step rollout (>= 2)."""

    def validate(self, where: str) -> None:
        if self.weight < 0:
            raise ConfigError(f"{where}.weight must be >= 0, got {self.weight}")
        if self.start_step < 0 or self.ramp_steps < 0:
            raise ConfigError(f"{where}.start_step and {where}.ramp_steps must be >= 0")
        if not 0.0 < self.fill_fraction <= 1.0:
            raise ConfigError(f"{where}.fill_fraction must be in (0, 1], got {self.fill_fraction}")
        if self.rollout_steps < 2:
            raise ConfigError(f"{where}.rollout_steps must be >= 2, got {self.rollout_steps}")


@dataclass(kw_only=True)
class AuxiliaryConfig:
    losses: list[AuxiliaryLossConfig] = field(default_factory=list)
    """Joint-consistency auxiliary losses (docs/joint_consistency.md); empty: none."""
    eval_tokens_per_step: list[int] = field(default_factory=list)
    """Joint-consistency metric at each evaluation: sample with these tokens per decoding step
    and log the samples' agreement error (demo grammar) and NELBO gap; empty: off."""
    eval_samples: int = 16
    """Sequences sampled per tokens-per-step setting for the joint-consistency metric."""

    def validate(self) -> None:
        for i, loss in enumerate(self.losses):
            loss.validate(f"auxiliary.losses[{i}]")
        if any(k <= 0 for k in self.eval_tokens_per_step) or self.eval_samples <= 0:
            raise ConfigError("auxiliary.eval_tokens_per_step and eval_samples must be positive")


@dataclass(kw_only=True)
class EvalConfig:
    probe_interval: int = 0
    """Steps between information-decay probes (prompt + masks, one forward; 0 disables): the
    profile plot and summary numbers and the distance-bucketed validation CE go to MLflow."""
    probe_prompts: str | None = None
    """jsonl file of probe prompts (the `probe_field` field of each line); null takes
    validation sequences' starts."""
    probe_field: str = "text"
    """Field of each `probe_prompts` line that holds the prompt text (as `dlm probe --field`)."""
    probe_prompt_count: int = 8
    """Prompts taken from the validation split when `probe_prompts` is null."""
    probe_prompt_tokens: int = 16
    """Length of each validation prompt (tokens) when `probe_prompts` is null."""
    probe_masks: int = 128
    """Masks appended to each prompt (K)."""
    frequent_tokens: int = 20
    """Size of the high-frequency token set (most frequent ids in the validation data)."""

    # -- benchmark tasks during training (pretrain/evaluation/during_training.py) -------------
    tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks run every `task_interval` steps and logged to MLflow as
    `tasks/<task>/<metric>` (e.g. [dlm_agreement]); empty: none."""
    task_interval: int = 0
    """Steps between task evaluations (0: never; `tasks` must then be empty)."""
    task_limit: int | None = None
    """Documents per task at each evaluation (null: all)."""
    include_path: str | None = None
    """Directory of extra task YAML files beside the project's own (pretrain/evaluation/tasks)."""
    task_mc_samples: int = 32
    """Monte-Carlo samples per likelihood request of the task evaluations."""

    def validate(self) -> None:
        for key in ("probe_interval", "probe_prompt_count", "probe_prompt_tokens", "task_interval"):
            if getattr(self, key) < 0:
                raise ConfigError(f"eval.{key} must be >= 0, got {getattr(self, key)}")
        if self.probe_masks <= 0 or self.frequent_tokens <= 0:
            raise ConfigError("eval.probe_masks and eval.frequent_tokens must be positive")
        if self.task_mc_samples <= 0 or (self.task_limit is not None and self.task_limit <= 0):
            raise ConfigError("eval.task_mc_samples and eval.task_limit must be positive")
        if self.tasks and not self.task_interval:
            raise ConfigError("eval.tasks is set but eval.task_interval is 0: set the interval")
        if not self.probe_field:
            raise ConfigError("eval.probe_field must name a field of the prompts' jsonl lines")
