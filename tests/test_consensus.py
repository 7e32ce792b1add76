"""Consensus domains of seed ensembles (spavae.analysis.consensus) against hand computations."""

from itertools import combinations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from spavae.analysis.consensus import (
    align_labels,
    consensus_labels,
    consensus_summary,
    mean_pairwise_ari,
)


def relabel(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same partition under a random renaming of its labels."""
    names = rng.permutation(labels.max() + 1)
    return names[labels]


def test_align_labels_undoes_a_renaming_and_numbers_extra_domains_after_the_reference():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 4, size=200)
    np.testing.assert_array_equal(align_labels(relabel(reference, rng), reference), reference)
    split = reference.copy()
    split[(reference == 2) & (np.arange(200) % 3 == 0)] = 9  # a third of domain 2 split off: unmatched
    aligned = align_labels(split, reference)
    assert set(aligned[split == 9]) == {4}  # the split-off part becomes a new label after 0..3
    np.testing.assert_array_equal(aligned[split != 9], reference[split != 9])


def with_extras(base: np.ndarray, extras: dict[int, np.ndarray]) -> np.ndarray:
    """``base`` with the spots of each ``{label: spots}`` moved to that label."""
    labels = base.copy()
    for label, spots in extras.items():
        labels[spots] = label
    return labels


def test_a_domain_sharing_no_spot_with_the_reference_domain_is_not_matched_to_it():
    base = np.repeat(np.arange(3), 12)
    reference = with_extras(base, {3: np.arange(24, 28)})  # an extra domain cut from domain 2
    other = with_extras(base, {7: np.arange(0, 4)})  # another run's extra domain, cut from domain 0
    aligned = align_labels(other, reference)
    np.testing.assert_array_equal(aligned[4:], base[4:])
    assert set(aligned[:4]) == {4}  # a label of its own: not the reference's extra domain 3 (no spot in common)


def test_disjoint_extra_domains_of_different_runs_stay_apart_and_the_same_extra_domain_is_joined():
    """Two seeds cut an extra domain P out of domain 0, two others an extra domain Q out of domain 1; no run puts
    P and Q together, so the consensus must not either (today's numbering from one offset merged them)."""
    base = np.repeat(np.arange(3), 12)
    p, q = np.arange(0, 4), np.arange(12, 16)
    runs = [base,  # the medoid: no extra domain, so every other run's extra domain is unmatched
            with_extras(base, {7: p, 0: q}), with_extras(base, {7: p, 2: q}),
            with_extras(base, {1: p, 7: q}), with_extras(base, {2: p, 7: q})]
    for run in runs:  # no run puts a spot of P with a spot of Q
        assert not set(run[p]) & set(run[q])
    consensus = consensus_labels(runs)
    assert consensus[0] != consensus[12]
    # P and Q are each found by two seeds, with a plurality of the votes: each its own consensus domain
    assert adjusted_rand_score(with_extras(base, {3: p, 4: q}), consensus) == 1.0


def test_consensus_of_renamed_noisy_copies_recovers_the_labels():
    rng = np.random.default_rng(1)
    truth = np.repeat(np.arange(5), 60)
    copies = []
    for _ in range(7):
        noisy = truth.copy()
        flip = rng.random(len(truth)) < 0.2  # 20% of the spots get a random label in every copy
        noisy[flip] = rng.integers(0, 5, size=flip.sum())
        copies.append(relabel(noisy, rng))
    consensus = consensus_labels(copies)
    assert adjusted_rand_score(truth, consensus) == 1.0
    assert max(adjusted_rand_score(truth, copy) for copy in copies) < 0.8  # each copy alone is far from it
    # the order of the runs does not matter
    assert adjusted_rand_score(consensus, consensus_labels(copies[::-1])) == 1.0


def test_identical_copies_and_a_single_labeling_are_their_own_consensus():
    labels = np.array(["a", "b", "b", "c", "a", "c"])
    consensus = consensus_labels([labels, labels, labels])
    assert adjusted_rand_score(labels, consensus) == 1.0 and consensus.dtype.kind == "i"
    assert adjusted_rand_score(labels, consensus_labels([labels])) == 1.0
    assert mean_pairwise_ari([labels]) == 1.0


def test_mean_pairwise_ari_equals_the_hand_computation():
    runs = [np.array([0, 0, 1, 1, 2, 2]), np.array([1, 1, 0, 0, 2, 2]), np.array([0, 1, 1, 1, 2, 0])]
    by_hand = np.mean([adjusted_rand_score(a, b) for a, b in combinations(runs, 2)])
    assert mean_pairwise_ari(runs) == pytest.approx(by_hand)
    assert mean_pairwise_ari(runs[:2]) == 1.0  # a renaming agrees perfectly


def test_summary_scores_the_consensus_and_the_runs_against_the_truth_leaving_out_na():
    truth = np.array(["L1"] * 4 + ["L2"] * 4 + ["NA"] * 2)
    runs = [np.array([0, 0, 0, 0, 1, 1, 1, 1, 0, 1]), np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1]),
            np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, 0])]
    summary = consensus_summary(runs, truth)
    scored = truth != "NA"
    expected = [adjusted_rand_score(truth[scored], run[scored]) for run in runs]
    assert summary["run_ari"] == pytest.approx(expected)
    assert summary["mean_ari"] == pytest.approx(np.mean(expected))
    assert summary["consensus_ari"] == 1.0 > summary["mean_ari"]
    assert summary["n_runs"] == 3 and summary["n_domains"] == 2


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="same spots"):
        consensus_labels([np.zeros(3, int), np.zeros(4, int)])
    with pytest.raises(ValueError, match="at least one"):
        consensus_labels([])
