"""What attention may see: an objective's pattern and the documents of packed blocks.

    AttentionMask(pattern, documents)   M[b, i, j] = pattern[i, j] and doc(b, i) = doc(b, j)

* `pattern` (bool [1, 1, s, s], True = may attend, or None for all pairs) is a shape an objective
  chooses for every sequence alike: causal for `ar`, the block-diffusion mask over [x_t ; x0],
  the causal-to-bidirectional anneal of `ar_adapt`. The model does not know which one it is.
* `documents` (a `DocumentMask`, or None) keeps each position inside its own document: training
  blocks are packed across document boundaries (`data_pipeline.build`), so plain attention lets
  a masked token read the neighbouring, unrelated documents. Built on the host from the clean
  tokens (EOS-delimited, `data_pipeline.reader.document_ids`).

Each attention backend takes the mask in its own form, prepared once per forward (not per layer;
`pretrain.model.attention.AttentionBackend.prepare`): a dense bool mask for `sdpa`/`masked`, a
BlockMask that skips the tiles where nothing may attend for `flex`, and the variable-length
segments for `flash` (`flash_attn_varlen_func`, no mask materialised at all; documents only).
RoPE positions are not reset per document: attention scores depend on relative positions only,
and those are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DocumentMask:
    """The documents of a batch of packed blocks, in the forms the attention kernels take."""

    ids: torch.Tensor
    """[b, s] int32 document index per position (equal ids = same document)."""
    cu_seqlens: torch.Tensor | None = None
    """[n + 1] int32: where each of the n documents of the flattened [b * s] tokens starts, then
    b * s (flash-attn's variable-length layout; a document never spans two rows). Computed on
    the host when the ids are (`from_ids` on host ids), else on first use (`varlen`)."""
    max_seqlen: int | None = None
    """Length of the longest document (known on the host: no device sync to size kernels)."""

    @classmethod
    def from_ids(cls, ids: torch.Tensor) -> DocumentMask:
        """From per-position ids [b, s], non-decreasing along each row. On host ids the segments
        are found right away (no device sync later); on device ids they are found when a
        variable-length kernel first asks (`varlen`, one sync)."""
        if ids.device.type != "cpu":
            return cls(ids.to(torch.int32))
        cu, longest = _segments(ids)
        return cls(ids.to(torch.int32), cu, longest)

    def varlen(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens, max_seqlen) for flash-attn's variable-length kernel."""
        if self.cu_seqlens is not None and self.max_seqlen is not None:
            return self.cu_seqlens, self.max_seqlen
        cu, longest = _segments(self.ids)
        return cu, longest

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> DocumentMask:
        """The same mask with `fn` (e.g. a copy to the device) applied to its tensors."""
        cu = None if self.cu_seqlens is None else fn(self.cu_seqlens)
        return DocumentMask(fn(self.ids), cu, self.max_seqlen)

    def tile(self, n: int) -> DocumentMask:
        """The mask of the batch concatenated `n` times along the batch dimension (on the
        tensors' device, no sync: e.g. for a forward over [x0 ; samples])."""
        if n == 1:
            return self
        if self.cu_seqlens is None:
            return DocumentMask(self.ids.repeat(n, 1))
        total = self.ids.numel()
        starts = [self.cu_seqlens[:-1] + i * total for i in range(n)]
        end = self.cu_seqlens[-1:] + (n - 1) * total
        return DocumentMask(self.ids.repeat(n, 1), torch.cat([*starts, end]), self.max_seqlen)

    def concat_positions(self) -> DocumentMask:
        """The mask of [x ; x] along the sequence (block diffusion's [x_t ; x0]): position i of
        either half belongs to the document of position i mod s. No variable-length form: the
        two halves of a document are not one contiguous run."""
        return DocumentMask(torch.cat([self.ids, self.ids], dim=1))

    def dense(self) -> torch.Tensor:
        """[b, 1, s, s] bool, True where position i may attend to j (same document)."""
        return self.ids[:, None, :, None] == self.ids[:, None, None, :]


def _segments(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    b, s = ids.shape
    # Offset each row so that equal ids in different rows stay different segments.
    rows = torch.arange(b, device=ids.device)[:, None] * (s + 1)
    flat = (ids.long() + rows).reshape(-1)  # [b * s]
    start = torch.ones(b * s, dtype=torch.bool, device=ids.device)
    start[1:] = flat[1:] != flat[:-1]
    end = torch.tensor([b * s], device=ids.device)
    cu = torch.cat([start.nonzero().squeeze(1), end]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


@dataclass(frozen=True)
class AttentionMask:
    """An objective's attention pattern and the batch's documents, either optional."""

    pattern: torch.Tensor | None = None
    """bool [1, 1, s, s], True = may attend; None: every pair (bidirectional)."""
    documents: DocumentMask | None = None
    """Attend only within documents; None: across the whole block."""
    _dense: dict = field(default_factory=dict, compare=False, repr=False)

    @staticmethod
    def of(mask) -> AttentionMask | None:
        """None, a bool pattern tensor, a `DocumentMask` or an `AttentionMask` -> AttentionMask."""
        if mask is None or isinstance(mask, AttentionMask):
            return mask
        if isinstance(mask, DocumentMask):
            return AttentionMask(documents=mask)
        return AttentionMask(pattern=mask)

    def dense(self) -> torch.Tensor:
        """bool [b | 1, 1, s, s]: the pattern and the documents together (built once)."""
        if "mask" not in self._dense:
            if self.documents is None:
                mask = self.pattern
            elif self.pattern is None:
                mask = self.documents.dense()
            else:
                mask = self.documents.dense() & self.pattern
            self._dense["mask"] = mask
        return self._dense["mask"]

    def tile(self, n: int) -> AttentionMask:
        """For the batch concatenated `n` times along the batch dimension."""
        if n == 1 or self.documents is None:
            return self
        return AttentionMask(self.pattern, self.documents.tile(n))


def flex_block_mask(mask: AttentionMask, heads: int | None = None):
    """A FlexAttention BlockMask of `mask`: tiles where no pair may attend are skipped, so
    document-masked attention costs sum_doc len^2 rather than s^2 per row."""
    from torch.nn.attention.flex_attention import create_block_mask

    pattern, docs = mask.pattern, mask.documents
    if pattern is not None:
        pattern = pattern.reshape(pattern.shape[-2], pattern.shape[-1])  # [s, s], shared
    ids = None if docs is None else docs.ids
    s = pattern.shape[-1] if pattern is not None else ids.shape[1]
    batch = None if ids is None else ids.shape[0]
    device = pattern.device if pattern is not None else ids.device

    def allowed(bi, h, qi, ki):
        if ids is None:
            return pattern[qi, ki]
        same = ids[bi, qi] == ids[bi, ki]
        return same if pattern is None else same & pattern[qi, ki]

    return create_block_mask(allowed, batch, heads, s, s, device=device)
