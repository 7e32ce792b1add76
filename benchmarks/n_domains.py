"""How many domains? Criteria for choosing k from the latent alone, scored against the reference k of each section.

Usage: python benchmarks/n_domains.py LATENTS_DIR [--k-min 3] [--k-max 12] [--criteria NAME ...] [--leiden-sweep]

``LATENTS_DIR`` holds the ``<case>_seed<seed>.npz`` files that ``benchmarks/panel.py --latents`` writes (each run's
latent, labels and coordinates). For every file and every k in the range the latent is clustered by KMeans (10
restarts, the run's seed) and each criterion picks its k:

* ``leiden``: the number of Leiden communities of the latent's 20-NN graph at resolution 0.3, brought into the
  range (the rule of :func:`spavae.analysis.choose_n_domains`, what ``spavae run`` uses);
* ``silhouette``: the largest mean silhouette (what ``spavae run`` used before the Leiden count);
* ``calinski_harabasz``: the largest Calinski-Harabasz index;
* ``davies_bouldin``: the smallest Davies-Bouldin index;
* ``bic``: the smallest BIC of a diagonal Gaussian mixture started from the KMeans centres;
* ``stability``: the largest k whose clustering is reproduced by KMeans on random halves of the spots (mean ARI
  on the spots of each half against the full-data labels, 5 halves) within 0.02 of the best reproduction over the
  range; ties broken toward more domains, since a sub-cluster that every half reproduces is a real one;
* ``gap``: Tibshirani's gap statistic (10 uniform references in the box of the latent's principal axes), the
  smallest k with gap(k) >= gap(k+1) - s(k+1).

One JSON line per file and criterion (chosen k, reference k, ARI of the chosen k), then one summary line per
criterion: on how many sections (their majority over seeds) the chosen k is within 1 of the reference.
``--criteria`` computes only the named ones (``gap`` and ``stability`` are the slow ones). ``--leiden-sweep`` also
writes, per file, the Leiden count of every resolution of ``SWEEP_RESOLUTIONS`` and n_neighbors of
``SWEEP_NEIGHBOURS``, and a summary per pair: how sensitive the count is to the two settings. The simulator's files
(``sim_*``, a planted k) are scored like the others; the section counts of the summaries are over the labelled
sections, with the simulator's runs beside them. A constant guess is reported beside them (the k within 1 of the
most references), so that a criterion is credited only for what it does better than not looking at the data.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, calinski_harabasz_score, davies_bouldin_score, silhouette_score
from sklearn.mixture import GaussianMixture

from spavae.analysis.domains import count_leiden_communities, nearest_candidate

SAMPLE = 5000
STABILITY_TOLERANCE = 0.02
CRITERIA = ("leiden", "silhouette", "calinski_harabasz", "davies_bouldin", "bic", "stability", "gap")
SWEEP_RESOLUTIONS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 1.0)
SWEEP_NEIGHBOURS = (10, 20, 30)


def kmeans(latent: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    model = KMeans(k, n_init=10, random_state=seed).fit(latent)
    return model.labels_, model.cluster_centers_


def stability(latent: np.ndarray, labels: np.ndarray, k: int, seed: int, repeats: int = 5) -> float:
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(repeats):
        half = rng.choice(len(latent), len(latent) // 2, replace=False)
        scores.append(adjusted_rand_score(labels[half], kmeans(latent[half], k, seed)[0]))
    return float(np.mean(scores))


def gap_table(latent: np.ndarray, ks: list[int], seed: int, references: int = 10) -> pd.DataFrame:
    centred = latent - latent.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    rotated = centred @ vt.T
    low, high = rotated.min(0), rotated.max(0)
    rng = np.random.default_rng(seed)
    boxes = [rng.uniform(low, high, size=rotated.shape) for _ in range(references)]
    rows = []
    for k in ks:
        observed = np.log(KMeans(k, n_init=3, random_state=seed).fit(rotated).inertia_)
        reference = np.log([KMeans(k, n_init=3, random_state=seed).fit(box).inertia_ for box in boxes])
        rows.append({"k": k, "gap": reference.mean() - observed,
                     "s": reference.std() * np.sqrt(1 + 1 / references)})
    return pd.DataFrame(rows).set_index("k")


def criteria_table(latent: np.ndarray, ks: list[int], seed: int, criteria: set[str]) -> pd.DataFrame:
    """KMeans labels of every k and the per-k scores the asked criteria need."""
    sample = SAMPLE if len(latent) > SAMPLE else None
    scores = {"silhouette": lambda labels, centres, k: silhouette_score(latent, labels, sample_size=sample,
                                                                          random_state=seed),
              "calinski_harabasz": lambda labels, centres, k: calinski_harabasz_score(latent, labels),
              "davies_bouldin": lambda labels, centres, k: davies_bouldin_score(latent, labels),
              "bic": lambda labels, centres, k: GaussianMixture(k, covariance_type="diag", means_init=centres,
                                                                random_state=seed).fit(latent).bic(latent),
              "stability": lambda labels, centres, k: stability(latent, labels, k, seed)}
    rows = []
    for k in ks:
        labels, centres = kmeans(latent, k, seed)
        rows.append({"k": k, "labels": labels} | {name: score(labels, centres, k) for name, score in scores.items()
                                                   if name in criteria})
    return pd.DataFrame(rows).set_index("k")


def choices(table: pd.DataFrame, latent: np.ndarray, seed: int, criteria: set[str]) -> dict[str, int]:
    ks = list(table.index)
    out = {}
    if "leiden" in criteria:
        # choose_n_domains' rule, without the KMeans table it would compute again
        out["leiden"] = nearest_candidate(count_leiden_communities(latent, seed=seed), ks)
    for name in ("silhouette", "calinski_harabasz"):
        if name in criteria:
            out[name] = int(table[name].idxmax())
    for name in ("davies_bouldin", "bic"):
        if name in criteria:
            out[name] = int(table[name].idxmin())
    if "stability" in criteria:
        best = table["stability"].max()
        out["stability"] = int(max(k for k in ks if table.loc[k, "stability"] >= best - STABILITY_TOLERANCE))
    if "gap" in criteria:
        gaps = gap_table(latent, ks, seed)
        out["gap"] = next((k for k, after in zip(ks, ks[1:])
                           if gaps.loc[k, "gap"] >= gaps.loc[after, "gap"] - gaps.loc[after, "s"]), ks[-1])
    return out


def summary_line(frame: pd.DataFrame, **fields) -> dict:
    """On how many sections (the majority of their seeds) the k is within 1 of the reference, and the mean ARI."""
    per_case = frame.groupby("case")["within_1"].mean()
    line = {"summary": True, **fields, "sections": len(per_case), "sections_within_1": int((per_case > 0.5).sum()),
            "runs_within_1": f"{int(frame['within_1'].sum())}/{len(frame)}"}
    if "ari" in frame:
        line["mean_ari"] = round(float(frame["ari"].mean()), 4)
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("latents", type=Path)
    parser.add_argument("--k-min", type=int, default=3)
    parser.add_argument("--k-max", type=int, default=12)
    parser.add_argument("--criteria", nargs="+", choices=CRITERIA, default=list(CRITERIA))
    parser.add_argument("--leiden-sweep", action="store_true",
                        help="the Leiden count at every resolution and n_neighbors of the sweep")
    args = parser.parse_args()
    ks = list(range(args.k_min, args.k_max + 1))
    criteria = set(args.criteria)
    rows, sweep = [], []
    for path in sorted(args.latents.glob("*_seed*.npz")):
        case, seed = re.fullmatch(r"(.+)_seed(\d+)", path.stem).groups()
        seed = int(seed)
        data = np.load(path, allow_pickle=False)
        latent, truth = data["latent"].astype(np.float64), data["truth"]
        labelled = truth != "NA"
        reference = len(np.unique(truth[labelled]))
        table = criteria_table(latent, ks, seed, criteria)
        for criterion, k in choices(table, latent, seed, criteria).items():
            ari = adjusted_rand_score(truth[labelled], table.loc[k, "labels"][labelled])
            row = {"case": case, "seed": seed, "criterion": criterion, "k": k, "k_reference": reference,
                   "within_1": abs(k - reference) <= 1, "ari": round(float(ari), 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        if args.leiden_sweep:
            for n_neighbors in SWEEP_NEIGHBOURS:
                for resolution in SWEEP_RESOLUTIONS:
                    k = count_leiden_communities(latent, resolution=resolution, n_neighbors=n_neighbors, seed=seed)
                    row = {"case": case, "seed": seed, "sweep": "leiden", "n_neighbors": n_neighbors,
                           "resolution": resolution, "k": k, "k_reference": reference,
                           "within_1": abs(k - reference) <= 1}
                    sweep.append(row)
                    print(json.dumps(row), flush=True)
    frame = pd.DataFrame(rows)
    simulated = frame["case"].str.startswith("sim_")
    for criterion, group in frame[~simulated].groupby("criterion"):
        sims = frame[simulated & (frame["criterion"] == criterion)]
        print(json.dumps(summary_line(group, criterion=criterion) | {
            "simulator_runs_within_1": f"{int(sims['within_1'].sum())}/{len(sims)}"}), flush=True)
    references = frame[~simulated].groupby("case")["k_reference"].first()
    hits = Counter({k: int((abs(references - k) <= 1).sum()) for k in ks})
    constant, count = hits.most_common(1)[0]
    print(json.dumps({"summary": True, "criterion": f"constant_{constant}", "sections": len(references),
                      "sections_within_1": count}), flush=True)
    if sweep:
        sweep_frame = pd.DataFrame(sweep)
        sweep_frame = sweep_frame[~sweep_frame["case"].str.startswith("sim_")]
        for (n_neighbors, resolution), group in sweep_frame.groupby(["n_neighbors", "resolution"]):
            print(json.dumps(summary_line(group, sweep="leiden", n_neighbors=int(n_neighbors),
                                          resolution=float(resolution))), flush=True)


if __name__ == "__main__":
    main()
