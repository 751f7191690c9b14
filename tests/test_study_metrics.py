"""The routing study's metrics on hand-made routing tables and representations with known answers."""

import itertools
import math

import numpy as np
import pytest
import torch
from modalmoe.runtime.moe.stats import specialisation_index as trainer_specialisation
from modalmoe.study import metrics as sm

# ---- specialisation index -------------------------------------------------------------------------


def test_specialisation_is_zero_when_expert_choice_ignores_modality():
    # text uses the experts in the same proportions as images, only with fewer tokens
    table = [[40, 20, 20, 20], [10, 5, 5, 5]]
    assert sm.specialisation_index(table) == pytest.approx(0.0, abs=1e-12)


def test_specialisation_is_one_when_the_expert_reveals_the_modality():
    table = [[30, 10, 0, 0], [0, 0, 7, 13]]
    assert sm.specialisation_index(table) == pytest.approx(1.0, abs=1e-12)


def test_specialisation_known_partial_value():
    # p(m) = (.5, .5); image always expert 0, text split evenly: I = H(.75,.25) − ½·1 bit = 0.311278 bits, H(m) = 1 bit
    assert sm.specialisation_index([[2, 0], [1, 1]]) == pytest.approx(0.8112781245 - 0.5, abs=1e-9)


def test_specialisation_is_invariant_to_expert_relabelling_and_matches_the_trainer():
    rng = np.random.default_rng(0)
    table = rng.integers(0, 50, size=(2, 8)).astype(float)
    perm = rng.permutation(8)
    assert sm.specialisation_index(table[:, perm]) == pytest.approx(sm.specialisation_index(table), abs=1e-12)
    assert sm.specialisation_index(table) == pytest.approx(trainer_specialisation(torch.tensor(table)), abs=1e-9)


def test_specialisation_degenerate_tables():
    assert sm.specialisation_index([[0, 0], [0, 0]]) == 0.0
    assert sm.specialisation_index([[5, 3], [0, 0]]) == 0.0  # one modality present: H(m) = 0


# ---- load balance -----------------------------------------------------------------------------------


def test_balance_metrics_even_and_collapsed():
    even = [[5, 5, 5, 5], [2, 2, 2, 2]]
    one = [[20, 0, 0, 0], [0, 0, 0, 8]]
    np.testing.assert_allclose(sm.load_cv(even), [0, 0], atol=1e-12)
    np.testing.assert_allclose(sm.load_cv(one), [math.sqrt(3)] * 2)  # √(E−1)
    np.testing.assert_allclose(sm.max_mean_ratio(even), [1, 1])
    np.testing.assert_allclose(sm.max_mean_ratio(one), [4, 4])
    np.testing.assert_allclose(sm.effective_experts(even), [4, 4])
    np.testing.assert_allclose(sm.effective_experts(one), [1, 1])
    np.testing.assert_allclose(sm.effective_experts([[1, 1, 0, 0], [3, 0, 3, 0]]), [2, 2])


# ---- routing similarity ----------------------------------------------------------------------------


def test_js_divergence_bounds():
    assert sm.js_divergence_bits([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0, abs=1e-12)
    assert sm.js_divergence_bits([1, 0], [0, 1]) == pytest.approx(1.0)
    # half overlap: JSD of (1,0) vs (½,½) = H(¾,¼) − ½·H(½,½) bits
    assert sm.js_divergence_bits([1, 0], [1, 1]) == pytest.approx(0.8112781245 - 0.5, abs=1e-9)


def test_share_similarity_needs_the_expert_matching():
    a = np.array([[10, 0, 0, 0], [0, 4, 4, 2]], dtype=float)
    perm = np.array([2, 0, 3, 1])  # a's expert i is b's expert perm[i]
    b = np.zeros_like(a)
    b[:, perm] = a
    assert sm.share_similarity(a, b, perm) == pytest.approx(1.0)
    assert sm.share_similarity(a, b) < 0.5
    assert sm.share_similarity(a, a) == pytest.approx(1.0)


def test_matched_agreement_is_invariant_to_expert_permutation():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 8, size=500)
    relabel = rng.permutation(8)
    agreement, perm = sm.matched_agreement(a, relabel[a], 8)
    assert agreement == pytest.approx(1.0)
    np.testing.assert_array_equal(perm, relabel)
    noisy = relabel[a].copy()
    noisy[:100] = rng.integers(0, 8, size=100)
    exact = 1.0 - np.mean(noisy[:100] != relabel[a][:100]) * 100 / 500
    assert sm.matched_agreement(a, noisy, 8)[0] == pytest.approx(exact)
    assert sm.matched_agreement(a, noisy, 8)[0] == pytest.approx(sm.matched_agreement(relabel[a], noisy, 8)[0])


def test_matched_agreement_known_value():
    # co-occurrence [[1, 2], [0, 1]]: identity keeps 1 + 1, the swap 2 + 0 → 2 of 4 tokens
    a = [0, 0, 0, 1]
    b = [0, 1, 1, 1]
    assert sm.matched_agreement(a, b, 2)[0] == pytest.approx(0.5)
    assert sm.cooccurrence(a, b, 2).tolist() == [[1, 2], [0, 1]]


def test_shuffled_agreement_keeps_only_modality_information():
    # router a: images → expert 0, text → expert 1; b is the same partition relabelled: shuffling within
    # a modality changes nothing, so the modality-only baseline is already 1
    mod = np.array([0] * 50 + [1] * 50)
    a = mod.copy()
    assert sm.shuffled_agreement(a, 1 - a, mod, 2) == pytest.approx(1.0)
    # within-modality structure is what shuffling destroys
    a2 = np.array([0, 1] * 25 + [2, 3] * 25)
    assert sm.matched_agreement(a2, a2, 4)[0] == 1.0
    assert sm.shuffled_agreement(a2, a2, mod, 4, seed=3) < 0.8


def test_matched_agreement_finds_the_best_relabelling():
    rng = np.random.default_rng(2)
    for n in range(2, 6):
        a = rng.integers(0, n, size=200)
        perm = rng.permutation(n)
        noisy = np.where(rng.random(200) < 0.8, perm[a], rng.integers(0, n, size=200))
        got, found = sm.matched_agreement(a, noisy, n)
        co = sm.cooccurrence(a, noisy, n)
        best = max(sum(co[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n))) / co.sum()
        assert got == pytest.approx(best)


# ---- CKA ----------------------------------------------------------------------------------------------


def test_cka_of_identical_representations_is_one():
    x = np.random.default_rng(3).normal(size=(64, 10))
    assert sm.linear_cka(x, x) == pytest.approx(1.0)


def test_cka_is_invariant_to_rotation_and_isotropic_scaling_not_to_anisotropic():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(100, 6))
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert sm.linear_cka(x, x @ q) == pytest.approx(1.0)
    assert sm.linear_cka(x, 3.7 * x + 5.0) == pytest.approx(1.0)  # scale and a shift (centring removes it)
    assert sm.linear_cka(x, x * np.array([1, 1, 1, 1, 1, 30.0])) < 0.9


def test_cka_of_orthogonal_representations_is_zero():
    x = np.array([[1.0], [-1.0], [1.0], [-1.0]])
    y = np.array([[1.0], [1.0], [-1.0], [-1.0]])  # centred cross-covariance xᵀy = 0
    assert sm.linear_cka(x, y) == pytest.approx(0.0, abs=1e-12)
    assert sm.linear_cka(x, np.zeros((4, 3))) == 0.0


def test_pairwise_cka_matches_the_pairwise_definition():
    rng = np.random.default_rng(5)
    y = rng.normal(size=(4, 30, 5))
    y[1] = y[0] @ np.linalg.qr(rng.normal(size=(5, 5)))[0]  # expert 1 = a rotation of expert 0
    m = sm.pairwise_cka(y)
    for i, j in itertools.product(range(4), repeat=2):
        assert m[i, j] == pytest.approx(sm.linear_cka(y[i], y[j]), abs=1e-9)
    assert m[0, 1] == pytest.approx(1.0)
    np.testing.assert_allclose(np.diag(m), 1.0)
    assert sm.mean_off_diagonal(np.array([[1, 0.2], [0.4, 1]])) == pytest.approx(0.3)


# ---- derived load target ------------------------------------------------------------------------------


def test_canonical_target_ignores_expert_labels_and_keeps_the_pattern():
    a = np.array([[6, 2, 0, 0], [0, 0, 1, 3]], dtype=float)
    b = a[:, [3, 1, 0, 2]]  # same pattern, other labels
    ta, tb = sm.canonical_target([a]), sm.canonical_target([b])
    np.testing.assert_allclose(ta, tb)
    # image-leaning experts first; floored at 1e-3 and renormalised per modality
    floor = 1e-3
    image = np.array([0.75, 0.25, floor, floor]) / (1 + 2 * floor)
    text = np.array([floor, floor, 0.25, 0.75]) / (1 + 2 * floor)
    np.testing.assert_allclose(ta, [image, text], atol=1e-6)
    np.testing.assert_allclose(np.array(sm.canonical_target([a, b])), ta, atol=1e-6)
    assert all(x > 0 for row in ta for x in row)
