"""Document masking for packed blocks: a position attends only to positions of its own document.

Training blocks are packed across document boundaries (`data_pipeline.build`), so plain
bidirectional attention lets a masked token read the neighbouring, unrelated documents. With
`data.document_mask` the trainer passes a `DocumentMask` as the model's attention mask, built on
the host from the clean tokens (EOS-delimited, `data_pipeline.reader.document_ids`):

    M[b, i, j] = 1[doc(b, i) = doc(b, j)]

Each attention backend takes it in its own form, prepared once per forward (not per layer) by
`prepare_documents`: a dense bool mask for `sdpa`/`masked`, a BlockMask that skips the tiles
outside the diagonal blocks for `flex`, and the variable-length segments for `flash`
(`flash_attn_varlen_func`, no mask materialised at all). RoPE positions are not reset per
document: attention scores depend on relative positions only, and those are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DocumentMask:
    """The documents of a batch of packed blocks, in the forms the attention kernels take."""

    ids: torch.Tensor
    """[b, s] int32 document index per position, non-decreasing along each row."""
    cu_seqlens: torch.Tensor
    """[n + 1] int32: where each of the n documents of the flattened [b * s] tokens starts, then
    b * s (flash-attn's variable-length layout; a document never spans two rows)."""
    max_seqlen: int
    """Length of the longest document (known on the host: no device sync to size kernels)."""

    @classmethod
    def from_ids(cls, ids: torch.Tensor) -> DocumentMask:
        """From per-position ids [b, s] (host tensors: the segments are found on the host)."""
        b, s = ids.shape
        # Offset each row so that equal ids in different rows stay different segments.
        flat = (ids.long() + torch.arange(b)[:, None] * (s + 1)).reshape(-1)  # [b * s]
        start = torch.ones(b * s, dtype=torch.bool)
        start[1:] = flat[1:] != flat[:-1]
        cu = torch.cat([start.nonzero().squeeze(1), torch.tensor([b * s])]).to(torch.int32)
        return cls(ids.to(torch.int32), cu, int((cu[1:] - cu[:-1]).max()))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> DocumentMask:
        """The same mask with `fn` (e.g. a copy to the device) applied to its tensors."""
        return DocumentMask(fn(self.ids), fn(self.cu_seqlens), self.max_seqlen)

    def tile(self, n: int) -> DocumentMask:
        """The mask of the batch concatenated `n` times along the batch dimension (on the
        tensors' device, no sync: e.g. for a forward over [x0 ; samples])."""
        total = self.ids.numel()
        starts = [self.cu_seqlens[:-1] + i * total for i in range(n)]
        end = self.cu_seqlens[-1:] + (n - 1) * total
        return DocumentMask(self.ids.repeat(n, 1), torch.cat([*starts, end]), self.max_seqlen)

    def dense(self) -> torch.Tensor:
        """[b, 1, s, s] bool, True where position i may attend to j (same document)."""
        return self.ids[:, None, :, None] == self.ids[:, None, None, :]


def flex_document_block_mask(docs: DocumentMask, heads: int | None = None):
    """A FlexAttention BlockMask of the document mask: tiles with no pair of the same document
    are skipped, so attention costs sum_doc len^2 rather than s^2 per row."""
    from torch.nn.attention.flex_attention import create_block_mask

    ids = docs.ids
    b, s = ids.shape

    def same_document(bi, h, qi, ki):
        return ids[bi, qi] == ids[bi, ki]

    return create_block_mask(same_document, b, heads, s, s, device=ids.device)
