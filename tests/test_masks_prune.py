"""Unit-level ownership masks, the pruning rules (CPP, fixed share), the losses and weight folding.

Every expectation here is written out by hand (or computed from first principles), not re-derived
with the function under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from csmf.backbones.mlp import MaskedEmbedding, MaskedLinear
from csmf.fusion import fold_weights
from csmf.losses import aml_margin, in_batch_scores, softmax_loss
from csmf.masks import active, claim_free, trainable_rows, usable
from csmf.prune import cpp_free, fixed_free, release

T, F = True, False


def owners(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def mags(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def freed(mask: torch.Tensor) -> set[int]:
    assert mask.dtype == torch.bool
    return set(torch.nonzero(mask).flatten().tolist())


# ----- masks ---------------------------------------------------------------------------------------

OWNER_OUT = owners(1, 2, 0, 3)
OWNER_IN = owners(2, 1, 0, 3, 1)


@pytest.mark.parametrize(
    ("stage", "expected"),
    [
        (
            1,
            [
                [F, T, F, F, T],  # owner 1 reads owner-1 inputs only
                [F, F, F, F, F],  # owner 2: not active at stage 1
                [F, F, F, F, F],  # free unit: never active
                [F, F, F, F, F],
            ],
        ),
        (
            2,
            [
                [F, T, F, F, T],  # still owner-1 inputs only: a later unit never feeds an earlier one
                [T, T, F, F, T],  # owner 2 reads owners 1 and 2
                [F, F, F, F, F],
                [F, F, F, F, F],  # owner 3: not active yet
            ],
        ),
        (
            3,
            [
                [F, T, F, F, T],
                [T, T, F, F, T],
                [F, F, F, F, F],
                [T, T, F, T, T],  # owner 3 reads every owned input; free inputs (owner 0) never
            ],
        ),
    ],
)
def test_usable_matrix(stage, expected):
    got = usable(OWNER_OUT, OWNER_IN, stage)
    assert got.dtype == torch.bool
    assert got.shape == (4, 5)
    assert got.tolist() == expected


def test_active_trainable_and_claim():
    assert active(OWNER_IN, 1).tolist() == [F, T, F, F, T]
    assert active(OWNER_IN, 2).tolist() == [T, T, F, F, T]
    assert active(OWNER_IN, 3).tolist() == [T, T, F, T, T]
    assert trainable_rows(OWNER_OUT, 1).tolist() == [T, F, F, F]
    assert trainable_rows(OWNER_OUT, 2).tolist() == [F, T, F, F]
    assert trainable_rows(OWNER_OUT, 3).tolist() == [F, F, F, T]

    before = owners(2, 1, 0, 3, 0)
    claimed = claim_free(before, 4)
    assert claimed.tolist() == [2, 1, 4, 3, 4]
    assert claimed.dtype == torch.long
    assert before.tolist() == [2, 1, 0, 3, 0]  # a new tensor; the input is untouched
    assert release(owners(1, 1, 2, 1), torch.tensor([T, F, F, T])).tolist() == [0, 1, 2, 0]


def masked_linear(weight: list[list[float]], owner_out: torch.Tensor) -> MaskedLinear:
    w = torch.tensor(weight, dtype=torch.float32)
    layer = MaskedLinear(w.shape[1], w.shape[0], torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(torch.arange(1, w.shape[0] + 1, dtype=torch.float32) * 10)
    layer.owner.copy_(owner_out)
    return layer


def test_masked_linear_forward_and_grad_mask():
    layer = masked_linear([[1, 2, 3], [4, 5, 6], [7, 8, 9]], owners(1, 2, 0))
    owner_in = owners(1, 2, 0)
    x = torch.tensor([[1.0, 10.0, 100.0]])
    # stage 1: unit 0 reads input 0 (+ bias 10); unit 1 is not active (no bias either); unit 2 is free.
    assert layer(x, owner_in, 1).tolist() == [[1.0 + 10, 0.0, 0.0]]
    # stage 2: unit 1 reads inputs 0 and 1 (+ bias 20); input 2 is free and never read.
    assert layer(x, owner_in, 2).tolist() == [[1.0 + 10, 4 + 50 + 20.0, 0.0]]

    layer(x, owner_in, 2).sum().backward()
    layer.mask_grad(owner_in, 2)
    # Only row 1 (owned by stage 2) learns, and only on its usable inputs.
    assert layer.weight.grad.tolist() == [[0, 0, 0], [1, 10, 0], [0, 0, 0]]
    assert layer.bias.grad.tolist() == [0, 1, 0]


# ----- CPP -----------------------------------------------------------------------------------------


def test_cpp_hand_computed_layer():
    # total 5.0, tau 0.2 -> threshold 1.0; ascending 0.05, 0.1, 0.2, 0.5 (cumsum 0.85) are freed,
    # 1.15 would bring the cumulative mass to 2.0 > 1.0.
    m = mags(0.1, 0.5, 0.2, 3.0, 0.05, 1.15)
    free = cpp_free(m, owners(1, 1, 1, 1, 1, 1), 1, 0.2)
    assert free.shape == (6,)
    assert freed(free) == {4, 0, 2, 1}
    # A larger tau frees more: threshold 2.5 also takes 1.15 (cumsum 2.0) but not 3.0.
    assert freed(cpp_free(m, owners(1, 1, 1, 1, 1, 1), 1, 0.5)) == {4, 0, 2, 1, 5}


def test_cpp_threshold_is_inclusive():
    # total 4, tau 0.5 -> threshold 2; cumulative 1, 2, 4: the unit that lands exactly on 2 is freed.
    assert freed(cpp_free(mags(1, 1, 2), owners(1, 1, 1), 1, 0.5)) == {0, 1}


def test_cpp_only_the_stage_units_are_candidates_and_counted():
    m = mags(0.1, 0.01, 0.5, 100.0, 0.2, 3.0, 0.0)
    owner = owners(1, 2, 1, 2, 1, 1, 0)
    # Stage 1 units: 0, 2, 4, 5 with mass 0.1, 0.5, 0.2, 3.0 (total 3.8, threshold 0.76):
    # cumsum 0.1 (unit 0), 0.3 (unit 4), 0.8 (unit 2) -> units 0 and 4. The stage-2 unit of mass 0.01 and
    # the free unit are not candidates, and the stage-2 mass 100 is not in the total (with it the
    # threshold would be 20.76 and unit 2 would go too).
    assert freed(cpp_free(m, owner, 1, 0.2)) == {0, 4}
    # Stage 2: units 1 and 3 (total 100.01) -> the 0.01 unit only.
    assert freed(cpp_free(m, owner, 2, 0.2)) == {1}
    # A stage with no units frees nothing.
    assert freed(cpp_free(m, owner, 3, 0.9)) == set()


def test_cpp_tau_zero_frees_exact_zeros_only():
    assert freed(cpp_free(mags(0.0, 0.3, 0.0, 0.2), owners(1, 1, 1, 1), 1, 0.0)) == {0, 2}
    assert freed(cpp_free(mags(1e-30, 0.3, 0.2), owners(1, 1, 1), 1, 0.0)) == set()
    # All-zero layer: every cumulative sum is 0 <= 0, but one unit (the last in stable order) stays.
    assert freed(cpp_free(mags(0.0, 0.0, 0.0), owners(1, 1, 1), 1, 0.0)) == {0, 1}


def test_cpp_always_keeps_the_largest_unit():
    assert freed(cpp_free(mags(0.001, 10.0, 0.001), owners(1, 1, 1), 1, 0.999999)) == {0, 2}
    assert freed(cpp_free(mags(1, 1, 1, 1), owners(1, 1, 1, 1), 1, 0.999999)) == {0, 1, 2}
    tau_max = math.nextafter(1.0, 0.0)
    for n in range(2, 40):
        free = cpp_free(
            torch.rand(n, generator=torch.Generator().manual_seed(n)), torch.ones(n, dtype=torch.long), 1, tau_max
        )
        assert int(free.sum()) <= n - 1


def test_cpp_single_unit_stage_frees_nothing():
    assert freed(cpp_free(mags(5.0, 1.0, 1.0), owners(1, 2, 2), 1, 0.9)) == set()
    assert freed(cpp_free(mags(5.0), owners(1), 1, 0.9)) == set()


@pytest.mark.parametrize("tau", [-0.1, 1.0, 1.5])
def test_cpp_tau_out_of_range(tau):
    with pytest.raises(ValueError, match="tau"):
        cpp_free(mags(1, 2), owners(1, 1), 1, tau)


def test_cpp_through_masked_linear_magnitude():
    # 4 output units of stage 1 reading inputs owned by stages (1, 1, 2): column 2 is not usable by
    # stage-1 units, so its huge weights must not count.
    layer = masked_linear(
        [[0.5, -0.5, 100.0], [-3.0, 1.0, -100.0], [0.1, 0.1, 100.0], [2.0, -2.0, 100.0]], owners(1, 1, 1, 1)
    )
    magnitude = layer.magnitude(owners(1, 1, 2))
    torch.testing.assert_close(magnitude, mags(1.0, 4.0, 0.2, 4.0))
    # total 9.2, tau 0.2 -> threshold 1.84: 0.2 (unit 2), then 1.2 (unit 0), then 5.2 -> stop.
    assert freed(cpp_free(magnitude, layer.owner, 1, 0.2)) == {2, 0}

    # Mixed owners: each unit counts the inputs usable at its own stage; a free unit has no mass.
    layer = masked_linear([[1, -2, 3], [-4, 5, -6], [7, 8, 9]], owners(1, 2, 0))
    torch.testing.assert_close(layer.magnitude(owners(1, 2, 0)), mags(1.0, 9.0, 0.0))


def test_embedding_magnitude_is_column_l1():
    emb = MaskedEmbedding(3, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb.weight.copy_(torch.tensor([[1.0, -0.5], [-2.0, 0.25], [0.5, 0.0]]))
    torch.testing.assert_close(emb.magnitude(), mags(3.5, 0.75))


# ----- fixed share (PackNet) -----------------------------------------------------------------------


def test_fixed_free_smallest_fraction():
    m = mags(0.4, 0.1, 0.3, 0.2, 0.5)
    ones = owners(1, 1, 1, 1, 1)
    assert freed(fixed_free(m, ones, 1, 0.4)) == {1, 3}  # round(2.0) = 2 smallest
    assert freed(fixed_free(m, ones, 1, 0.6)) == {1, 3, 2}
    assert freed(fixed_free(m, ones, 1, 0.0)) == set()
    assert freed(fixed_free(m, ones, 1, 0.05)) == set()  # round(0.25) = 0
    # Only the stage's units are candidates and counted: stage 1 = units 0, 2, 4; 2/3 of 3 = 2.
    assert freed(fixed_free(m, owners(1, 2, 1, 2, 1), 1, 2 / 3)) == {2, 0}


def test_fixed_free_never_frees_all():
    m = mags(0.4, 0.1, 0.3, 0.2, 0.5)
    assert freed(fixed_free(m, owners(1, 1, 1, 1, 1), 1, 0.99)) == {0, 1, 2, 3}  # round(4.95) = 5 -> 4
    assert freed(fixed_free(mags(3.0), owners(1), 1, 0.9)) == set()
    assert freed(fixed_free(m, owners(2, 2, 2, 2, 2), 1, 0.5)) == set()
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="fraction"):
            fixed_free(m, owners(1, 1, 1, 1, 1), 1, bad)


# ----- losses ----------------------------------------------------------------------------------------


def manual_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    rows = []
    for b in range(logits.shape[0]):
        row = logits[b].double()
        rows.append(torch.log(torch.exp(row).sum()) - row[target[b]])
    return torch.stack(rows).mean()


def test_softmax_loss_margin_and_log_q_match_manual_cross_entropy():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 5, generator=g)
    target = torch.tensor([1, 0, 4])
    temperature = 0.5
    margin = torch.tensor([0.5, 0.0, 2.0])
    log_q = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15]))

    plain = softmax_loss(scores, target, temperature)
    torch.testing.assert_close(plain.double(), manual_ce(scores / temperature, target))

    logits = scores / temperature - log_q  # logQ: each candidate's log-probability is subtracted
    torch.testing.assert_close(
        softmax_loss(scores, target, temperature, log_q=log_q).double(), manual_ce(logits, target)
    )

    with_margin = logits.clone()
    for b in range(3):
        with_margin[b, target[b]] -= margin[b]  # the positive's logit is reduced by the margin
    got = softmax_loss(scores, target, temperature, margin=margin, log_q=log_q)
    torch.testing.assert_close(got.double(), manual_ce(with_margin, target))
    # A margin makes the loss strictly larger (it is a handicap on the positive).
    assert got > softmax_loss(scores, target, temperature, log_q=log_q)


def test_softmax_loss_weights_rows_like_a_weighted_mean():
    scores = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    target = torch.tensor([0, 0, 1])
    weight = torch.tensor([1.0, 0.25, 0.5])
    # By hand: row losses are log(1 + e^{-2}), log(1 + e^{1}), log 2 at temperature 1.
    rows = torch.tensor([math.log(1 + math.exp(-2)), math.log(1 + math.e), math.log(2)], dtype=torch.float64)
    expected = (rows * weight.double()).sum() / weight.sum()
    got = softmax_loss(scores, target, 1.0, weight=weight)
    torch.testing.assert_close(got.double(), expected)
    # Equal weights give the plain mean.
    torch.testing.assert_close(
        softmax_loss(scores, target, 1.0, weight=torch.full((3,), 7.0)), softmax_loss(scores, target, 1.0)
    )


def test_aml_margin_hand_example():
    upstream = torch.tensor(
        [
            [0.5, 0.9, 0.1, 0.7],  # 2 of 4 candidates above the positive -> m0 * 0.5
            [3.0, 1.0, 2.0, 0.0],  # positive on top -> 0
            [1.0, 1.0, 2.0, float("-inf")],  # a tie is not above; a masked (-inf) entry is not above
            [0.0, 0.3, 0.2, 0.1],  # positive is column 0 at the bottom -> 3 of 4
        ],
        requires_grad=True,
    )
    target = torch.tensor([0, 0, 0, 0])
    margin = aml_margin(upstream, target, 2.0)
    torch.testing.assert_close(margin, torch.tensor([1.0, 0.0, 0.5, 1.5]))
    assert not margin.requires_grad  # stop-gradient on the upstream objective
    # Target column other than 0.
    torch.testing.assert_close(
        aml_margin(upstream, torch.tensor([1, 2, 2, 2]), 1.0), torch.tensor([0.0, 0.25, 0.0, 0.25])
    )


def test_in_batch_scores_masks_duplicates_but_not_the_diagonal():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    items = torch.tensor([3, 5, 3, 7, 5])
    scores, target = in_batch_scores(u, v, items)
    assert target.tolist() == [0, 1, 2, 3, 4]
    masked = {(0, 2), (2, 0), (1, 4), (4, 1)}
    full = u @ v.T
    for i in range(5):
        for j in range(5):
            if (i, j) in masked:
                assert scores[i, j] == float("-inf"), (i, j)
            else:
                assert scores[i, j] == full[i, j], (i, j)


# ----- fusion ------------------------------------------------------------------------------------------


def test_fold_weights_hand_example():
    owner = owners(1, 2, 0, 3, 1, 2)
    lam = fold_weights(owner, {1: 0.2, 2: 0.5, 3: 1.0})
    # owner 1 is scored by objectives 1, 2, 3; owner 2 by 2, 3; owner 3 by 3; a free dimension by none.
    torch.testing.assert_close(lam, torch.tensor([1.7, 1.5, 0.0, 1.0, 1.7, 1.5]))
    torch.testing.assert_close(fold_weights(owner, {2: 0.5}), torch.tensor([0.5, 0.5, 0.0, 0.0, 0.5, 0.5]))
    torch.testing.assert_close(fold_weights(owner, {}), torch.zeros(6))


def test_fold_weights_equals_weighted_sum_of_stage_scores():
    g = torch.Generator().manual_seed(11)
    for _ in range(5):
        owner = torch.randint(0, 5, (16,), generator=g)
        u, v = torch.randn(7, 16, generator=g), torch.randn(11, 16, generator=g)
        weights = {k: float(torch.rand(1, generator=g)) * 2 - 0.5 for k in range(1, 5)}
        fused = (u * fold_weights(owner, weights)) @ v.T
        expected = torch.zeros(7, 11)
        for k, w in weights.items():
            mask_k = ((owner >= 1) & (owner <= k)).float()
            expected += w * ((u * mask_k) @ v.T)
        torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)


def test_fold_weights_is_bit_identical_in_numpy_and_torch_and_by_name():
    import numpy as np

    from csmf.fusion import fold_named, fold_weights

    rng = np.random.default_rng(0)
    owner = rng.integers(0, 4, size=64)
    weights = {1: 0.3, 2: 1.7, 3: 0.05}
    reference = torch.zeros(64)  # the fold as a torch loop: sum_k w_k [1 <= owner <= k]
    for stage, w in weights.items():
        reference += float(w) * ((torch.from_numpy(owner) >= 1) & (torch.from_numpy(owner) <= stage)).float()
    as_numpy, as_torch = fold_weights(owner, weights), fold_weights(torch.from_numpy(owner), weights)
    assert isinstance(as_numpy, np.ndarray) and isinstance(as_torch, torch.Tensor)
    assert torch.equal(as_torch, reference) and np.array_equal(as_numpy, reference.numpy())
    named = fold_named(owner, ("view", "cart", "buy"), {"view": 0.3, "cart": 1.7, "buy": 0.05})
    assert np.array_equal(named, as_numpy) and named[owner == 0].sum() == 0
