"""The Megatron-core DLM: shapes, bidirectionality, attention backends, the excluded mask token."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import ModelConfig
from pretrain.errors import ConfigError
from pretrain.model.attention import CoreAttention, get_attention_backend
from pretrain.model.parallelize import build_model
from pretrain.model.transformer import OutputHead, padded_vocab_size

VOCAB, MASK = 300, 299


def small(**kw) -> ModelConfig:
    base = dict(hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=96)
    return ModelConfig(**{**base, **kw})


@pytest.fixture
def model(runtime):
    return build_model(small(), vocab_size=VOCAB, mask_token_id=MASK, seed=3)


def test_shapes_and_padded_vocab(model):
    tokens = torch.randint(0, VOCAB - 1, (3, 17))
    logits = model(tokens)
    assert logits.shape == (3, 17, padded_vocab_size(VOCAB, 128)) == (3, 17, 384)
    ce = model(tokens, targets=tokens)
    assert ce.shape == (3, 17) and ce.dtype == torch.float32


def test_mask_token_and_padding_can_never_be_predicted(model):
    logits = model(torch.randint(0, VOCAB - 1, (2, 9)))
    assert torch.all(logits[..., MASK] == float("-inf"))
    assert torch.all(logits[..., VOCAB:] == float("-inf"))
    assert torch.isfinite(logits[..., :MASK]).all()


def test_uniform_logits_give_log_of_vocab_minus_mask():
    """With all logits equal, CE = log(V - 1): mask and padding carry no probability."""
    excluded = torch.zeros(384, dtype=torch.bool)
    excluded[MASK] = True
    excluded[VOCAB:] = True
    logits = torch.zeros(5, 2, 384).masked_fill(excluded, float("-inf"))
    ce = OutputHead.cross_entropy(logits, torch.randint(0, MASK, (2, 5)))
    torch.testing.assert_close(ce, torch.full((2, 5), math.log(VOCAB - 1)))


def test_same_seed_same_weights_different_seed_different(runtime):
    a = build_model(small(), vocab_size=VOCAB, mask_token_id=MASK, seed=1)
    b = build_model(small(), vocab_size=VOCAB, mask_token_id=MASK, seed=1)
    c = build_model(small(), vocab_size=VOCAB, mask_token_id=MASK, seed=2)
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if pa.ndim == 2:
            assert not torch.equal(pa, pc), name


def test_attention_is_bidirectional(model):
    """Changing the last token changes the prediction at the first position (not causal)."""
    tokens = torch.randint(0, VOCAB - 1, (1, 12))
    changed = tokens.clone()
    changed[0, -1] = (tokens[0, -1] + 1) % (VOCAB - 1)
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert not torch.allclose(a[0, 0, :MASK], b[0, 0, :MASK])


@pytest.mark.parametrize("layers", [1, 2])
def test_boolean_mask_path_matches_causal_prefix_reference(runtime, layers):
    """A causal boolean mask makes position i depend on tokens <= i only: the output at i equals
    the causal model run on the prefix alone (with one layer: the unmasked prefix)."""
    m = build_model(
        small(attention_backend="masked", num_layers=layers),
        vocab_size=VOCAB,
        mask_token_id=MASK,
        seed=4,
    )
    tokens = torch.randint(0, VOCAB - 1, (1, 10))
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    with torch.no_grad():
        full = m(tokens, attention_mask=causal)
        for i in (0, 4, 9):
            prefix_mask = None if layers == 1 else causal[: i + 1, : i + 1]
            prefix = m(tokens[:, : i + 1], attention_mask=prefix_mask)
            torch.testing.assert_close(full[0, i, :MASK], prefix[0, i, :MASK], atol=1e-5, rtol=1e-5)
        # and the mask matters: without it, position 0 sees the future
        assert not torch.allclose(m(tokens)[0, 0, :MASK], full[0, 0, :MASK], atol=1e-3)


@pytest.mark.parametrize("groups", [None, 2, 1])
def test_sdpa_and_masked_backends_agree(runtime, groups):
    cfg = dict(num_query_groups=groups)
    sdpa = build_model(small(**cfg), vocab_size=VOCAB, mask_token_id=MASK, seed=5)
    ref = build_model(
        small(attention_backend="masked", **cfg), vocab_size=VOCAB, mask_token_id=MASK, seed=5
    )
    tokens = torch.randint(0, VOCAB - 1, (2, 16))
    mask = torch.rand(2, 1, 16, 16) > 0.3
    mask |= torch.eye(16, dtype=torch.bool)  # every query sees at least itself
    with torch.no_grad():
        for attention_mask in (None, mask):
            a = sdpa(tokens, attention_mask=attention_mask)[..., :MASK]
            b = ref(tokens, attention_mask=attention_mask)[..., :MASK]
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_activation_checkpointing_gives_identical_gradients(runtime):
    tokens = torch.randint(0, VOCAB - 1, (2, 8))
    grads = []
    for ckpt in (False, True):
        m = build_model(
            small(activation_checkpointing=ckpt), vocab_size=VOCAB, mask_token_id=MASK, seed=6
        )
        m(tokens, targets=tokens).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_attention_backend_registry_errors(runtime):
    with pytest.raises(ConfigError, match=r"model\.attention_backend: unknown backend 'nope'"):
        get_attention_backend("nope")
    if get_attention_backend("sdpa") and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"'flash' is not usable here"):
            get_attention_backend("flash")


def test_mask_refused_by_backend_without_mask_support(runtime, model):
    core = model.layers[0].self_attention.core_attention
    assert isinstance(core, CoreAttention)
    q = torch.randn(4, 1, 4, 16)
    object.__setattr__(core, "backend", get_attention_backend("sdpa"))
    assert core(q, q, q, None).shape == (4, 1, 64)


def test_sparse_output_head_equals_full_head_at_loss_positions(runtime, monkeypatch):
    """The output layer run on masked rows only, in chunks recomputed in backward (or keeping
    their logit gradient: `sparse_output_recompute=False`), gives the same CE there (0
    elsewhere) and the same gradients as the full head."""
    import pretrain.model.transformer as transformer

    # 4 rows of fp32 logits per chunk (padded vocab 384): many chunks, a ragged last one
    monkeypatch.setattr(transformer, "CE_CHUNK_BYTES", 4 * 384 * 4)
    tokens = torch.randint(0, VOCAB - 1, (3, 17), generator=torch.Generator().manual_seed(0))
    positions = torch.rand(3, 17, generator=torch.Generator().manual_seed(1)) < 0.4
    weights = torch.rand(3, 17, generator=torch.Generator().manual_seed(2))
    results = []
    # full head; sparse rows found by nonzero(); sized by the host's count; stored logit grads
    n = int(positions.sum())
    for sparse, count, recompute in (
        (False, None, True),
        (True, None, True),
        (True, n, True),
        (True, n, False),
    ):
        cfg = small(sparse_output_recompute=recompute)
        m = build_model(cfg, vocab_size=VOCAB, mask_token_id=MASK, seed=3)
        calls = []
        m.head.output_layer.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        ce = m(
            tokens,
            targets=tokens,
            loss_positions=positions if sparse else None,
            loss_count=count,
        )
        ce = torch.where(positions, ce, 0.0)
        (ce * weights).sum().backward()
        results.append((ce.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
        # once per chunk of 4 rows, and again in the backward unless the gradient was kept
        assert len(calls) == (-(-n // 4) * (1 + recompute) if sparse else 1)
    (ce_full, g_full), *sparse_results = results
    assert positions.sum() > 8
    for ce_sparse, g_sparse in sparse_results:
        torch.testing.assert_close(ce_sparse, ce_full, rtol=1e-5, atol=1e-6)
        for name, grad in g_full.items():
            torch.testing.assert_close(g_sparse[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert torch.equal(sparse_results[0][0], sparse_results[1][0])  # the same rows, same order
    torch.testing.assert_close(sparse_results[2][0], sparse_results[1][0], rtol=1e-6, atol=0)
    with torch.no_grad():  # evaluation takes the same path without recomputation
        ce_eval = build_model(small(), vocab_size=VOCAB, mask_token_id=MASK, seed=3)(
            tokens, targets=tokens, loss_positions=positions
        )
    torch.testing.assert_close(ce_eval, ce_full, rtol=1e-5, atol=1e-6)


def test_the_layer_stack_compiles_into_one_graph(model):
    """torch.compile sees the whole trunk as one graph (Megatron's row-parallel linear used to
    break it twice per layer: each break is a host round trip between kernels on a GPU)."""
    tokens = torch.randint(0, VOCAB - 1, (2, 16))
    hidden, rope = model.embedding(tokens), model.rotary(16)
    explained = torch._dynamo.explain(model.trunk)(hidden, None, rope)
    assert explained.graph_break_count == 0, [str(b.reason)[:120] for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_from_tables_equals_megatrons_rope_of_the_angles(dtype):
    """Our core attention rotates q and k with cos/sin tables made once (`RopeTable`); Megatron's
    unfused RoPE, which the layers no longer run, took the angles: the results are identical,
    also at gathered positions (block diffusion's two copies)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from pretrain.model.attention import apply_rope
    from pretrain.model.layers import RotaryEmbedding

    s, d = 24, 16
    rotary = RotaryEmbedding(d, 10000.0)
    t = torch.randn(s, 2, 3, d).to(dtype)  # [s, b, heads, d]
    positions = torch.arange(s // 2).repeat(2)
    inv_freq = rotary.inv_freq
    for table, pos in ((rotary(s), torch.arange(s)), (rotary(s).rows(positions), positions)):
        freqs = torch.outer(pos.float(), inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)[:, None, None, :]
        assert torch.equal(apply_rope(t, table), _apply_rotary_pos_emb_bshd(t, angles))
