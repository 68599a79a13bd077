"""A scalar sequence energy on the shared trunk (the `energy_nce` auxiliary loss).

    E(x) = w . mean_s norm(h_s(x))

h [s, b, h] are the final hidden states of the same transformer that predicts tokens, `norm` its
final RMSNorm, and w the output-layer row of the mask token: the model never predicts the mask
(its logit is fixed at -inf), so that row gets no gradient from the token loss and is otherwise
unused. Keeping the energy weights there means no new tensor: initialisation, checkpoints,
resuming at another layout and conversion treat them as part of the output layer. Every
position's hidden state has attended to the whole sequence (to its document, with
`data.document_mask`), so the pool can carry "do these tokens agree" features.

Under tensor parallelism the output layer is split by vocabulary rows, so w lives on one TP rank:
the product is computed as a column-parallel layer would (identity forward / all-reduce backward
on the input, all-reduce of the one non-zero partial product on the output).
"""

from __future__ import annotations

import torch
from megatron.core import tensor_parallel


def energy_from_hidden(head, hidden: torch.Tensor, *, row: int) -> torch.Tensor:
    """hidden [s (/ tp under sequence parallelism), b, h] -> E(x) [b] fp32, with `head` an
    `OutputHead`; `row`: the mask token's id."""
    normed = head.final_norm(hidden).float()
    if head.sequence_parallel:
        # each TP rank holds s / tp positions: sum them locally, add the partial sums (all-reduce
        # forward, identity backward: every rank's positions get the gradient of the total)
        total = tensor_parallel.reduce_from_tensor_model_parallel_region(normed.sum(dim=0))
        pooled = total / (normed.shape[0] * head.tp_size)
    else:
        pooled = normed.mean(dim=0)  # [b, h]
    pooled = tensor_parallel.copy_to_tensor_model_parallel_region(pooled)
    weight = head.output_layer.weight  # [V_pad / tp, h]: this rank's vocabulary rows
    row -= head.tp_rank * weight.shape[0]  # local index
    # Another TP rank may hold the row: this one then contributes 0 (through a zero vector, not
    # `* 0`, so that the gradient reaching the backward all-reduce is a contiguous tensor:
    # Megatron's all-reduce works on `.contiguous()` and would drop an expanded one's result).
    owner = 0 <= row < weight.shape[0]
    w = weight[row] if owner else weight.new_zeros(weight.shape[1])
    partial = pooled @ w.float()  # [b]
    return tensor_parallel.reduce_from_tensor_model_parallel_region(partial)


def sequence_energy(
    module: torch.nn.Module, tokens: torch.Tensor, *, row: int, attention_mask=None
) -> torch.Tensor:
    """tokens [b, s] -> E(x) [b] fp32 for a `DLMTransformer`; `row`: the mask token's id."""
    hidden = module.hidden_states(tokens, attention_mask=attention_mask)  # [s, b, h]
    return energy_from_hidden(module.head, hidden, row=row)
