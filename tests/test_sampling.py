"""Samplers: commit counts, orders, block decoding, the re-mask hook, and a real model."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.sampling.sampler import generate

V, MASK = 12, 11


class Oracle:
    """model_fn that knows the answer: logit 5 on `answer[i]` scaled by `sharpness[i]`, and records
    the sequence each call sees."""

    def __init__(self, answer: torch.Tensor, sharpness: torch.Tensor):
        self.answer, self.sharpness, self.seen = answer, sharpness, []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.clone())
        logits = torch.zeros(*x.shape, V)
        logits.scatter_(-1, self.answer[..., None], 5.0)
        return logits * self.sharpness[..., None]


def test_confidence_order_commits_most_confident_first_k_per_step():
    b, p, g = 2, 3, 8
    answer = torch.randint(0, 10, (b, p + g), generator=torch.Generator().manual_seed(0))
    sharp = torch.rand(b, p + g, generator=torch.Generator().manual_seed(1)) + 0.1
    oracle = Oracle(answer, sharp)
    out = generate(oracle, answer[:, :p], gen_length=g, tokens_per_step=3, mask_id=MASK)
    assert out.shape == (b, p + g)
    assert torch.equal(out, answer)  # greedy under an oracle reproduces it
    assert len(oracle.seen) == math.ceil(g / 3)  # one call per 3 tokens
    # first commit: exactly the 3 most confident generated positions of each row
    after_first = oracle.seen[1][:, p:] != MASK
    top3 = sharp[:, p:].topk(3, dim=1).indices
    expected = torch.zeros(b, g, dtype=torch.bool).scatter_(1, top3, True)
    assert torch.equal(after_first, expected)


def test_block_decoding_finishes_each_block_before_the_next():
    b, p, g, block = 1, 2, 9, 4
    answer = torch.randint(0, 10, (b, p + g), generator=torch.Generator().manual_seed(2))
    # make the last block the most confident: a non-block decoder would commit it first
    sharp = torch.linspace(0.1, 2.0, p + g)[None]
    oracle = Oracle(answer, sharp)
    out = generate(
        oracle, answer[:, :p], gen_length=g, tokens_per_step=2, mask_id=MASK, block_length=block
    )
    assert torch.equal(out, answer)
    assert len(oracle.seen) == 2 + 2 + 1  # ceil(4/2) + ceil(4/2) + ceil(1/2)
    for x in oracle.seen:
        gen = x[0, p:] != MASK
        for i in range(0, g, block):  # a later block holds tokens only once earlier ones are full
            if gen[i + block :].any():
                assert gen[: i + block].all()


def test_left_to_right_and_schedule_orders():
    from pretrain.diffusion.schedules import build_schedule

    b, p, g = 1, 2, 6
    answer = torch.randint(0, 10, (b, p + g), generator=torch.Generator().manual_seed(3))
    sharp = torch.linspace(2.0, 0.1, p + g)[None].flip(1)  # confidence grows to the right
    for order, schedule in (("left_to_right", None), ("schedule", build_schedule("distance"))):
        oracle = Oracle(answer, sharp)
        generate(
            oracle,
            answer[:, :p],
            gen_length=g,
            tokens_per_step=1,
            mask_id=MASK,
            order=order,
            schedule=schedule,
        )
        # despite the confidences, the distance schedule reveals nearest-to-the-prompt first
        revealed = [int((x[0, p:] != MASK).sum()) for x in oracle.seen]
        assert revealed == list(range(g))
        for x in oracle.seen[1:]:
            n = int((x[0, p:] != MASK).sum())
            assert (x[0, p : p + n] != MASK).all(), order
    with pytest.raises(ValueError, match="schedule"):
        generate(
            Oracle(answer, sharp),
            answer[:, :p],
            gen_length=g,
            tokens_per_step=1,
            mask_id=MASK,
            order="schedule",
        )


def test_remask_hook_reopens_positions_and_budget_terminates():
    b, p, g = 1, 1, 4
    answer = torch.randint(0, 10, (b, p + g), generator=torch.Generator().manual_seed(4))
    oracle = Oracle(answer, torch.ones(b, p + g))
    calls = []

    def remask_first_commit(step, x, committed, logits):
        calls.append(int(committed.sum()))
        return committed if step == 1 else None  # undo the first commit once

    out = generate(
        oracle,
        answer[:, :p],
        gen_length=g,
        tokens_per_step=2,
        mask_id=MASK,
        remask_fn=remask_first_commit,
    )
    assert torch.equal(out, answer)
    assert len(oracle.seen) == 3 and calls == [2, 2, 2]
    # a decoder that always re-masks everything still ends, within max_steps (+ a final fill)
    oracle = Oracle(answer, torch.ones(b, p + g))
    out = generate(
        oracle,
        answer[:, :p],
        gen_length=g,
        tokens_per_step=2,
        mask_id=MASK,
        remask_fn=lambda s, x, c, lg: c,
        max_steps=5,
    )
    assert (out != MASK).all() and len(oracle.seen) == 6


def test_temperature_sampling_is_reproducible_with_a_generator():
    logits_fn = lambda x: torch.randn(*x.shape, V, generator=torch.Generator().manual_seed(9))  # noqa: E731
    prompt = torch.zeros(3, 2, dtype=torch.long)
    runs = [
        generate(
            logits_fn,
            prompt,
            gen_length=6,
            tokens_per_step=2,
            mask_id=MASK,
            temperature=1.0,
            generator=torch.Generator().manual_seed(s),
        )
        for s in (0, 0, 1)
    ]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert (runs[0] != MASK).all() and torch.equal(runs[0][:, :2], prompt)


def test_generate_with_a_real_model(runtime):
    from pretrain.config import ModelConfig
    from pretrain.model.parallelize import build_model

    model = build_model(
        ModelConfig(hidden_size=32, num_layers=1, num_attention_heads=2, ffn_hidden_size=64),
        vocab_size=V,
        mask_token_id=MASK,
    ).eval()
    prompt = torch.randint(0, 10, (2, 3))
    out = generate(
        lambda x: model(x), prompt, gen_length=5, tokens_per_step=2, mask_id=MASK, block_length=3
    )
    assert out.shape == (2, 8) and torch.equal(out[:, :3], prompt)
    assert ((out >= 0) & (out < V) & (out != MASK)).all()


@pytest.mark.parametrize("score", ["visible", "masked"])
def test_remask_decode_re_masks_the_lowest_scoring_commit_and_fixes_it(score):
    """An oracle that gets position 3 wrong (token 7) whenever positions 2 and 3 are both masked,
    as a one-step decoder would, and scores every visible token by the answer: the budgeted loop
    re-masks the wrong token (the lowest score) and re-decodes it given position 2."""
    from pretrain.sampling.consistency import remask_decode

    answer = torch.tensor([[9, 1, 2, 3, 4, 5]])

    def model_fn(x):
        target = answer.expand_as(x).clone()
        target[(x[:, 2] == MASK) & (x[:, 3] == MASK), 3] = 7
        return torch.nn.functional.one_hot(target, V).float() * 10

    x = torch.tensor([[9, MASK, MASK, MASK, MASK, 5]])  # context: positions 0 and 5
    stats: dict = {}
    out = remask_decode(model_fn, x.clone(), mask_id=MASK, tokens_per_step=4, loop_steps=2,
                        score=score, temperature=0.0, stats=stats)  # fmt: skip
    assert torch.equal(out, answer)
    assert stats["calls"] == 1 + 2 + 1 + (2 if score == "masked" else 0)
    assert stats["remasked"].tolist() == [2]
    one_step = remask_decode(model_fn, x.clone(), mask_id=MASK, tokens_per_step=4,
                             loop_steps=0, temperature=0.0)  # fmt: skip
    assert one_step[0, 3] == 7  # without the loop the parallel error stays
