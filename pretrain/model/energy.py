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
from megatron.core import parallel_state, tensor_parallel


def sequence_energy(
    module: torch.nn.Module, tokens: torch.Tensor, *, row: int, attention_mask=None
) -> torch.Tensor:
    """tokens [b, s] -> E(x) [b] fp32; `row`: the mask token's id."""
    hidden = module.hidden_states(tokens, attention_mask=attention_mask)  # [s, b, h]
    hidden = module.head.final_norm(hidden)
    pooled = tensor_parallel.copy_to_tensor_model_parallel_region(hidden.float().mean(dim=0))
    weight = module.head.output_layer.weight  # [V_pad / tp, h]: this rank's vocabulary rows
    row -= parallel_state.get_tensor_model_parallel_rank() * weight.shape[0]  # local index
    # Another TP rank may hold the row: this one then contributes 0 (through a zero vector, not
    # `* 0`, so that the gradient reaching the backward all-reduce is a contiguous tensor:
    # Megatron's all-reduce works on `.contiguous()` and would drop an expanded one's result).
    owner = 0 <= row < weight.shape[0]
    w = weight[row] if owner else weight.new_zeros(weight.shape[1])
    partial = pooled @ w.float()  # [b]
    return tensor_parallel.reduce_from_tensor_model_parallel_region(partial)
