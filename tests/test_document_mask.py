"""Document masking of packed blocks: a packed forward equals each document run on its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_pipeline.reader import document_ids
from pretrain.config import ModelConfig, load_config
from pretrain.model.masks import AttentionMask, DocumentMask
from pretrain.model.parallelize import build_model

VOCAB, MASK, EOS = 300, 299, 0


def test_segments_of_packed_rows():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    docs = DocumentMask.from_ids(ids)
    # rows flatten to 12 tokens: documents of lengths 3, 2, 1 | 1, 5
    assert docs.cu_seqlens.tolist() == [0, 3, 5, 6, 7, 12]
    assert docs.cu_seqlens.dtype == torch.int32 and docs.ids.dtype == torch.int32
    assert docs.max_seqlen == 5
    dense = docs.dense()
    assert dense.shape == (2, 1, 6, 6)
    assert dense[0, 0, 0].tolist() == [True, True, True, False, False, False]
    assert dense[0, 0, 5].tolist() == [False] * 5 + [True]
    assert dense[1, 0, 0].tolist() == [True] + [False] * 5


def test_equal_ids_in_different_rows_are_different_documents():
    docs = DocumentMask.from_ids(torch.zeros(3, 4, dtype=torch.int32))
    assert docs.cu_seqlens.tolist() == [0, 4, 8, 12] and docs.max_seqlen == 4


# Two rows of 24; the last document of a row may continue into the next block (no EOS).
LENGTHS = [[7, 10, 7], [15, 9]]


def test_tile_is_the_mask_of_the_concatenated_batch():
    ids = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 2, 2, 2]])
    tiled = DocumentMask.from_ids(ids).tile(3)
    want = DocumentMask.from_ids(torch.cat([ids] * 3))
    assert torch.equal(tiled.ids, want.ids) and torch.equal(tiled.cu_seqlens, want.cu_seqlens)
    assert tiled.max_seqlen == want.max_seqlen


def test_auxiliary_forwards_attend_within_documents(runtime):
    """The auxiliary losses' view of the model passes the batch's document mask to every forward
    (logits, CE, and the energy over [x0 ; samples], a batch twice as long)."""
    from pretrain.diffusion.auxiliary import ModelView
    from pretrain.model.energy import sequence_energy

    config = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=96)
    model = build_model(config, vocab_size=VOCAB, mask_token_id=MASK, seed=5)
    tokens, _ = _packed_batch(torch.Generator().manual_seed(2))
    docs = DocumentMask.from_ids(document_ids(tokens, EOS))
    view, plain = ModelView(model, VOCAB, docs), ModelView(model, VOCAB)
    want = model(tokens, attention_mask=docs)[..., :VOCAB].float()
    torch.testing.assert_close(view.logits(tokens), want)
    assert not torch.allclose(plain.logits(tokens), want)
    torch.testing.assert_close(
        view.ce(tokens, tokens), model(tokens, targets=tokens, attention_mask=docs)
    )
    pair = torch.cat([tokens, tokens.flip(1)])  # [2b, s]
    both = DocumentMask.from_ids(torch.cat([document_ids(tokens, EOS)] * 2))
    energy = sequence_energy(model, pair, row=MASK, attention_mask=both)
    torch.testing.assert_close(view.energy(pair, row=MASK), energy)
    assert not torch.allclose(plain.energy(pair, row=MASK), energy)


def _packed_batch(generator):
    """[2, 24] tokens packed from EOS-ended documents, and the documents themselves."""
    rows, docs = [], []
    for row in LENGTHS:
        parts = []
        for i, n in enumerate(row):
            doc = torch.randint(1, MASK, (n,), generator=generator)
            if i < len(row) - 1:
                doc[-1] = EOS  # a document owns the EOS that ends it
            parts.append(doc)
            docs.append(doc)
        rows.append(torch.cat(parts))
    return torch.stack(rows), docs


@pytest.mark.parametrize("backend", ["sdpa", "masked"])
def test_packed_forward_and_gradients_equal_each_document_alone(runtime, backend):
    """Logits, summed CE and every parameter gradient of a packed, document-masked batch equal
    those of its documents run one by one (RoPE is relative: no position reset is needed)."""
    torch.manual_seed(0)
    config = ModelConfig(
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=96,
        attention_backend=backend,
    )
    model = build_model(config, vocab_size=VOCAB, mask_token_id=MASK, seed=5)
    tokens, _ = _packed_batch(torch.Generator().manual_seed(1))
    x_t = tokens.clone()
    x_t[:, ::3] = MASK  # some positions masked, as the objective would (the EOS included)
    mask = DocumentMask.from_ids(document_ids(tokens, EOS))

    packed_logits = model(x_t, attention_mask=mask)  # [2, 24, V]
    packed = model(x_t, targets=tokens, attention_mask=mask).sum()
    packed_grads = torch.autograd.grad(packed, list(model.parameters()))

    alone_logits, alone = [], 0.0
    for row, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            piece = slice(start, start + n)
            alone_logits.append(model(x_t[row : row + 1, piece])[0])
            ce = model(x_t[row : row + 1, piece], targets=tokens[row : row + 1, piece])
            alone = alone + ce.sum()
            start += n
    alone_grads = torch.autograd.grad(alone, list(model.parameters()))

    packed_logits = packed_logits.flatten(0, 1)  # [48, V], rows one after the other
    finite = torch.isfinite(packed_logits)  # the mask token and vocab padding are -inf
    torch.testing.assert_close(
        packed_logits[finite], torch.cat(alone_logits)[finite], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), packed_grads, alone_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)

    # the control: attending across documents gives different logits
    unmasked = model(x_t).flatten(0, 1)
    assert (unmasked[finite] - packed_logits[finite]).abs().max() > 1e-2


def test_every_objective_takes_document_masks():
    for objective in ("masked", "block", "ar", "ar_adapt"):
        cfg = load_config(None, ["data.document_mask=true", f"diffusion.objective={objective}"])
        assert cfg.data.document_mask
    assert load_config(None, ["data.document_mask=true", "parallel.pipeline_parallel=2"])


def test_block_diffusion_mask_intersects_documents():
    """Over block diffusion's [x_t ; x0], position i of either half belongs to the document of
    x0_i: the recipe's mask is the block mask and the document mask, pair by pair."""
    from pretrain.config import DiffusionConfig
    from pretrain.diffusion.corruption import CorruptionKey
    from pretrain.diffusion.masks import block_diffusion_mask
    from pretrain.diffusion.objective import build_objective
    from pretrain.diffusion.recipe import Recipe

    length, block = 8, 2
    objective = build_objective(
        DiffusionConfig(objective="block", block_length=block), mask_id=MASK, seq_len=length
    )
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]])
    tokens = torch.randint(1, MASK, (1, length), generator=torch.Generator().manual_seed(0))
    step = Recipe(objective, document_mask=True).prepare(
        tokens, CorruptionKey(0, 0), "cpu", document_ids=ids
    )
    dense = step.model_inputs().attention.dense()[0, 0]  # [2L, 2L]
    pattern = block_diffusion_mask(length, block)
    doc = torch.cat([ids[0], ids[0]])
    for q in range(2 * length):
        for k in range(2 * length):
            assert dense[q, k] == (pattern[q, k] and doc[q] == doc[k]), (q, k)


def test_causal_objective_with_documents_is_causal_within_each(runtime):
    """`ar` on a packed, document-masked batch: each position's logits equal those of its
    document run alone under the causal mask (RoPE is relative)."""
    from pretrain.config import DiffusionConfig
    from pretrain.diffusion.corruption import CorruptionKey
    from pretrain.diffusion.masks import causal_mask
    from pretrain.diffusion.objective import build_objective
    from pretrain.diffusion.recipe import Recipe

    config = ModelConfig(hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=96)
    model = build_model(config, vocab_size=VOCAB, mask_token_id=MASK, seed=5).eval()
    tokens, docs = _packed_batch(torch.Generator().manual_seed(3))
    objective = build_objective(DiffusionConfig(objective="ar"), mask_id=MASK, seq_len=24)
    step = Recipe(objective, document_mask=True).prepare(
        tokens, CorruptionKey(0, 0), "cpu", document_ids=document_ids(tokens, EOS)
    )
    inputs = step.model_inputs()
    with torch.no_grad():
        packed = model(inputs.tokens, attention_mask=inputs.attention).flatten(0, 1)
        alone = torch.cat(
            [model(d[None], attention_mask=causal_mask(len(d))[None, None])[0] for d in docs]
        )
    finite = torch.isfinite(packed)
    torch.testing.assert_close(packed[finite], alone[finite], atol=1e-5, rtol=1e-5)


def test_training_with_document_mask_tp2_equals_one_process(runtime, demo_data, tmp_path):
    """The trainer applies the mask (step-1 loss differs from full attention on the same batch
    and corruption), and TP=2 torchrun runs with it, without and with the three auxiliary losses,
    equal one process (tests/test_parallel.py tolerances)."""
    import test_parallel as par
    from test_auxiliary_parallel import AUX

    from pretrain.trainer import train

    doc = {"data.document_mask": True}
    tp2 = {"parallel.tensor_parallel": 2}
    plain = train(load_config(par.TINY, par.overrides(demo_data, tmp_path, "plain")))
    runs = {"doc": doc, "doc-aux": {**doc, **AUX}}
    single = {
        name: train(load_config(par.TINY, par.overrides(demo_data, tmp_path, name, **extra)))
        for name, extra in runs.items()
    }
    assert abs(par.losses(single["doc"])[1] - par.losses(plain)[1]) > 1e-4
    jobs = [
        {"overrides": par.overrides(demo_data, tmp_path, f"tp2-{name}", **extra, **tp2)}
        for name, extra in runs.items()
    ]
    for name, result in zip(runs, par.launch(2, jobs, tmp_path / "job"), strict=True):
        par.assert_losses_close(par.losses(result), par.losses(single[name]))
        par.assert_params_close(Path(result["checkpoint"]), single[name].checkpoint)


def _unusable_reason(name: str) -> str | None:
    """Why the GPU kernel test of backend `name` cannot run here (None: it can)."""
    from pretrain.model.attention import ATTENTION_BACKENDS

    if not torch.cuda.is_available():
        return "a bf16 GPU kernel test: no CUDA device here"
    return ATTENTION_BACKENDS[name].available()


@pytest.mark.parametrize("backend", ["flash", "flex", "sdpa"])
def test_gpu_document_mask_kernels_match_the_fp32_reference(backend):
    """On a GPU, bf16: each backend's own form of the document mask (flash-attn's varlen kernel,
    FlexAttention's BlockMask, SDPA's dense mask) gives the output and q/k/v gradients of the
    fp32 `masked` reference within bf16 tolerance (2e-2 of the largest magnitude)."""
    if reason := _unusable_reason(backend):
        pytest.skip(f"'{backend}': {reason}")
    from pretrain.model.attention import ATTENTION_BACKENDS

    gen = torch.Generator().manual_seed(0)
    b, s, d = 2, 256, 64
    ids = torch.tensor([[0] * 100 + [1] * 30 + [2] * 126, [0] * 256], dtype=torch.int32)
    docs = DocumentMask.from_ids(ids).map(lambda t: t.cuda())
    q = torch.randn(b, 8, s, d, generator=gen).cuda()
    k, v = (torch.randn(b, 2, s, d, generator=gen).cuda() for _ in range(2))
    grad = torch.randn(b, 8, s, d, generator=gen).cuda()

    def run(name, mask, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = ATTENTION_BACKENDS[name].fn(*leaves, mask=mask)
        return [out, *torch.autograd.grad(out, leaves, grad.to(dtype))]

    want = run("masked", docs.dense(), torch.float32)
    got = run(
        backend, ATTENTION_BACKENDS[backend].prepare(AttentionMask(documents=docs)), torch.bfloat16
    )
    for name, g, w in zip(["out", "dq", "dk", "dv"], got, want, strict=True):
        err = (g.float() - w).abs().max() / w.abs().max()
        assert err < 2e-2, f"{backend} {name}: relative error {err:.3g}"


def test_a_dense_document_mask_on_a_gpu_gets_a_hint(runtime):
    import dataclasses

    from pretrain.trainer import document_mask_note

    gpu = dataclasses.replace(runtime, device=torch.device("cuda"))
    cfg = load_config(None, ["data.document_mask=true"])
    assert "'flash' (varlen) or 'flex'" in document_mask_note(cfg, gpu)
    assert document_mask_note(cfg, runtime) is None  # CPU: every backend is dense there
    for over in (["data.document_mask=true", "model.attention_backend=flex"], []):
        assert document_mask_note(load_config(None, over), gpu) is None
