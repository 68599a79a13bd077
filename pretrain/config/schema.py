"""The typed configuration of a run.

Every section is a keyword-only dataclass; the string literal under a field is its documentation
(`dlm config docs` prints them). YAML files and dotted CLI overrides are mapped onto these classes
strictly by `pretrain.config.loader`: unknown keys and wrong types are errors that name the key.
Cross-field rules live in each section's `validate()` and raise `ConfigError` naming the keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pretrain.errors import ConfigError


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """The embedding/output vocabulary: `vocab_size` rounded up to `multiple`; independent of
    the TP size so every layout has identical weights."""
    return int(math.ceil(vocab_size / multiple) * multiple)


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
class MoEConfig:
    """Mixture-of-experts MLPs (Megatron-core's router and experts; docs/moe.md)."""

    num_experts: int = 0
    """Routed experts per MoE layer; 0 keeps every MLP dense."""
    top_k: int = 2
    """Experts each token is routed to."""
    expert_ffn_hidden_size: int | None = None
    """Inner width of each routed expert's SwiGLU MLP; null uses model.ffn_hidden_size."""
    shared_expert_ffn_hidden_size: int = 0
    """Inner width of the shared-expert MLP that every token passes through besides its routed
    experts (n shared experts of width f: n * f); 0 for none."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by a learned per-token sigmoid gate."""
    layer_frequency: int = 1
    """Every n-th layer (after `first_dense_layers`) is an MoE layer, the others stay dense:
    1 = every layer, 2 = every other layer."""
    first_dense_layers: int = 0
    """The first k layers keep a dense MLP (DeepSeek's first_k_dense_replace)."""
    score_function: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: `softmax` over the experts, or per-expert `sigmoid` (needed by the
    expert bias of `expert_bias_update_rate`)."""
    pre_softmax: bool = False
    """softmax: take the top-k of the softmax over all experts (weights not renormalised) instead
    of the softmax over the top-k logits (weights summing to 1)."""
    aux_loss_coeff: float = 1e-2
    """Switch-Transformer load-balancing loss coeff * E/k * sum_e f_e P_e per MoE layer, added to
    the training loss; f (routed share) and P (mean router probability) are taken over the whole
    data-parallel micro-batch, so the loss does not depend on the layout. 0 disables it."""
    z_loss_coeff: float = 0.0
    """Router z-loss coeff * mean(logsumexp(router logits)^2) per MoE layer (ST-MoE); 0 = off."""
    expert_bias_update_rate: float = 0.0
    """Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias, added to the scores only
    to choose the top-k, moves by this rate towards balance after every optimizer step (sign of
    mean load minus the expert's load over the step's global batch). 0 = off; needs
    score_function sigmoid."""
    capacity_factor: float | None = None
    """Token dropping: each expert takes at most capacity_factor * tokens * k / E assignments of
    a rank's micro-batch, the rest are dropped (the residual carries those tokens). null =
    dropless (default). Capacity is per rank, so dropping depends on the data-parallel size."""
    drop_policy: Literal["probs", "position"] = "probs"
    """With capacity_factor: drop the lowest-probability assignments or the latest positions."""

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer `index` (0-based) has routed experts."""
        if not self.enabled or index < self.first_dense_layers:
            return False
        return (index - self.first_dense_layers) % self.layer_frequency == 0

    def validate(self) -> None:
        if self.num_experts < 0:
            raise ConfigError(f"model.moe.num_experts must be >= 0, got {self.num_experts}")
        # Ranges hold whether or not MoE is on: a bad value is an error even in a dense config.
        for key in ("shared_expert_ffn_hidden_size", "aux_loss_coeff", "z_loss_coeff"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.moe.{key} must be >= 0, got {getattr(self, key)}")
        if self.expert_bias_update_rate < 0:
            raise ConfigError(
                f"model.moe.expert_bias_update_rate must be >= 0, got "
                f"{self.expert_bias_update_rate}"
            )
        if not self.enabled:
            return
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"model.moe.top_k ({self.top_k}) must be in [1, model.moe.num_experts "
                f"({self.num_experts})]"
            )
        if self.layer_frequency < 1 or self.first_dense_layers < 0:
            raise ConfigError(
                "model.moe.layer_frequency must be >= 1 and model.moe.first_dense_layers >= 0"
            )
        for key in ("expert_ffn_hidden_size",):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"model.moe.{key} must be positive, got {value}")
        if self.expert_bias_update_rate and self.score_function != "sigmoid":
            raise ConfigError(
                "model.moe.expert_bias_update_rate needs model.moe.score_function 'sigmoid' "
                "(the bias shifts sigmoid scores; a softmax over biased logits changes weights)"
            )
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(
                f"model.moe.capacity_factor must be > 0 or null, got {self.capacity_factor}"
            )


@dataclass(kw_only=True)
class ModelConfig:
    vocab_size: int | None = None
    """Tokenizer vocabulary incl. special tokens; null takes it from the data manifest."""
    hidden_size: int = 256
    """Width of the residual stream (d_model)."""
    num_layers: int = 4
    """Number of transformer layers."""
    num_attention_heads: int = 4
    """Query heads per layer."""
    num_query_groups: int | None = None
    """Key/value heads (grouped-query attention); null means one per query head (MHA)."""
    ffn_hidden_size: int = 704
    """Inner width of the SwiGLU MLP (each of the gate and up projections)."""
    rope_base: float = 10000.0
    """RoPE base frequency (theta)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Std of the normal weight init; output projections are scaled by 1/sqrt(2*num_layers)."""
    attention_backend: str = "sdpa"
    """Core attention kernel: `sdpa` (PyTorch fused, default), `flash` (flash-attn), `masked`."""
    make_vocab_size_divisible_by: int = 128
    """The embedding/output vocab is padded to a multiple of this (must be divisible by TP)."""
    activation_checkpointing: bool = False
    """Recompute each transformer layer in the backward pass to save activation memory."""
    compile: bool = False
    """torch.compile each transformer layer (GPU; the first steps pay the compilation)."""
    compile_mode: Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode of `compile`: `reduce-overhead` replays each layer as CUDA graphs (less
    host launch time), `max-autotune-no-cudagraphs` autotunes the fused kernels (slower start)."""
    compile_scope: Literal["layer", "trunk"] = "layer"
    """What one compiled graph covers: `layer` (one graph shared by all layers: fast to compile)
    or `trunk` (all layers in one graph, entered once per forward and once per backward: fewer
    host gaps, longer compilation; pipeline parallelism always compiles per layer)."""
    sparse_output: bool = True
    """Run the output layer and cross-entropy only where the loss needs them (masked tokens),
    in memory-bounded chunks (any layout; under sequence parallelism the head runs on every
    position, as its output layer gathers the sequence)."""
    sdpa_backends: list[Literal["cudnn", "flash", "efficient", "math"]] = field(
        default_factory=lambda: ["cudnn", "flash", "efficient", "math"]
    )
    """Priority order of PyTorch's fused attention kernels for the `sdpa` backend on GPU
    (`cudnn`, `flash`, `efficient`, `math`); the first one that supports the inputs runs."""
    fp8: Literal["tensorwise", "rowwise"] | Literal[False] = False
    """FP8 matmuls (torchao float8 training, dynamic scaling) in every linear: `off` (YAML false,
    the default), `tensorwise` (one scale per tensor) or `rowwise` (per row/column). Weights and
    master weights keep their precision, so checkpoints are the same. Needs torchao
    (`pip install '.[fp8]'`) and a GPU with FP8 tensor cores (CUDA capability >= 8.9);
    docs/performance.md."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    """Mixture-of-experts MLPs (`model.moe.num_experts: 0` = dense)."""

    def validate(self) -> None:
        self.moe.validate()
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_attention_heads ({self.num_attention_heads})"
            )
        groups = self.num_query_groups or self.num_attention_heads
        if self.num_attention_heads % groups:
            raise ConfigError(
                f"model.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"model.num_query_groups ({groups})"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError("model.hidden_size / model.num_attention_heads must be even for RoPE")
        for key in (
            "hidden_size",
            "num_layers",
            "ffn_hidden_size",
            "make_vocab_size_divisible_by",
            "rope_base",
            "norm_eps",
            "init_std",
        ):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key} must be positive, got {getattr(self, key)}")


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
        if self.parallel.sequence_parallel:
            raise ConfigError(
                "model.moe with parallel.sequence_parallel is not supported yet: the MoE "
                "layers take every token on each tensor-parallel rank"
            )
        if self.model.fp8:
            raise ConfigError(
                "model.moe with model.fp8 is not supported yet: the expert linears have no "
                "FP8 path (their token counts vary per rank and step)"
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
