"""The Monte-Carlo likelihood estimator of `dlm eval` against exact values on real (tiny) models:
a uniform predictor scores exactly -n log(V - 1); on a 4-token continuation the estimate converges
to the ELBO computed by enumerating every mask set / order, within its reported standard error,
and that standard error is calibrated; results do not depend on batch size or request order."""

from __future__ import annotations

import math
from itertools import combinations, permutations

import pytest
import torch

from pretrain.config import DiffusionConfig, ModelConfig
from pretrain.evaluation.backends import ModuleNet
from pretrain.evaluation.layouts import build_layout
from pretrain.evaluation.scoring import Request, Scorer

V, MASK, PAD = 20, 19, 0  # vocabulary 0..19, the mask is 19: 19 predictable tokens
CONTEXT, CONTINUATION = (3, 7, 1), (5, 11, 2, 8)
HORIZON = 4
"""Schedule horizon of the position-aware layouts: distances 0..3 reach k_i < 1 (`distance`)
and two clocks (`block`, blocks of 2), so the orders are far from uniform."""

LAYOUTS = {
    "linear": DiffusionConfig(),
    "cosine": DiffusionConfig(schedule="cosine"),
    "distance": DiffusionConfig(schedule="distance", distance_strength=2.0),
    "block_schedule": DiffusionConfig(schedule="block", block_length=2),
    "block_objective": DiffusionConfig(objective="block", block_length=4),
    "ar_adapt": DiffusionConfig(objective="ar_adapt"),
    "ar": DiffusionConfig(objective="ar"),
}


@pytest.fixture(scope="module")
def net(runtime):
    """A 2-layer model with a large init: its predictions depend strongly on what is masked."""
    from pretrain.model.parallelize import build_model

    cfg = ModelConfig(
        hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64, init_std=0.5
    )
    return ModuleNet(build_model(cfg, vocab_size=V, mask_token_id=MASK, seed=3).eval())


def scorer(net, name: str, **kwargs) -> Scorer:
    layout = build_layout(LAYOUTS[name], seq_len=HORIZON, mask_id=MASK)
    options = {"samples": 64, "batch_size": 64, "seed": 0, "max_length": 16, "pad_id": PAD}
    return Scorer(net, layout, **(options | kwargs))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_uniform_predictor_scores_exactly_minus_n_log_v_minus_one(net, name):
    """Zero output weights: every logit is 0 but the mask's (-inf), so each masked token costs
    log 19 whatever is masked. Every sample's weights sum to n, so the estimate is exact, with
    zero standard error (a 1/t-weighted estimator would scatter around it)."""
    from pretrain.model.parallelize import build_model

    cfg = ModelConfig(hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64)
    module = build_model(cfg, vocab_size=V, mask_token_id=MASK, seed=1).eval()
    with torch.no_grad():
        module.head.output_layer.weight.zero_()
    for future in (False, True):  # also with the rest of the window filled with masks
        sc = scorer(ModuleNet(module), name, samples=40, future_masks=future)
        for cont in [CONTINUATION, (4,), tuple(range(1, 11))]:
            (score,) = sc.score([Request(CONTEXT, cont)])
            want = -len(cont) * math.log(V - 1)
            assert abs(score.loglik - want) < 1e-4 * len(cont), (name, score.loglik, want)
            assert score.stderr < 1e-9


def ce_table(net, layout, positions: tuple[int, ...]) -> dict[frozenset, torch.Tensor]:
    """CE_i(M) [n] for every non-empty set M of the given continuation positions (masked)."""
    p, n = len(CONTEXT), len(CONTINUATION)
    sets = [frozenset(c) for k in range(1, len(positions) + 1) for c in combinations(positions, k)]
    x0 = torch.tensor(CONTEXT + CONTINUATION).repeat(len(sets), 1)
    hidden = torch.zeros_like(x0, dtype=torch.bool)
    for r, m in enumerate(sets):
        hidden[r, [p + j for j in m]] = True
    inputs = layout.inputs(x0, hidden, torch.ones_like(hidden))
    src = inputs.source[0, p : p + n]
    logits = net.run(inputs.model, lambda h, head: head.full_logits(h[src]), ())  # [rows, n, V]
    logits = logits.reshape(-1, logits.shape[-1])
    ce = torch.nn.functional.cross_entropy(logits, x0[:, p:].reshape(-1), reduction="none").double()
    return dict(zip(sets, ce.view(len(sets), n), strict=True))


def orders_elbo(table: dict, positions: tuple[int, ...]) -> float:
    """E over uniformly random masking orders of sum_k CE_{sigma(k)}(M_k): the NELBO of every
    shared schedule, by enumerating all len(positions)! orders."""
    total = 0.0
    for order in permutations(positions):
        total += sum(
            float(table[frozenset(order[:k])][order[k - 1]]) for k in range(1, len(order) + 1)
        )
    return total / math.factorial(len(positions))


def clock_elbo(table: dict, schedule) -> float:
    """sum over mask sets M and i in M of CE_i(M) P(M is masked first, i last), with
    P = int_0^1 f_i(t) prod_{M - i} F_j(t) prod_{not M} (1 - F_j(t)) dt by quadrature
    (F_j = 1 - alpha_j, f_j = -alpha_j'; t = s^2 smooths the t^(k-1) singularity at 0). Also
    checks that the probabilities of each set size sum to 1."""
    n = len(CONTINUATION)
    s = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    t, dt = s**2, 2 * s / 200_000  # [G]
    d = torch.arange(n, dtype=torch.float64)
    big_f = 1 - schedule.alpha(t[:, None], d[None])  # [G, n]
    small_f = -schedule.alpha_prime(t[:, None], d[None])
    total, mass = 0.0, [0.0] * (n + 1)
    for m, ce in table.items():
        inside = torch.tensor([j in m for j in range(n)])
        common = torch.where(inside, big_f, 1 - big_f).prod(dim=1)  # [G]
        for i in m:
            others = common / big_f[:, i].clamp(min=1e-300)
            prob = float((small_f[:, i] * others * dt).sum())
            mass[len(m)] += prob
            total += prob * float(ce[i])
    assert all(abs(x - 1) < 1e-4 for x in mass[1:]), mass
    return total


def exact_elbo(net, name: str) -> float:
    layout = build_layout(LAYOUTS[name], seq_len=HORIZON, mask_id=MASK)
    positions = tuple(range(len(CONTINUATION)))
    if name == "block_objective":  # blocks of 4 from position 0: {3} and {4, 5, 6}
        p, block = len(CONTEXT), LAYOUTS[name].block_length
        groups = {}
        for j in positions:
            groups.setdefault((p + j) // block, []).append(j)
        return sum(orders_elbo(ce_table(net, layout, tuple(g)), tuple(g)) for g in groups.values())
    table = ce_table(net, layout, positions)
    if layout.schedule.position_aware:
        return clock_elbo(table, layout.schedule)
    return orders_elbo(table, positions)


@pytest.mark.parametrize("name", ["linear", "distance", "block_schedule", "block_objective"])
def test_estimate_converges_to_the_enumerated_elbo_within_its_standard_error(net, name):
    exact = exact_elbo(net, name)
    request = Request(CONTEXT, CONTINUATION)
    (big,) = scorer(net, name, samples=2048, batch_size=1024).score([request])
    assert abs(big.loglik + exact) < 4 * big.stderr, (big.loglik, -exact, big.stderr)
    assert big.stderr < 0.01 * exact
    # the standard error is calibrated: over independent seeds, (estimate - exact) / stderr has
    # mean ~0 and root-mean-square ~1. 64 samples = 16 per level: a level's few possible mask
    # sets all occur, so no level's variance estimate is 0 by chance
    z = []
    for seed in range(40):
        (s,) = scorer(net, name, samples=64, seed=seed).score([request])
        z.append((s.loglik + exact) / s.stderr)
    z = torch.tensor(z)
    assert abs(float(z.mean())) < 0.8, z  # 4.5 standard errors of a mean of 40
    assert 0.5 < float(z.pow(2).mean().sqrt()) < 1.5, z
    # and the test is not vacuous: the per-sample values spread by far more than the tolerance
    assert s.stderr * math.sqrt(64) > 0.2


def test_shared_schedules_give_one_elbo_and_distance_another(net):
    """The NELBO of a shared schedule does not depend on alpha (uniform order); the distance
    schedule orders positions and bounds the likelihood differently."""
    linear, cosine, distance = (exact_elbo(net, n) for n in ("linear", "cosine", "distance"))
    assert abs(linear - cosine) < 1e-9
    assert abs(linear - distance) > 0.05


def test_results_do_not_depend_on_batch_size_order_or_duplicates(net):
    g = torch.Generator().manual_seed(5)
    requests = []
    for _ in range(12):
        p, n = (int(x) for x in torch.randint(1, 7, (2,), generator=g))
        ids = torch.randint(0, MASK, (p + n,), generator=g).tolist()
        requests.append(Request(tuple(ids[:p]), tuple(ids[p:])))
    for name in ("linear", "distance", "block_objective"):
        one = scorer(net, name, samples=8, batch_size=1).score(requests)
        eight = scorer(net, name, samples=8, batch_size=8).score(requests)
        order = torch.randperm(12, generator=g).tolist()
        shuffled = scorer(net, name, samples=8, batch_size=8).score(
            [requests[i] for i in order] + requests[:3]
        )
        for a, b in zip(one, eight, strict=True):
            assert abs(a.loglik - b.loglik) < 1e-5 and abs(a.stderr - b.stderr) < 1e-5
            assert a.greedy == b.greedy
        for k, i in enumerate(order):
            assert abs(shuffled[k].loglik - eight[i].loglik) < 1e-5
        for i in range(3):  # a repeated request is scored once, with the same value
            assert shuffled[12 + i] == shuffled[order.index(i)]
        # another seed draws other masks: the estimate moves (the seed is not ignored)
        other = scorer(net, name, samples=8, batch_size=8, seed=99).score(requests)
        assert max(abs(a.loglik - b.loglik) for a, b in zip(eight, other, strict=True)) > 1e-3
