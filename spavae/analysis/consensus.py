"""Consensus domains of a seed ensemble: Hungarian label alignment and a majority vote.

Several trainings that differ only in their seed give several domain labelings of the same spots. Their domain
*numbers* are arbitrary (domain 3 of seed 0 may be domain 1 of seed 1), so the labelings are first aligned to a
reference with the Hungarian algorithm on their contingency table (the matching that keeps the most spots in
agreement; a pair of domains without a spot in common is never a match), then every spot takes the label most runs
give it. The consensus becomes the new reference and the two steps repeat until the labels stop changing.

A domain that matches no reference domain (a run found more domains, or found one where the reference has none) is
matched, the same way, to the extra domains of the runs aligned before it: the same extra domain found by several
seeds gets one label, and extra domains that share no spot keep labels of their own, so unrelated domains of
different seeds never add up their votes.

Why alignment and a vote rather than a co-association matrix: a co-association matrix holds, for every pair of
spots, the share of runs that put them in one domain, which is N x N (80 GB in float64 for 100,000 spots).
Alignment only needs one R x K x K contingency table per round and an N x K vote count: memory O(N K), time
O(N R) per round. It assumes the runs find roughly the same domains (true for seeds of one configuration, which
is the use here); for labelings with very different numbers of domains a co-association method is better suited.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score

from spavae.analysis.clustering import score_clustering


def _codes(labels) -> np.ndarray:
    """Labels as integer codes 0..K-1 (any hashable labels)."""
    return np.unique(np.asarray(labels), return_inverse=True)[1].ravel()


def _check(labelings: Sequence) -> list[np.ndarray]:
    runs = [_codes(labels) for labels in labelings]
    if not runs:
        raise ValueError("give at least one labeling")
    sizes = {len(run) for run in runs}
    if len(sizes) != 1:
        raise ValueError(f"every labeling must label the same spots; got lengths {sorted(sizes)}")
    if sizes == {0}:
        raise ValueError("the labelings are empty")
    return runs


def align_labels(labels, reference) -> np.ndarray:
    """``labels`` renumbered to agree with ``reference`` as much as possible (Hungarian matching).

    Each domain of ``labels`` is matched to at most one domain of ``reference`` so that the number of spots with
    the same label in both is largest; a domain that shares no spot with the reference domain the matching would
    give it stays unmatched. Unmatched domains (also when ``labels`` has more domains) get new numbers from
    ``reference.max() + 1`` on.

    Parameters
    ----------
    labels
        One label per spot (any hashable values).
    reference
        Integer labels ``0..K-1`` of the same spots.

    Returns
    -------
    Integer labels of ``labels`` in the numbering of ``reference``.
    """
    codes, reference = _codes(labels), np.asarray(reference, dtype=np.int64).ravel()
    if len(codes) != len(reference):
        raise ValueError(f"{len(codes)} labels for {len(reference)} reference labels")
    return _align([codes], reference)[0]


def _matching(codes: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The target label of each domain of ``codes`` (-1: none) by Hungarian matching on the contingency table.

    Spots whose ``target`` is negative are left out; a pair of domains without a spot in common is no match.
    """
    mapping = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
    counted = target >= 0
    if not counted.any():
        return mapping
    table = np.zeros((len(mapping), int(target.max()) + 1), dtype=np.int64)
    np.add.at(table, (codes[counted], target[counted]), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    shared = table[rows, cols] > 0
    mapping[rows[shared]] = cols[shared]
    return mapping


def _align(runs: list[np.ndarray], reference: np.ndarray) -> list[np.ndarray]:
    """Every run (integer codes) in the numbering of ``reference``; unmatched domains are matched to the extra
    domains of the runs before them (each spot keeps the label of the first extra domain that held it) or get a
    new label, from ``reference.max() + 1`` on (see the module)."""
    extra = np.full(len(reference), -1, dtype=np.int64)
    next_label = int(reference.max()) + 1
    aligned = []
    for codes in runs:
        mapping = _matching(codes, reference)
        unmatched = mapping[codes] < 0
        mapping = np.where(mapping < 0, _matching(codes, np.where(unmatched, extra, -1)), mapping)
        for domain in np.flatnonzero(mapping < 0):
            mapping[domain] = next_label
            extra[(codes == domain) & (extra < 0)] = next_label
            next_label += 1
        aligned.append(mapping[codes])
    return aligned


def _vote(aligned: list[np.ndarray], reference: np.ndarray) -> np.ndarray:
    """Majority label per spot; a tie goes to the reference label (then to the smallest label)."""
    n_labels = max(int(run.max()) for run in aligned) + 1
    votes = np.zeros((len(reference), n_labels), dtype=np.float64)
    spots = np.arange(len(reference))
    for run in aligned:
        np.add.at(votes, (spots, run), 1.0)
    votes[spots, reference] += 0.5  # breaks ties only: the counts are whole numbers
    return votes.argmax(1)


def mean_pairwise_ari(labelings: Sequence) -> float:
    """Between-run agreement: the mean adjusted Rand index over all pairs of labelings (1.0 for one labeling)."""
    runs = _check(labelings)
    if len(runs) == 1:
        return 1.0
    return float(np.mean([adjusted_rand_score(a, b) for a, b in combinations(runs, 2)]))


def consensus_labels(labelings: Sequence, *, max_iter: int = 10) -> np.ndarray:
    """Consensus domains of several labelings of the same spots (alignment + majority vote, see the module).

    The first reference is the medoid labeling (the highest mean ARI to the others), so the result does not
    depend on the order of the runs except through ties and, for an extra domain that several runs find with
    different spots, through which of them found it first (its spots are matched against the later runs').

    Parameters
    ----------
    labelings
        R label arrays, one label per spot each, same spots in the same order.
    max_iter
        Rounds of align-then-vote at most; it stops earlier when the consensus no longer changes.

    Returns
    -------
    Integer consensus labels ``0..K-1`` (renumbered to be consecutive).
    """
    runs = _check(labelings)
    if len(runs) == 1:
        return runs[0]
    ari = np.eye(len(runs))
    for i, j in combinations(range(len(runs)), 2):
        ari[i, j] = ari[j, i] = adjusted_rand_score(runs[i], runs[j])
    reference = runs[int(ari.mean(1).argmax())]
    for _ in range(max_iter):
        consensus = _vote(_align(runs, reference), reference)
        if np.array_equal(consensus, reference):
            break
        reference = consensus
    return _codes(consensus)


def consensus_summary(labelings: Sequence, truth=None, *, unlabeled: str = "NA") -> dict:
    """Consensus labels, between-run agreement and, with ground truth, the consensus ARI against the runs' mean.

    Parameters
    ----------
    labelings
        R label arrays of the same spots (e.g. the domains of one configuration trained with R seeds).
    truth
        Optional ground-truth label per spot; ``unlabeled`` spots are not scored.
    unlabeled
        Label of unannotated spots in ``truth``.

    Returns
    -------
    ``{'labels', 'n_runs', 'n_domains', 'seed_agreement_ari'}`` and, with ``truth``, ``'consensus_ari'``,
    ``'consensus_nmi'``, ``'mean_ari'``, ``'sd_ari'`` and ``'run_ari'`` (one per labeling).
    """
    labels = consensus_labels(labelings)
    summary = {"labels": labels, "n_runs": len(labelings), "n_domains": int(labels.max()) + 1,
               "seed_agreement_ari": mean_pairwise_ari(labelings)}
    if truth is not None:
        scores = [score_clustering(truth, run, unlabeled=unlabeled)["ari"] for run in labelings]
        consensus = score_clustering(truth, labels, unlabeled=unlabeled)
        summary |= {"consensus_ari": consensus["ari"], "consensus_nmi": consensus["nmi"],
                    "mean_ari": float(np.mean(scores)),
                    "sd_ari": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0, "run_ari": scores}
    return summary
