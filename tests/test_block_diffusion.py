"""Block diffusion: the three-part attention mask against its definition, the vectorised
[x_t ; x0] loss against a slow per-block reference, and a short real training run."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import tiny_overrides

from pretrain.config import DiffusionConfig, ModelConfig, load_config
from pretrain.diffusion.corruption import CorruptionKey
from pretrain.diffusion.masks import block_causal_mask, block_diffusion_mask
from pretrain.diffusion.objective import build_objective
from pretrain.errors import ConfigError
from pretrain.model.attention import get_attention_backend

V, MASK = 30, 29


def test_block_diffusion_mask_enumerates_the_definition():
    """L = 6, B = 2: every (query, key) pair of the 12 x 12 mask, from the definition."""
    length, block = 6, 2
    mask = block_diffusion_mask(length, block)
    allowed = set()
    for q, k in itertools.product(range(2 * length), repeat=2):
        q_noisy, k_noisy = q < length, k < length
        qb, kb = (q % length) // block, (k % length) // block
        own_noisy_block = q_noisy and k_noisy and qb == kb
        earlier_clean_block = q_noisy and not k_noisy and kb < qb
        clean_causal = not q_noisy and not k_noisy and kb <= qb
        if own_noisy_block or earlier_clean_block or clean_causal:
            allowed.add((q, k))
    got = {(q, k) for q, k in itertools.product(range(2 * length), repeat=2) if mask[q, k]}
    assert got == allowed
    assert len(allowed) == 3 * 4 + (0 + 2 * 2 + 4 * 2) + (2 * 2 + 4 * 2 + 6 * 2)
    # the generation-time mask is the clean half's: block-causal
    assert torch.equal(block_causal_mask(length, block), mask[length:, length:])


@pytest.fixture(scope="module")
def tiny_model(runtime):
    from pretrain.model.parallelize import build_model

    cfg = ModelConfig(
        hidden_size=32,
        num_layers=2,
        num_attention_heads=2,
        ffn_hidden_size=64,
        attention_backend="masked",
    )
    return build_model(cfg, vocab_size=V, mask_token_id=MASK, seed=1).eval()


def test_vectorised_loss_equals_slow_per_block_reference(tiny_model):
    """One forward over [x_t ; x0] gives, at every noisy position of block j, the CE of a forward
    over [x0 blocks < j ; x_t block j] alone (block-causal, natural positions), so the loss is the
    sum of per-block losses."""
    length, block = 12, 4
    obj = build_objective(
        DiffusionConfig(objective="block", block_length=block), mask_id=MASK, seq_len=length
    )
    x0 = torch.randint(0, MASK, (3, length), generator=torch.Generator().manual_seed(0))
    batch = obj.prepare(x0, CorruptionKey(seed=4, step=2))
    assert batch.inputs.shape == (3, 2 * length) and batch.masked[:, length:].sum() == 0
    with torch.no_grad():
        ce = tiny_model(
            batch.inputs,
            targets=batch.targets,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        )
        vectorised, _ = obj.loss(ce, batch)
        reference_ce = torch.zeros(3, length)
        for j in range(length // block):
            lo, hi = j * block, (j + 1) * block
            seq = torch.cat([x0[:, :lo], batch.inputs[:, lo:hi]], dim=1)
            out = tiny_model(
                seq,
                targets=x0[:, :hi],
                attention_mask=block_causal_mask(hi, block)[None, None],
            )
            reference_ce[:, lo:hi] = out[:, lo:hi]
    noisy = batch.masked[:, :length]
    assert noisy.sum() > 5
    torch.testing.assert_close(ce[:, :length][noisy], reference_ce[noisy], rtol=1e-5, atol=1e-5)
    weights = batch.loss_weights[:, :length]
    reference = (reference_ce * weights * noisy).sum() / x0.numel()
    torch.testing.assert_close(vectorised, reference, rtol=1e-5, atol=1e-6)


def test_block_times_are_per_block_and_keyed():
    obj = build_objective(
        DiffusionConfig(objective="block", block_length=4), mask_id=MASK, seq_len=16
    )
    x0 = torch.randint(0, MASK, (8, 16))
    t = obj.block_times(8, 16, CorruptionKey(seed=0, step=1), "block-t")
    assert t.shape == (8, 4) and t.unique().numel() == 32
    halves = [
        obj.block_times(4, 16, CorruptionKey(0, 1, micro=m, micro_batches=2), "block-t")
        for m in range(2)
    ]
    assert torch.equal(torch.cat(halves), t)
    batch = obj.prepare(x0, CorruptionKey(seed=0, step=1))
    rate = batch.masked[:, :16].float().view(8, 4, 4).mean(-1)  # per block
    assert torch.corrcoef(torch.stack([rate.flatten(), t.flatten()]))[0, 1] > 0.5


def test_block_objective_config_errors():
    with pytest.raises(ConfigError, match="must divide data.seq_len"):
        build_objective(DiffusionConfig(objective="block", block_length=5), mask_id=1, seq_len=16)
    with pytest.raises(ConfigError, match="shared NELBO schedule"):
        build_objective(
            DiffusionConfig(objective="block", schedule="distance"), mask_id=1, seq_len=16
        )
    # Block diffusion runs under pipeline parallelism since the redesign (the block pattern travels
    # with the activations): the layout is accepted, not refused.
    cfg = load_config(None, ["diffusion.objective=block", "parallel.pipeline_parallel=2"])
    assert cfg.parallel.pipeline_parallel == 2
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'flex' is not usable here"):
            get_attention_backend("flex")


def test_block_diffusion_trains_and_generates(demo_data, tmp_path, runtime):
    from pretrain.sampling.models import decode_defaults, objective_model_fn
    from pretrain.sampling.sampler import generate
    from pretrain.trainer import train

    cfg = load_config(
        "configs/tiny.yaml",
        tiny_overrides(
            demo_data,
            tmp_path,
            "bd",
            **{"diffusion.objective": "block", "diffusion.block_length": 8, "train.steps": 12},
        ),
    )
    result = train(cfg)
    losses = list(result.losses.values())
    assert torch.isfinite(torch.tensor(losses)).all()
    assert sum(losses[-4:]) / 4 < sum(losses[:2]) / 2  # it learns
    from pretrain.probe.loading import load_model

    loaded = load_model(result.run_dir)
    options = decode_defaults(loaded.cfg.diffusion, 32)
    assert options["block_length"] == 8
    # ids 0 and 1 are <eos> and <mask>: a prompt is ordinary text, so draw above them.
    prompt = torch.randint(2, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    out = generate(
        objective_model_fn(loaded.module, loaded.cfg.diffusion),
        prompt,
        gen_length=16,
        tokens_per_step=4,
        mask_id=loaded.manifest.tokenizer.mask_id,
        **options,
    )
    assert out.shape == (2, 24) and (out != loaded.manifest.tokenizer.mask_id).all()
