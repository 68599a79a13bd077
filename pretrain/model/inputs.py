"""What one forward of the model takes, and how it travels between pipeline stages.

    ModelInputs(tokens [b, s], position_ids [s] | None, attention AttentionMask | None)

Every stage of a pipeline needs the per-sample inputs, not only the first: each layer attends
under the mask and rotates by the positions. DeepSpeed's pipeline engine moves a tuple of tensors
from stage to stage, so the inputs are packed into a fixed four-tuple

    (tokens or hidden, position_ids, pattern, document_ids)

where an absent entry is a 0-dim placeholder (its absence is read from the shape, on the host:
no device sync) and the bool pattern travels as uint8 (NCCL does not send bool tensors). The
layers pass the three side entries on unchanged, and the last stage drops them. The shapes of a
run's micro-batches change rarely (an auxiliary loss starting, an evaluation batch), and the
engine re-announces them to DeepSpeed when they do (`signature`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.model.masks import AttentionMask, DocumentMask


@dataclass
class ModelInputs:
    tokens: torch.Tensor
    """[b, s] token ids."""
    position_ids: torch.Tensor | None = None
    """None (0..s-1) or long [s]: RoPE positions shared by the batch."""
    attention: AttentionMask | None = None
    """None (bidirectional) or the pattern and documents attention respects."""

    def pack(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pipeline's first-stage input tuple."""
        return (self.tokens, *pack_side(self.position_ids, self.attention, self.tokens.device))


def _absent(device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.uint8, device=device)


def pack_side(position_ids, attention: AttentionMask | None, device) -> tuple:
    """(position_ids, pattern as uint8, document ids), 0-dim placeholders where absent."""
    pattern = None if attention is None else attention.pattern
    docs = None if attention is None else attention.documents
    return (
        _absent(device) if position_ids is None else position_ids,
        _absent(device) if pattern is None else pattern.to(torch.uint8),
        _absent(device) if docs is None else docs.ids,
    )


def unpack_side(position_ids, pattern, document_ids):
    """Inverse of `pack_side`: (position_ids | None, AttentionMask | None)."""
    position_ids = None if position_ids.ndim == 0 else position_ids
    pattern = None if pattern.ndim == 0 else pattern.bool()
    docs = None if document_ids.ndim == 0 else DocumentMask.from_ids(document_ids)
    attention = None if pattern is None and docs is None else AttentionMask(pattern, docs)
    return position_ids, attention


def signature(packed: tuple[torch.Tensor, ...]) -> tuple:
    """Shapes and dtypes of a packed tuple (host metadata only)."""
    return tuple((tuple(t.shape), t.dtype) for t in packed)
