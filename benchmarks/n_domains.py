"""How many domains? Criteria for choosing k from the latent alone, scored against the reference k of each section.

Usage: python benchmarks/n_domains.py LATENTS_DIR [--k-min 3] [--k-max 12] [--out FILE.jsonl]

``LATENTS_DIR`` holds the ``<case>_seed<seed>.npz`` files that ``benchmarks/panel.py --latents`` writes (each run's
latent, labels and coordinates). For every file and every k in the range the latent is clustered by KMeans (10
restarts, the run's seed) and each criterion picks its k:

* ``silhouette``: the largest mean silhouette (what ``spavae run`` uses today);
* ``calinski_harabasz``: the largest Calinski-Harabasz index;
* ``davies_bouldin``: the smallest Davies-Bouldin index;
* ``bic``: the smallest BIC of a diagonal Gaussian mixture started from the KMeans centres;
* ``stability``: the largest k whose clustering is reproduced by KMeans on random halves of the spots (mean ARI
  on the spots of each half against the full-data labels, 5 halves) within 0.02 of the best reproduction over the
  range; ties broken toward more domains, since a sub-cluster that every half reproduces is a real one;
* ``gap``: Tibshirani's gap statistic (10 uniform references in the box of the latent's principal axes), the
  smallest k with gap(k) >= gap(k+1) - s(k+1).

One JSON line per file and criterion (chosen k, reference k, ARI of the chosen k), then one summary line per
criterion: on how many sections (their majority over seeds) the chosen k is within 1 of the reference. A constant
guess is reported beside them (the k within 1 of the most references), so that a criterion is credited only for
what it does better than not looking at the data.
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

SAMPLE = 5000
STABILITY_TOLERANCE = 0.02


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


def criteria_table(latent: np.ndarray, ks: list[int], seed: int) -> pd.DataFrame:
    rows = []
    sample = SAMPLE if len(latent) > SAMPLE else None
    for k in ks:
        labels, centres = kmeans(latent, k, seed)
        mixture = GaussianMixture(k, covariance_type="diag", means_init=centres, random_state=seed).fit(latent)
        rows.append({"k": k, "labels": labels,
                     "silhouette": silhouette_score(latent, labels, sample_size=sample, random_state=seed),
                     "calinski_harabasz": calinski_harabasz_score(latent, labels),
                     "davies_bouldin": davies_bouldin_score(latent, labels), "bic": mixture.bic(latent),
                     "stability": stability(latent, labels, k, seed)})
    return pd.DataFrame(rows).set_index("k")


def choices(table: pd.DataFrame, gaps: pd.DataFrame) -> dict[str, int]:
    out = {"silhouette": int(table["silhouette"].idxmax()),
           "calinski_harabasz": int(table["calinski_harabasz"].idxmax()),
           "davies_bouldin": int(table["davies_bouldin"].idxmin()), "bic": int(table["bic"].idxmin())}
    best = table["stability"].max()
    out["stability"] = int(max(k for k in table.index if table.loc[k, "stability"] >= best - STABILITY_TOLERANCE))
    ks = list(gaps.index)
    out["gap"] = next((k for k, after in zip(ks, ks[1:])
                       if gaps.loc[k, "gap"] >= gaps.loc[after, "gap"] - gaps.loc[after, "s"]), ks[-1])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("latents", type=Path)
    parser.add_argument("--k-min", type=int, default=3)
    parser.add_argument("--k-max", type=int, default=12)
    args = parser.parse_args()
    ks = list(range(args.k_min, args.k_max + 1))
    rows = []
    for path in sorted(args.latents.glob("*_seed*.npz")):
        case, seed = re.fullmatch(r"(.+)_seed(\d+)", path.stem).groups()
        seed = int(seed)
        data = np.load(path, allow_pickle=False)
        latent, truth = data["latent"].astype(np.float64), data["truth"]
        labelled = truth != "NA"
        reference = len(np.unique(truth[labelled]))
        table = criteria_table(latent, ks, seed)
        picked = choices(table, gap_table(latent, ks, seed))
        for criterion, k in picked.items():
            ari = adjusted_rand_score(truth[labelled], table.loc[k, "labels"][labelled])
            row = {"case": case, "seed": seed, "criterion": criterion, "k": k, "k_reference": reference,
                   "within_1": abs(k - reference) <= 1, "ari": round(float(ari), 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    frame = pd.DataFrame(rows)
    references = frame.groupby("case")["k_reference"].first()
    for criterion, group in frame.groupby("criterion"):
        per_case = group.groupby("case")["within_1"].mean()
        print(json.dumps({"summary": True, "criterion": criterion, "sections": len(per_case),
                          "sections_within_1": int((per_case > 0.5).sum()),
                          "runs_within_1": f"{int(group['within_1'].sum())}/{len(group)}",
                          "mean_ari": round(float(group["ari"].mean()), 4)}), flush=True)
    hits = Counter({k: int((abs(references - k) <= 1).sum()) for k in ks})
    constant, count = hits.most_common(1)[0]
    print(json.dumps({"summary": True, "criterion": f"constant_{constant}", "sections": len(references),
                      "sections_within_1": count}), flush=True)


if __name__ == "__main__":
    main()
