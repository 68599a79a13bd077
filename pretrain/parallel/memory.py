"""Memory planner: bytes per GPU of weights, gradients, optimizer state and activations.

    dlm plan configs/llada-8b.yaml [key=value ...] --layout 4x2x8:1 --layout 1x1x8:3

(argparse needs the overrides right after CONFIG, before any --option.)

Parameter, gradient and optimizer numbers are exact for the model `pretrain.model.transformer`
builds (V_pad = vocab rounded up to `make_vocab_size_divisible_by`, n_kv = num_query_groups or n_q,
d = h / n_q, f = ffn_hidden_size, no biases, untied output layer):

    per layer  2h (two RMSNorms) + (n_q + 2 n_kv) d h (fused QKV) + h n_q d (proj) + 3 f h (SwiGLU)
    embedding  V_pad h            head  h (final RMSNorm) + V_pad h

Tensor parallelism (tp) splits every matrix by tp; RMSNorm weights are replicated on each TP rank.
Pipeline stages get the layers as evenly as possible, the earlier stages one extra when pp does not
divide them: what DeepSpeed's `partition_method="type:..."` (partition_balanced) gives for the layer
list [embedding, layers..., head]. The embedding lives on the first stage, the head on the last.
Bytes per element: bf16 = weights 2, grads 2, optimizer 12 (fp32 master + Adam m + v);
fp32 = 4, 4, 8. ZeRO over the dp group: stage >= 1 shards the optimizer, >= 2 the grads, 3 the
weights. Not counted: DeepSpeed's communication buckets (reduce_bucket_size, ~1 GB in bf16), the
transient fp32 gradient partition at the optimizer step, ZeRO alignment padding, ZeRO-3's gathered
layer, the CUDA context.

Mixture of experts (`model.moe`, layers `is_moe_layer`): the SwiGLU's 3 f h becomes a router
E h (replicated) + the layer's routed experts 3 f_e h each, of which one expert-parallel rank
holds E / ep (split by tp) + the shared experts 3 f_s h / tp (+ h for their gate). Routed-expert
parameters are ZeRO-sharded over the expert-data-parallel group (dp / ep ranks), the rest over
dp. Layout strings take the expert-parallel size after a slash: TPxPPxDP[:ZERO][/EP].

Activations are ESTIMATES for one micro-batch (b sequences of s tokens) per stage: the tensors
autograd saves for backward, measured op by op on this layer (sequence parallel off; e = 2 bytes
in bf16, 4 in fp32; "/t" marks tensors split by tp, the rest are replicated on each TP rank):

    RMSNorm x2        2 * (4 sbh [fp32 upcast of input] + 2 e sbh [normed, and the output that
                      the next linear saves]) + 2 * 4 sb [rstd]
    fused QKV out     e sb (n_q + 2 n_kv) d / t  [v is a view of it, so attention keeps it whole]
    RoPE q, k         e sb (n_q + n_kv) d / t  [the rotated q and k; the cos/sin table, 2 e s d,
                      is one pair of tensors that every layer shares: counted once per stage]
    SDPA (flash/cuDNN kernels keep no s x s matrix)   4 b s n_q / t [logsumexp]
                      + e sbh / t [output, which is also the proj input: it is written in the
                      query's [s, b] layout]; the `flash` backend writes [b, s], so its reshape
                      copies: + e sbh / t; the `masked` reference backend adds ~4 b n_q s^2 / t
    SwiGLU            5 e sbf / t [fc1 out 2f (silu saves the gate view, keeping it whole),
                      silu out, up + offset copy, product = fc2 input]
    head (last stage) (4 + 2e) sbh [final norm] + 4 sbV_pad / t [fp32 logits the vocab-parallel
                      CE keeps] + e sbV_pad / t transient [bf16 logits alive during the upcast],
                      with `model.sparse_output: false`; the sparse head (default) on n loss
                      rows, counted at n = sb (all masked): e nh + 16 n [each chunk's input
                      rows and targets, recomputed in backward], or with
                      `sparse_output_recompute: false` (4 + 2e) nh + e nV_pad / t [the final
                      norm's and output layer's inputs, the logit gradient G] + 12 n; transient:
                      one chunk of c = min(n, 2^30 / (4 V_pad / t)) rows, (8 + e) cV_pad / t
                      [fp32 logits and softmax, logits in the compute dtype; e = 0 in fp32]
    tokens/targets    int64 ids on the first stage, ids and mask in the CE on the last
    MoE layer         in place of the SwiGLU: 4 sbE x 3 [fp32 router logits, scores, probs]
                      + e sbkh x 2 [the k copies of each token entering the experts and their
                      outputs before the combine] + 5 e sbk f_e / t [the experts' SwiGLU, for
                      the sb k assignments a rank receives under balanced routing] + 5 e sb f_s
                      / t [shared experts]; plus the all-to-all buffers (send and receive, e
                      sbkh each), transient, counted once per stage as "dispatch"

Residual adds and p=0 dropout save nothing. Activation checkpointing keeps only each layer's input
(e sbh) plus, in the backward pass, one layer's full set while it is recomputed (on the last
stage: the larger of that and the loss-time head buffers, which are freed before it). DeepSpeed's
1F1B schedule keeps min(pp - k, m) micro-batches in flight on stage k; we assume m (gradient
accumulation steps) >= pp, so the first stage holds pp of them, the last stage one. Pipeline
boundary tensors (received input, sent output) add e sbh per micro-batch in flight. Allocator
overhead, gradient temporaries of the backward pass, communication buffers and fragmentation are
not counted.
Checked on one H100 (tp = pp = 1, bf16, cuDNN SDPA): the saved bytes after the forward and the
forward's peak (what `activations` reports there) agree with torch.cuda's counters within 0.5%.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from typing import Any, Literal

from pretrain.config import ModelConfig
from pretrain.errors import ConfigError
from pretrain.parallel.topology import Topology

GiB = 2**30
CE_CHUNK_BYTES = 1 << 30
"""`pretrain.model.transformer.CE_CHUNK_BYTES` (the sparse head's fp32 logits per chunk), not
imported: the planner runs without torch."""
_BYTES = {"bf16": (2, 2, 12), "fp32": (4, 4, 8)}  # weights, grads, optimizer per element
DEFAULT_LAYOUTS = ("1x1x8:1", "1x1x8:3", "2x1x4:1", "4x2x1:1", "8x1x1:1", "4x2x8:1")


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero_stage: int = 1
    micro_batch_size: int = 1
    seq_len: int = 2048
    activation_checkpointing: bool = False
    precision: Literal["bf16", "fp32"] = "bf16"
    ep: int = 1

    @property
    def name(self) -> str:
        return f"{self.tp}x{self.pp}x{self.dp}" + (f"/{self.ep}" if self.ep > 1 else "")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU on the heaviest pipeline stage (largest total; ties go to the first)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    total: int
    params_per_gpu: int
    stage: int
    num_stages: int

    @property
    def stage_name(self) -> str:
        if self.num_stages == 1:
            return "only"
        return {0: "first", self.num_stages - 1: "last"}.get(self.stage, f"stage {self.stage}")


def _padded_vocab(model: ModelConfig, vocab_size: int) -> int:
    multiple = model.make_vocab_size_divisible_by
    return -(-vocab_size // multiple) * multiple


def _layer_matrices(model: ModelConfig) -> int:
    """Elements of one layer's matrices (split by tp); its two RMSNorms (2h) are not included."""
    h, n_q, f = model.hidden_size, model.num_attention_heads, model.ffn_hidden_size
    n_kv, d = model.num_query_groups or n_q, h // n_q
    return (n_q + 2 * n_kv) * d * h + h * n_q * d + 3 * f * h


def _moe_parts(model: ModelConfig) -> tuple[int, int, int]:
    """One MoE layer's (replicated, TP-split, routed-expert) parameters on top of its
    attention and norms: router (+ shared gate), shared experts, all routed experts."""
    moe, h = model.moe, model.hidden_size
    f_e = moe.expert_ffn_hidden_size or model.ffn_hidden_size
    replicated = moe.num_experts * h + (h if moe.shared_expert_gate else 0)
    return replicated, 3 * moe.shared_expert_ffn_hidden_size * h, moe.num_experts * 3 * f_e * h


def _layer_params(model: ModelConfig, index: int, tp: int, ep: int) -> tuple[int, int]:
    """(non-expert, routed-expert) parameters of layer `index` on one TP x EP rank."""
    h = model.hidden_size
    if not model.moe.is_moe_layer(index):
        return 2 * h + _layer_matrices(model) // tp, 0
    mlp = 3 * model.ffn_hidden_size * h
    replicated, shared, experts = _moe_parts(model)
    return 2 * h + (_layer_matrices(model) - mlp + shared) // tp + replicated, experts // ep // tp


def active_parameters(model: ModelConfig, vocab_size: int) -> int:
    """Parameters one token passes through (its top-k experts of each MoE layer, not all E)."""
    counts = parameter_counts(model, vocab_size)
    if not model.moe.enabled:
        return counts["total"]
    _, _, experts = _moe_parts(model)
    idle = experts * (model.moe.num_experts - model.moe.top_k) // model.moe.num_experts
    moe_layers = sum(model.moe.is_moe_layer(i) for i in range(model.num_layers))
    return counts["total"] - moe_layers * idle


def parameter_counts(model: ModelConfig, vocab_size: int) -> dict[str, int]:
    """Exact parameter counts: total, per_layer (of a dense layer; the mean over the layers of
    an MoE model), layers, embedding, head, padded_vocab."""
    h, v_pad = model.hidden_size, _padded_vocab(model, vocab_size)
    layers = sum(sum(_layer_params(model, i, 1, 1)) for i in range(model.num_layers))
    per_layer = layers // model.num_layers
    counts = {"per_layer": per_layer, "layers": layers}
    counts |= {"embedding": v_pad * h, "head": h + v_pad * h, "padded_vocab": v_pad}
    counts["total"] = counts["layers"] + counts["embedding"] + counts["head"]
    return counts


def layers_per_stage(num_layers: int, pp: int) -> list[int]:
    """Balanced split; the first `num_layers % pp` stages get one layer more (DeepSpeed's)."""
    return [num_layers // pp + (k < num_layers % pp) for k in range(pp)]


def stage_parameter_counts(
    model: ModelConfig, vocab_size: int, tp: int, pp: int, ep: int = 1
) -> list[int]:
    """Parameters held by one TP (x EP) rank of each pipeline stage."""
    return [sum(split) for split in stage_parameter_split(model, vocab_size, tp, pp, ep)]


def stage_parameter_split(
    model: ModelConfig, vocab_size: int, tp: int, pp: int, ep: int = 1
) -> list[tuple[int, int]]:
    """(non-expert, routed-expert) parameters held by one TP (x EP) rank of each stage."""
    h, v_pad = model.hidden_size, _padded_vocab(model, vocab_size)
    counts, first = [], 0
    for n in layers_per_stage(model.num_layers, pp):
        parts = [_layer_params(model, i, tp, ep) for i in range(first, first + n)]
        counts.append([sum(p[0] for p in parts), sum(p[1] for p in parts)])
        first += n
    counts[0][0] += v_pad * h // tp
    counts[-1][0] += h + v_pad * h // tp
    return [(dense, experts) for dense, experts in counts]


def rope_table_bytes(model: ModelConfig, s: int, e: int) -> int:
    """RoPE's cos/sin table [s, d] x 2, made once and shared by every layer and micro-batch."""
    return 2 * e * s * (model.hidden_size // model.num_attention_heads)


def layer_activation_bytes(model: ModelConfig, b: int, s: int, tp: int, e: int) -> int:
    """Saved-for-backward bytes of one transformer layer (module docstring has the terms)."""
    h, n_q, f = model.hidden_size, model.num_attention_heads, model.ffn_hidden_size
    n_kv, d, sb = model.num_query_groups or n_q, h // n_q, s * b
    norms = 2 * ((4 + 2 * e) * sb * h + 4 * sb)
    qkv = e * sb * (n_q + 2 * n_kv) * d // tp
    rope = e * sb * (n_q + n_kv) * d // tp
    attn = 4 * b * s * n_q // tp + e * sb * h // tp
    if model.attention_backend == "flash":
        attn += e * sb * h // tp
    elif model.attention_backend == "masked":
        attn += 4 * b * n_q * s * s // tp
    mlp = 5 * e * sb * f // tp
    return norms + qkv + rope + attn + mlp


def moe_layer_activation_bytes(model: ModelConfig, b: int, s: int, tp: int, e: int):
    """(saved, transient dispatch buffers) bytes of one MoE layer (module docstring)."""
    moe, h, sb = model.moe, model.hidden_size, s * b
    f_e = moe.expert_ffn_hidden_size or model.ffn_hidden_size
    dense_mlp = 5 * e * sb * model.ffn_hidden_size // tp
    routed = 3 * 4 * sb * moe.num_experts + 2 * e * sb * moe.top_k * h
    routed += (
        5 * e * sb * moe.top_k * f_e // tp + 5 * e * sb * moe.shared_expert_ffn_hidden_size // tp
    )
    saved = layer_activation_bytes(model, b, s, tp, e) - dense_mlp + routed
    return saved, 2 * e * sb * moe.top_k * h


def head_activation_bytes(
    model: ModelConfig, v_pad: int, b: int, s: int, tp: int, e: int
) -> tuple[int, int]:
    """(saved, transient) bytes of the last stage's final norm, logits and cross-entropy: the
    full head, or with `model.sparse_output` the sparse one at its worst case, every position a
    loss position (the masked fraction of a micro-batch varies from step to step)."""
    sb, h, v = s * b, model.hidden_size, v_pad // tp
    # In bf16 the logits are upcast to fp32 for the CE: both copies exist until it returns.
    upcast = e if e != 4 else 0  # bytes per logit of the compute-dtype copy
    if not model.sparse_output:
        saved = (4 + 2 * e) * sb * h + 4 * sb + 4 * sb * v + 9 * sb
        return saved, upcast * sb * v
    n, chunk = sb, min(sb, max(1, CE_CHUNK_BYTES // (4 * v)))
    if model.sparse_output_recompute:  # the chunks' inputs (rows, targets) and the row indices
        saved = e * n * h + 16 * n
    else:  # the final norm's and output layer's inputs, G, the row indices
        saved = (4 + 2 * e) * n * h + e * n * v + 12 * n
    # one chunk at a time: its fp32 logits and softmax, and its logits in the compute dtype
    return saved, chunk * v * (8 + upcast)


def _stage_activations(model: ModelConfig, v_pad: int, layout: Layout, k: int) -> int:
    b, s, tp, pp = layout.micro_batch_size, layout.seq_len, layout.tp, layout.pp
    e = 2 if layout.precision == "bf16" else 4
    sizes = layers_per_stage(model.num_layers, pp)
    n, last = sizes[k], k == pp - 1
    x = e * s * b * model.hidden_size  # one [s, b, h] hidden state
    dense = layer_activation_bytes(model, b, s, tp, e)
    moe, dispatch = moe_layer_activation_bytes(model, b, s, tp, e) if model.moe.enabled else (0, 0)
    first = sum(sizes[:k])
    kinds = [model.moe.is_moe_layer(i) for i in range(first, first + n)]
    layers = sum(moe if is_moe else dense for is_moe in kinds)
    layer = max((moe if is_moe else dense for is_moe in kinds), default=0)
    layer += dispatch if any(kinds) else 0  # one layer's all-to-all buffers at a time
    head_saved, head_transient = head_activation_bytes(model, v_pad, b, s, tp, e)
    per_mb = 8 * s * b if k == 0 else 0  # token ids for the embedding's backward
    per_mb += x if not last else 0  # output sent downstream, kept until its gradient comes back
    if layout.activation_checkpointing:
        # Received input == first checkpointed layer input, so no extra boundary term.
        per_mb += n * x
        head = head_saved + head_transient if last else 0
        return (pp - k) * per_mb + max(head, layer if n else 0)
    per_mb += layers + (x if k > 0 else 0)
    transient = dispatch if any(kinds) else 0
    table = rope_table_bytes(model, s, e) if n else 0  # saved once, shared by the micro-batches
    if last:
        return per_mb + max(head_transient, transient) + head_saved + table
    return (pp - k) * per_mb + transient + table


def check_layout(model: ModelConfig, layout: Layout) -> None:
    """The runtime topology's rules (`Topology.validate`), as one-line ConfigErrors."""
    if min(layout.tp, layout.pp, layout.dp, layout.micro_batch_size, layout.seq_len) <= 0:
        raise ConfigError(f"layout {layout.name}: sizes, micro-batch and seq-len must be positive")
    if layout.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"layout {layout.name}: ZeRO stage must be 0..3")
    try:
        Topology(tp=layout.tp, pp=layout.pp, dp=layout.dp, ep=layout.ep).validate(
            model, zero_stage=layout.zero_stage
        )
    except ConfigError as exc:
        raise ConfigError(f"layout {layout.name}: {exc}") from None


def per_gpu_memory(model: ModelConfig, vocab_size: int, layout: Layout) -> MemoryEstimate:
    """Per-GPU bytes on the pipeline stage with the largest total."""
    check_layout(model, layout)
    w, g, o = _BYTES[layout.precision]
    dp, zero, ep = layout.dp, layout.zero_stage, layout.ep
    v_pad = _padded_vocab(model, vocab_size)

    def shard(n: int, stage: int, over: int = dp) -> int:  # ZeRO over dp (ceil: last pads)
        return -(-n // over) if zero >= stage else n

    best: MemoryEstimate | None = None
    stages = stage_parameter_split(model, vocab_size, layout.tp, layout.pp, ep)
    for k, (dense, experts) in enumerate(stages):
        n = dense + experts  # routed experts are sharded over the dp / ep ranks that hold them
        params, grads, opt = (
            b * (shard(dense, stage) + shard(experts, stage, dp // ep))
            for b, stage in ((w, 3), (g, 2), (o, 1))
        )
        act = _stage_activations(model, v_pad, layout, k)
        total = params + grads + opt + act
        if best is None or total > best.total:
            best = MemoryEstimate(params, grads, opt, act, total, n, k, layout.pp)
    assert best is not None
    return best


PlanRow = tuple[str, Layout, MemoryEstimate]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_table(rows: list[PlanRow]) -> str:
    """Markdown table of plan rows (model name, layout, estimate); sizes in GiB to 1 decimal."""
    header = (
        "| model | layout tp x pp x dp | GPUs | ZeRO | micro-batch x seq | stage | params/GPU "
        "| weights GiB | grads GiB | optimizer GiB | activations GiB | total GiB |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for name, lay, est in rows:
        batch = f"{lay.micro_batch_size} x {lay.seq_len}" + (
            " ckpt" if lay.activation_checkpointing else ""
        )
        gib = [
            f"{x / GiB:.1f}"
            for x in (est.params, est.grads, est.optimizer, est.activations, est.total)
        ]
        cells = [name, lay.name, str(lay.tp * lay.pp * lay.dp), str(lay.zero_stage), batch]
        cells += [est.stage_name, _count(est.params_per_gpu), *gib]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_LAYOUT = re.compile(r"(\d+)x(\d+)x(\d+)(?::(\d))?(?:/(\d+))?")


def parse_layout(text: str, *, zero_stage: int, ep: int = 1, **rest: Any) -> Layout:
    """'TPxPPxDP[:ZERO][/EP]' -> Layout; `rest` fills micro-batch, seq-len, checkpointing,
    precision; `ep` is the expert-parallel size when the text names none."""
    match = _LAYOUT.fullmatch(text.strip().lower())
    if match is None:
        raise ConfigError(f"--layout '{text}': expected TPxPPxDP[:ZERO][/EP], e.g. 4x2x8:1")
    tp, pp, dp = (int(x) for x in match.groups()[:3])
    zero = int(match.group(4)) if match.group(4) is not None else zero_stage
    ep = int(match.group(5)) if match.group(5) is not None else ep
    return Layout(tp, pp, dp, zero, ep=ep, **rest)


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config, e.g. configs/llada-8b.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides (right after CONFIG)"
    )
    parser.add_argument(
        "--layout",
        action="append",
        metavar="TPxPPxDP[:ZERO][/EP]",
        help=f"parallel layout, repeatable (default: {' '.join(DEFAULT_LAYOUTS)})",
    )
    parser.add_argument("--micro-batch", type=int, help="default: train.micro_batch_size")
    parser.add_argument("--seq-len", type=int, help="default: data.seq_len")
    parser.add_argument("--vocab-size", type=int, help="required when model.vocab_size is null")


def run_plan(args: argparse.Namespace) -> int:
    """Print the memory table for the config under each layout."""
    from pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    vocab = args.vocab_size or cfg.model.vocab_size
    if vocab is None:
        raise ConfigError("model.vocab_size is null: pass --vocab-size N")
    common = dict(
        zero_stage=cfg.parallel.zero_stage,
        micro_batch_size=args.micro_batch or cfg.train.micro_batch_size,
        seq_len=args.seq_len or cfg.data.seq_len,
        activation_checkpointing=cfg.model.activation_checkpointing,
        precision="fp32" if cfg.train.precision == "fp32" else "bf16",
        ep=cfg.parallel.expert_parallel,
    )
    rows: list[PlanRow] = []
    notes: list[str] = []
    for text in args.layout or DEFAULT_LAYOUTS:
        layout = parse_layout(text, **common)
        try:
            rows.append((cfg.run.name, layout, per_gpu_memory(cfg.model, vocab, layout)))
        except ConfigError as exc:
            if args.layout:  # layouts the user asked for must fit; defaults are skipped
                raise
            notes.append(f"skipped {exc}")
    print(format_table(rows))
    print(
        "\nPer GPU on the heaviest pipeline stage. Weights/grads/optimizer are exact for this "
        "model; activations are estimates (no allocator overhead, temporaries or fragmentation)."
    )
    if cfg.model.moe.enabled:
        print(moe_notes(cfg.model, vocab, [layout for _, layout, _ in rows]))
    for note in notes:
        print(note)
    return 0


def moe_notes(model: ModelConfig, vocab_size: int, layouts: list[Layout]) -> str:
    """Experts per GPU and the all-to-all buffers of each layout, for the plan's footer."""
    moe = model.moe
    total, active = (
        parameter_counts(model, vocab_size)["total"],
        active_parameters(model, vocab_size),
    )
    lines = [
        f"MoE: {moe.num_experts} experts per MoE layer, top-{moe.top_k}; "
        f"{_count(total)} parameters, {_count(active)} active per token"
    ]
    for lay in layouts:
        e = 2 if lay.precision == "bf16" else 4
        _, dispatch = moe_layer_activation_bytes(
            model, lay.micro_batch_size, lay.seq_len, lay.tp, e
        )
        lines.append(
            f"  {lay.name}: {moe.num_experts // lay.ep} experts per GPU per layer, all-to-all "
            f"buffers {dispatch / GiB:.2f} GiB (transient, one layer at a time; balanced routing)"
        )
    return "\n".join(lines)
