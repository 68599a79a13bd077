"""The typed configuration of a run.

Every section is a keyword-only dataclass; the string literal under a field is its documentation
(`dlm config docs` prints them). YAML files and dotted CLI overrides are mapped onto these classes
strictly by `pretrain.config.loader`: unknown keys and wrong types are errors that name the key.
Cross-field rules live in each section's `validate()` and raise `ConfigError` naming the keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Sections defined in their own modules; importable from here as before (explicit re-exports).
from pretrain.config.evaluation import AuxiliaryConfig as AuxiliaryConfig
from pretrain.config.evaluation import AuxiliaryLossConfig as AuxiliaryLossConfig
from pretrain.config.evaluation import EvalConfig as EvalConfig
from pretrain.config.model import ModelConfig as ModelConfig
from pretrain.config.model import MoEConfig as MoEConfig
from pretrain.config.model import padded_vocab_size as padded_vocab_size
from pretrain.errors import ConfigError


@dataclass(kw_only=True)
class RunConfig:
    name: str = "tiny"
    """Run name: the run directory is `<output_dir>/<name>` and the MLflow run is named after it."""
    output_dir: str = "runs"
    """Root of all run directories; the default MLflow store (`mlflow.db`) lives here too."""

    def validate(self) -> None:
        name = self.name
        if (
            not name
            or name in (".", "..")
            or len(name) > 255
            or any(c in "/\\" or ord(c) < 32 or ord(c) == 127 for c in name)
        ):
            raise ConfigError(
                f"run.name is {name[:80]!r}; expected one plain directory name (no '/', not "
                "'.' or '..', not empty, no control characters)"
            )


@dataclass(kw_only=True)
class DiffusionConfig:
    objective: str = "masked"
    """Training objective (registry): `masked` = masked-diffusion NELBO (LLaDA/MDLM), `block` =
    block diffusion (BD3-LM), `ar` = causal next-token LM, `ar_adapt` = AR->DLM adaptation."""
    schedule: str = "linear"
    """Noise schedule (registry): `linear`, `cosine`, `loglinear` (shared), `distance`, `block`
    (per position), `frequency` (a content-dependent surrogate, not a NELBO)."""
    eps: float = 1e-3
    """t is drawn from U(eps, 1): keeps the 1/t-like weights finite."""
    antithetic: bool = True
    """Stratify t across the global batch: t_b = (u + b/B) mod 1, lowers the loss variance."""
    loss_normalization: Literal["token_slot", "masked_token"] = "token_slot"
    """Divide the weighted loss by B*L token slots (LLaDA pretraining) or by the masked count."""

    distance_strength: float = 2.0
    """Knob gamma of the `distance` schedule (0 = uniform, larger = closer to left-to-right);
    also the strength of the `frequency` surrogate."""
    block_length: int = 16
    """Tokens per block for the `block` schedule and the `block` objective."""
    prefix_probability: float = 0.0
    """Prefix conditioning: probability that a sequence keeps a random-length clean prefix,
    excluded from the loss; position-aware schedules measure distances from its end."""
    anneal_steps: int = 0
    """`ar_adapt`: steps over which the attention mask anneals from causal to bidirectional."""
    shift: bool = True
    """`ar_adapt`: keep the AR one-token shift (hidden state i predicts token i+1)."""

    def validate(self) -> None:
        if not 0.0 <= self.eps < 1.0:
            raise ConfigError(f"diffusion.eps must be in [0, 1), got {self.eps}")
        if not 0.0 <= self.prefix_probability <= 1.0:
            raise ConfigError(
                f"diffusion.prefix_probability must be in [0, 1], got {self.prefix_probability}"
            )
        if self.block_length <= 0 or self.anneal_steps < 0:
            raise ConfigError("diffusion.block_length must be > 0 and diffusion.anneal_steps >= 0")
        if self.distance_strength < 0:
            raise ConfigError(
                f"diffusion.distance_strength must be >= 0, got {self.distance_strength}"
            )


@dataclass(kw_only=True)
class DataConfig:
    path: str = "data/demo"
    """Directory holding `manifest.json`, `tokenizer.json` and the webdataset shards."""
    seq_len: int = 128
    """Tokens per training sequence; must equal the manifest's seq_len."""
    tokenizer: str | None = None
    """Optional tokenizer.json the model is meant for; its hash must match the manifest's."""
    verify_checksums: bool = True
    """Check each shard's sha256 against the manifest when it is opened."""
    sources: list[DataSourceConfig] = field(default_factory=list)
    """Weighted mixture of datasets (`[{path: ..., weight: 0.7}, ...]`); empty reads `path` only.
    All must share seq_len and tokenizer; validation uses the first source's `val` split."""
    shard_url: str | None = None
    """Template for `path`'s shard locations with `{name}`, e.g. `pipe:aws s3 cp s3://b/{name} -`
    (object stores through their CLIs); null reads the shards from `path`."""
    on_bad_shard: Literal["error", "skip"] = "error"
    """A corrupt/missing shard: `error` stops the run naming it; `skip` logs a warning, reads the
    next shard instead and counts it (`data/skipped_shards` in MLflow)."""
    num_workers: int = 0
    """DataLoader worker processes reading shards ahead (0: read in the training process)."""
    truncate_fraction: float = 0.0
    """LLaDA-style random lengths: this fraction of sequences keeps only its first U{1..seq_len}
    tokens; the rest is EOS padding with loss_mask False (shapes stay [b, seq_len])."""
    document_mask: bool = False
    """Attend only within each document of a packed block (documents end at EOS; truncation
    padding is a document of its own), in training and validation, with every objective (its
    own attention pattern intersected with the documents) and layout (docs/data.md)."""

    def validate(self) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.truncate_fraction <= 1.0:
            raise ConfigError(
                f"data.truncate_fraction must be in [0, 1], got {self.truncate_fraction}"
            )
        for i, src in enumerate(self.sources):
            if not src.weight > 0:
                raise ConfigError(f"data.sources[{i}].weight must be > 0, got {src.weight}")


@dataclass(kw_only=True)
class DataSourceConfig:
    path: str
    """Dataset directory (manifest.json, tokenizer.json, shards)."""
    weight: float = 1.0
    """Relative sampling weight in the mixture."""
    shard_url: str | None = None
    """Optional shard location template with `{name}` (local path or `pipe:` command)."""


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to train for (the run stops at this global step)."""
    micro_batch_size: int = 16
    """Sequences per forward/backward on each data-parallel rank."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    seed: int = 1234
    """Seeds the model init, the data order and the diffusion corruption."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` uses CUDA when available."""
    precision: Literal["auto", "fp32", "bf16", "bf16-autocast"] = "auto"
    """`bf16`: bf16 weights + fp32 master copy in the optimizer; `bf16-autocast`: fp32 weights,
    bf16 compute (torch.autocast); `auto` is bf16 on CUDA and fp32 on CPU."""
    log_interval: int = 10
    """Steps between metric logs (console and MLflow)."""
    eval_interval: int = 100
    """Steps between validation passes (0 disables; a final one always runs)."""
    eval_batches: int = 4
    """Validation batches per pass (fixed samples, fixed t-grid, fixed mask seed)."""
    checkpoint_interval: int = 200
    """Steps between checkpoints (0 disables; a final one is always written)."""
    checkpoint_minutes: float = 0.0
    """Also checkpoint once this many minutes have passed since the last save (0 disables);
    combined with `checkpoint_interval` (either one triggers a save). Every rank saves at the
    same step: the ranks vote at each step, and the first clock past the interval decides."""
    checkpoint_async: bool = False
    """Write checkpoints on a background thread: the step waits only for a host copy of the
    state (and the DP gathers), then goes on while the files are written, hashed and sealed
    exactly as a synchronous save does. One save in flight at most; a failure stops the run
    at the next step; the final and preemption saves are waited for (docs/reliability.md)."""
    keep_last: int = 3
    """Complete checkpoints kept on disk; older ones are deleted after a successful save."""
    resume: Literal["auto", "never"] = "auto"
    """`auto` resumes from the run's latest complete checkpoint if there is one."""
    init_from: str | None = None
    """A checkpoint directory whose weights start a fresh run (no optimizer state, step 0), e.g.
    a causal `ar` checkpoint for `ar_adapt`; ignored when the run resumes its own checkpoint."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite loss or gradient norm: `stop` ends the run with an error at the next
    log/eval/checkpoint boundary, before anything non-finite is saved; `skip` skips the update
    of such a step (no parameter or moment changes; counted as `train/skipped_steps`), which
    needs the fused optimizer (`optim.master_weights` fused/auto with ZeRO 0/1)."""
    spike_zscore: float = 6.0
    """A step whose loss exceeds the mean of the previous `spike_window` steps by this many
    standard deviations is a loss spike: counted (`train/loss_spikes`) and reported."""
    spike_window: int = 100
    """Steps of loss history the spike detector compares against."""
    verify_checkpoints: bool = True
    """Check every file of a checkpoint against the content hashes in its COMPLETE.json before
    resuming or initialising from it; a resume falls back to the newest checkpoint that
    verifies (docs/reliability.md). False checks the file set and sizes only."""

    def validate(self) -> None:
        for key in ("steps", "micro_batch_size", "grad_accum_steps", "log_interval", "keep_last"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"train.{key} must be positive, got {getattr(self, key)}")
        for key in ("eval_interval", "checkpoint_interval", "eval_batches"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if not self.checkpoint_minutes >= 0:
            raise ConfigError(
                f"train.checkpoint_minutes must be >= 0 (0 disables), got {self.checkpoint_minutes}"
            )
        if not self.spike_zscore > 0 or self.spike_window < 2:
            raise ConfigError("train.spike_zscore must be > 0 and train.spike_window >= 2")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 50
    """Linear warmup from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    master_weights: Literal["auto", "deepspeed", "fused"] = "auto"
    """Who keeps the fp32 master weights and AdamW state: `fused`, our multi-tensor AdamW (fp32
    gradient accumulation, one flat reduction, no host sync in the step; with
    parallel.zero_stage=1 its state is sharded over data parallelism), or DeepSpeed's bf16/ZeRO
    optimizer (`deepspeed`, needed for ZeRO-2/3). `auto`: `fused` for ZeRO 0/1, else
    `deepspeed` (equal losses and parameters: tests/test_layouts.py)."""

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        for key in ("weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key} must be >= 0, got {getattr(self, key)}")
        if self.adam_eps <= 0:
            raise ConfigError(f"optim.adam_eps must be positive, got {self.adam_eps}")
        for i, beta in enumerate(self.betas):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"optim.betas[{i}] must be in [0, 1), got {beta}")


@dataclass(kw_only=True)
class ParallelConfig:
    tensor_parallel: int = 1
    """Tensor-parallel size (Megatron-core column/row-parallel layers)."""
    pipeline_parallel: int = 1
    """Pipeline-parallel stages (DeepSpeed pipeline engine)."""
    zero_stage: Literal[0, 1, 2, 3] = 1
    """DeepSpeed ZeRO stage for the data-parallel optimizer state/gradient/parameter sharding."""
    sequence_parallel: bool = False
    """Split norms/residual activations along the sequence across TP ranks (needs TP > 1)."""
    overlap_comm: bool = False
    """On GPU, overlap ZeRO's gradient reduction with backward (slower on one H100: bench/)."""
    bucket_size: int = 500_000_000
    """Elements per ZeRO gradient-reduction / parameter all-gather bucket."""
    expert_parallel: int = 1
    """Expert-parallel size: the routed experts of each MoE layer are split over this many
    data-parallel ranks (which must divide the data-parallel size and model.moe.num_experts);
    tokens reach their experts by all-to-all. Needs the fused optimizer (ZeRO 0/1)."""

    def validate(self) -> None:
        for key in ("tensor_parallel", "pipeline_parallel"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"parallel.{key} must be positive, got {getattr(self, key)}")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ConfigError("parallel.sequence_parallel needs parallel.tensor_parallel > 1")
        if self.expert_parallel <= 0:
            raise ConfigError(
                f"parallel.expert_parallel must be positive, got {self.expert_parallel}"
            )


@dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = True
    """Log params, metrics and artifacts to MLflow (rank 0 only)."""
    uri: str | None = None
    """Tracking URI; null uses $MLFLOW_TRACKING_URI, else `sqlite:///<output_dir>/mlflow.db`."""
    experiment: str = "dlm-pretrain"
    """MLflow experiment name."""
    startup_timeout_s: float = 60.0
    """Longest wait for MLflow to open the run (connect, create or reopen it); beyond it
    `tracking.on_error` applies."""
    timeout_s: float = 15.0
    """Longest wait for each MLflow logging call; beyond it `tracking.on_error` applies."""
    on_error: Literal["fail", "warn"] = "warn"
    """An MLflow failure or time-out: `warn` says so in one line and trains on, logging the
    metrics to `<run dir>/metrics.jsonl` instead; `fail` stops the run with the error."""

    def validate(self) -> None:
        for key in ("startup_timeout_s", "timeout_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"tracking.{key} must be positive, got {getattr(self, key)}")


@dataclass(kw_only=True)
class LaunchConfig:
    nodes: int = 1
    """Nodes of a multi-node launch (torchrun --nnodes; slurm --nodes)."""
    gpus_per_node: int = 1
    """Processes (one per GPU) per node (torchrun --nproc-per-node)."""
    rdzv_port: int = 29400
    """Port of the c10d rendezvous on the first node (slurm adds the job id modulo 1000, so that
    jobs sharing a first node do not meet at the same port)."""
    partition: str | None = None
    """Slurm partition (--partition); null uses the cluster default."""
    account: str | None = None
    """Slurm account (--account); null uses the user's default."""
    time: str = "24:00:00"
    """Slurm wall-clock limit (--time), e.g. 4:00:00 or 2-00:00:00 (quotes optional: our YAML
    loader does not read 4:00:00 as a base-60 number)."""
    cpus_per_node: int | None = None
    """Slurm --cpus-per-task for the one task per node; null lets slurm decide."""
    container_image: str | None = None
    """Image for slurm's pyxis/enroot (`srun --container-image`); null runs on the host."""
    container_mounts: list[str] = field(default_factory=list)
    """`SRC:DST` mounts into the container (pyxis --container-mounts), e.g. the data directory."""
    preempt_signal_s: int = 120
    """Slurm sends SIGUSR1 this many seconds before the time limit (--signal=B:USR1@N): the job
    checkpoints and requeues itself. 0 disables the warning signal."""
    shutdown_timeout_s: int = 120
    """After a stop signal, torchrun waits this long for workers to checkpoint before SIGKILL."""
    collective_timeout_min: int = 10
    """A collective that waits longer than this fails (DEEPSPEED_TIMEOUT: the gloo/NCCL
    process-group timeout), so a job whose peer vanished stops instead of hanging."""
    env: list[str] = field(default_factory=list)
    """Extra `KEY=VALUE` environment variables for every node (e.g. NCCL_SOCKET_IFNAME=ib0)."""

    def validate(self) -> None:
        for key in ("nodes", "gpus_per_node", "shutdown_timeout_s", "collective_timeout_min"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"launch.{key} must be positive, got {getattr(self, key)}")
        if self.preempt_signal_s < 0:
            raise ConfigError(f"launch.preempt_signal_s must be >= 0, got {self.preempt_signal_s}")
        for item in self.env:
            if "=" not in item or not item.split("=", 1)[0].isidentifier():
                raise ConfigError(f"launch.env: expected KEY=VALUE, got {item!r}")


@dataclass(kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    """Where the run writes."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Transformer architecture."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Diffusion objective and noise schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, batch, logging, evaluation and checkpoint cadence."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    """How `dlm launch` starts the run (torchrun, multi-node, slurm); ignored by `dlm train`."""
    auxiliary: AuxiliaryConfig = field(default_factory=AuxiliaryConfig)
    """Joint-consistency auxiliary losses and their metric (none by default)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Diagnostics: the information-decay probe, distance-bucketed validation CE, and benchmark
    tasks (lm-evaluation-harness) during training."""

    def _check_fp8_widths(self, tp: int) -> None:
        """FP8 GEMMs need each linear's input and output widths per TP rank in multiples of 16."""
        m = self.model
        head_dim = m.hidden_size // m.num_attention_heads
        groups = m.num_query_groups or m.num_attention_heads
        widths = {
            "model.hidden_size": m.hidden_size,
            "model.ffn_hidden_size": m.ffn_hidden_size,
            "the fused QKV width head_dim * (heads + 2 * query groups)": head_dim
            * (m.num_attention_heads + 2 * groups),
            "model.make_vocab_size_divisible_by": m.make_vocab_size_divisible_by,
        }
        for what, width in widths.items():
            if width % (16 * tp):
                raise ConfigError(
                    f"model.fp8 '{m.fp8}' needs {what} ({width}) divisible by 16 x "
                    f"parallel.tensor_parallel ({tp}): FP8 GEMMs take widths in multiples of 16"
                )

    def _check_moe(self, fused: bool) -> None:
        """What the MoE layers and expert parallelism need from the rest of the config."""
        moe, ep = self.model.moe, self.parallel.expert_parallel
        if ep > 1 and not moe.enabled:
            raise ConfigError(
                f"parallel.expert_parallel {ep} needs routed experts (model.moe.num_experts > 0)"
            )
        if not moe.enabled:
            return
        if moe.num_experts % ep:
            raise ConfigError(
                f"model.moe.num_experts ({moe.num_experts}) must be divisible by "
                f"parallel.expert_parallel ({ep})"
            )
        if ep > 1 and not fused:
            raise ConfigError(
                "parallel.expert_parallel > 1 needs the fused optimizer (optim.master_weights "
                "'fused' or 'auto' with parallel.zero_stage 0 or 1): expert gradients are "
                "reduced over the ranks holding the same experts only"
            )
        tp = self.parallel.tensor_parallel
        for what, width in (
            ("model.moe.expert_ffn_hidden_size", moe.expert_ffn_hidden_size or 0),
            ("model.moe.shared_expert_ffn_hidden_size", moe.shared_expert_ffn_hidden_size),
        ):
            if width % tp:
                raise ConfigError(
                    f"{what} ({width}) must be divisible by parallel.tensor_parallel ({tp})"
                )

    def validate(self) -> None:
        for section in (self.model, self.diffusion, self.train, self.optim, self.parallel):
            section.validate()
        for section in (self.run, self.data, self.tracking):
            section.validate()
        self.launch.validate()
        self.auxiliary.validate()
        self.eval.validate()
        from pretrain.diffusion.registry import check_config  # plain data, no torch

        check_config(self)  # what the objective takes (schedules, prefixes, auxiliary losses)
        fused = self.optim.master_weights == "fused" or (
            self.optim.master_weights == "auto" and self.parallel.zero_stage <= 1
        )
        if self.train.on_nonfinite == "skip" and not fused:
            raise ConfigError(
                "train.on_nonfinite 'skip' decides on the device inside the fused optimizer: it "
                "needs optim.master_weights 'fused' or 'auto' with parallel.zero_stage 0 or 1"
            )
        if self.optim.master_weights == "fused" and self.parallel.zero_stage > 1:
            raise ConfigError(
                "optim.master_weights 'fused' shards its optimizer state over data parallelism "
                f"as ZeRO-1 does: it needs parallel.zero_stage 0 or 1 (got "
                f"{self.parallel.zero_stage}); ZeRO-2/3 run with 'deepspeed' (or 'auto')"
            )
        tp = self.parallel.tensor_parallel
        if self.model.fp8:
            self._check_fp8_widths(tp)
        self._check_moe(fused)
        if self.model.num_attention_heads % tp:
            raise ConfigError(
                f"model.num_attention_heads ({self.model.num_attention_heads}) must be divisible "
                f"by parallel.tensor_parallel ({tp})"
            )
        if self.parallel.sequence_parallel and self.data.seq_len % tp:
            raise ConfigError(
                f"data.seq_len ({self.data.seq_len}) must be divisible by parallel.tensor_parallel "
                f"({tp}) with parallel.sequence_parallel"
            )
        if self.model.make_vocab_size_divisible_by % tp:
            raise ConfigError(
                f"model.make_vocab_size_divisible_by ({self.model.make_vocab_size_divisible_by}) "
                f"must be divisible by parallel.tensor_parallel ({tp})"
            )
