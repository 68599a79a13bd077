"""Infilling: masks anywhere in a sequence are decoded and the clean context comes back bit for
bit, with the plain, block and ar_adapt model adapters; templates for `dlm generate`."""

from __future__ import annotations

import pytest
import torch
from test_sampling import MASK, Oracle, V

from pretrain.errors import ConfigError
from pretrain.sampling.sampler import infill
from pretrain.sampling.template import mark_spans, parse_template


def masked_copy(x: torch.Tensor, spans) -> torch.Tensor:
    """x with every (row, start, end) span set to MASK."""
    out = x.clone()
    for row, start, end in spans:
        out[row, start:end] = MASK
    return out


def test_spans_anywhere_are_decoded_and_the_context_is_untouched():
    g = torch.Generator().manual_seed(0)
    answer = torch.randint(0, 10, (3, 14), generator=g)
    # row 0: a middle span; row 1: a prefix and a suffix; row 2: two middle spans
    x = masked_copy(answer, [(0, 5, 9), (1, 0, 3), (1, 11, 14), (2, 2, 4), (2, 8, 12)])
    oracle = Oracle(answer, torch.rand(3, 14, generator=g) + 0.1)
    out = infill(oracle, x, tokens_per_step=2, mask_id=MASK)
    assert torch.equal(out, answer)  # greedy under an oracle fills in the answer
    for seen in oracle.seen:  # every call saw the context exactly as given
        assert torch.equal(seen[x != MASK], x[x != MASK])
    assert len(oracle.seen) == 3  # ceil(6 masks of the busiest row / 2)


def test_the_context_is_never_overwritten_even_by_a_model_that_wants_to():
    # a model whose argmax everywhere (also at context positions) is token 3
    x = torch.tensor([[1, 2, MASK, MASK, 5, 6, MASK, 8]])
    out = infill(
        lambda t: torch.nn.functional.one_hot(torch.full_like(t, 3), V).float() * 50,
        x,
        tokens_per_step=1,
        mask_id=MASK,
        temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(out[x != MASK], x[x != MASK]) and (out[x == MASK] == 3).all()


def test_remask_hook_never_reopens_the_context():
    answer = torch.arange(8)[None]
    x = masked_copy(answer, [(0, 3, 6)])
    oracle = Oracle(answer, torch.ones(1, 8))
    out = infill(
        oracle,
        x,
        tokens_per_step=3,
        mask_id=MASK,
        remask_fn=lambda s, xx, c, lg: torch.ones_like(c),
        max_steps=3,
    )
    assert torch.equal(out, answer)
    assert all(torch.equal(seen[x != MASK], x[x != MASK]) for seen in oracle.seen)


def test_blocks_are_counted_from_the_origin_and_decoded_in_order():
    answer = torch.randint(0, 10, (1, 12), generator=torch.Generator().manual_seed(1))
    x = masked_copy(answer, [(0, 2, 10)])  # masks at 2..9
    # most confident at the right: without blocks the right end would be committed first
    oracle = Oracle(answer, torch.linspace(0.1, 2.0, 12)[None])
    out = infill(oracle, x, tokens_per_step=4, mask_id=MASK, block_length=4, block_origin=0)
    assert torch.equal(out, answer)
    # blocks from 0: [0-3] holds masks 2, 3; [4-7]; [8-11] holds 8, 9 -> 1 + 1 + 1 calls
    filled = [(seen[0] != MASK).nonzero().flatten().tolist() for seen in oracle.seen]
    assert len(oracle.seen) == 3
    assert filled[1] == [0, 1, 2, 3, 10, 11] and filled[2] == list(range(8)) + [10, 11]
    with pytest.raises(ValueError, match="block_origin"):
        infill(oracle, x, tokens_per_step=1, mask_id=MASK, block_length=4, block_origin=3)


def test_schedule_order_measures_distance_from_each_spans_context():
    from pretrain.diffusion.schedules import build_schedule

    answer = torch.randint(0, 10, (1, 12), generator=torch.Generator().manual_seed(2))
    x = masked_copy(answer, [(0, 2, 5), (0, 8, 12)])
    oracle = Oracle(answer, torch.linspace(2.0, 0.1, 12)[None].flip(1))
    infill(
        oracle,
        x,
        tokens_per_step=2,
        mask_id=MASK,
        order="schedule",
        schedule=build_schedule("distance"),
    )
    # the distance schedule reveals the position next to the context first, in each span
    first = (oracle.seen[1][0] != MASK) & (x[0] == MASK)
    assert first.nonzero().flatten().tolist() == [2, 8]


def _model(runtime_vocab: int = V):
    from pretrain.config import ModelConfig
    from pretrain.model.parallelize import build_model

    return build_model(
        ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=2, ffn_hidden_size=64),
        vocab_size=runtime_vocab,
        mask_token_id=MASK,
        seed=3,
    ).eval()


@pytest.mark.parametrize("objective", ["masked", "block", "ar_adapt"])
def test_real_model_adapters_infill_a_middle_span_bit_exactly(runtime, objective):
    from pretrain.config import DiffusionConfig
    from pretrain.sampling.models import objective_model_fn

    cfg = DiffusionConfig(objective=objective, block_length=4)
    model_fn = objective_model_fn(_model(), cfg)
    calls = []

    def recording(t):
        calls.append(t.clone())
        return model_fn(t)

    x0 = torch.randint(0, 10, (2, 16), generator=torch.Generator().manual_seed(4))
    x = masked_copy(x0, [(0, 5, 11), (1, 8, 14)])
    block = {"block_length": 4, "block_origin": 0} if objective == "block" else {}
    out = infill(recording, x, tokens_per_step=2, mask_id=MASK, **block)
    context = x != MASK
    assert torch.equal(out[context], x0[context])  # bit for bit
    assert ((out >= 0) & (out < V) & (out != MASK)).all()
    assert all(torch.equal(seen[context], x0[context]) for seen in calls)
    if objective == "block":  # a block's masks are committed only after the earlier blocks
        for seen in calls:
            for row in range(2):
                masked = (seen[row] == MASK).nonzero().flatten()
                if masked.numel():
                    first_block = int(masked[0]) // 4
                    assert (seen[row, : first_block * 4] != MASK).all()


class _Tokenizer:
    """Whitespace-preserving toy tokenizer: one id per character (ids 0..9 for 'a'..'j')."""

    class _Enc:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text):
        return self._Enc([ord(c) - ord("a") if "a" <= c <= "j" else 10 for c in text])

    def decode(self, ids):
        return "".join(chr(i + ord("a")) if i < 10 else "_" for i in ids)


def test_template_syntax():
    tok = _Tokenizer()
    t = parse_template("ab[MASK:3]c d[MASK]", tok, MASK)
    assert t.ids.tolist() == [0, 1, MASK, MASK, MASK, 2, 10, 3, MASK]
    assert t.spans == [(2, 5), (8, 9)]
    assert parse_template("[MASK:2]ab", tok, MASK).spans == [(0, 2)]
    filled = [0, 1, 4, 4, 4, 2, 10, 3, 5]
    assert mark_spans(tok, filled, t.spans) == "ab[[eee]]c_d[[f]]"
    for bad, what in (
        ("abc", "no mask span"),
        ("a[MASK:x]b", "malformed"),
        ("a[MASK:0]", "no tokens"),
        ("a [MASK b", "malformed"),
    ):
        with pytest.raises(ConfigError, match=what):
            parse_template(bad, tok, MASK)
