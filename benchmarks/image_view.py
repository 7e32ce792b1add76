"""Does the image view help? Domains with and without the tissue image, under one protocol.

Usage: python benchmarks/image_view.py [--cases sim dlpfc_151507 dlpfc_151510] [--seeds 3] [--images none lowres]
       [--weights 1.0] [--threads 1] [--figures DIR]

Cases:

* ``sim``: :func:`spavae.image.simulate_image_domain_section` (24 x 24 spots, 100 genes, 5 domains; domain 2 has
  the expression of domain 1 and only its stain tells it apart), a new section per seed;
* ``dlpfc_<section>``: the shared DLPFC sections (``../shared/data/dlpfc``: ``sample_<section>.h5`` with its
  ``spatial/<section>`` folder attached by barcode, :func:`spavae.image.add_spaceranger_image`; the 600 px H&E
  thumbnail, about 4 px per spot).

For each case, seed, image (``none``: the model without the image view; ``lowres``/``hires``: ``SpaVAE(adata,
image=...)``) and weight: ``SpaVAE(adata, seed=seed, image=..., image_weight=...)`` with every other setting at
its default, trained, the latent clustered by KMeans with k = the number of labelled domains, ARI and NMI on the
labelled spots, and ``ari_refined`` of those domains after the hexagonal neighbour-majority refinement of
``spavae run``. For ``sim`` also ``ari_hidden_pair`` (and ``ari_hidden_pair_refined``): the ARI between truth and
domains on the spots of the hidden domain and its expression twin only (about 0 when the two are not told apart, 1
when they are), and the ARI of KMeans on the image features alone. One JSON line per run, then one summary line per case, image and
weight. ``--figures DIR`` also draws each seed-0 run's domains (KMeans, then the hexagonal neighbour-majority
refinement of ``spavae run``) over the section's thumbnail, ``DIR/<case>_<image>[_w<weight>].png``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import spavae
from spavae.analysis import cluster_domains, cluster_kmeans, score_clustering, visium_array_to_xy
from spavae.data import filter_empty
from spavae.image import add_spaceranger_image, extract_image_features, simulate_image_domain_section
from spavae.plot import plot_domains_on_image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "dlpfc"


def load_case(name: str, seed: int):
    """``(adata, truth labels with 'NA' unlabelled)``."""
    if name == "sim":
        adata = simulate_image_domain_section(seed=seed)
        return adata, adata.obs["ground_truth"].astype(str)
    section = name.removeprefix("dlpfc_")
    adata = filter_empty(spavae.read_spavae_h5(str(SHARED / f"sample_{section}.h5")))
    add_spaceranger_image(adata, SHARED / "spatial" / section)
    return adata, adata.obs["ground_truth"].astype(str)


def run(name: str, seed: int, image: str, weight: float, figures: Path | None = None) -> dict:
    adata, truth = load_case(name, seed)
    n_domains = int(truth[truth != "NA"].nunique())
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # masked-spot counts are reported below
        model = spavae.SpaVAE(adata, seed=seed, image=None if image == "none" else image, image_weight=weight)
    setup_seconds = time.perf_counter() - start
    model.train(progress=False)
    seconds = time.perf_counter() - start
    latent = model.get_latent_representation()
    labels = cluster_kmeans(latent, n_domains, seed=seed)
    refined = refined_domains(adata, latent, n_domains, seed)
    if figures is not None and seed == 0:
        draw(adata, refined, figures / f"{name}_{image}{'' if image == 'none' else f'_w{weight:g}'}.png",
             f"{name}, {'counts only' if image == 'none' else f'with the {image} image (weight {weight:g})'}")
    labelled = (truth != "NA").to_numpy()
    scores = score_clustering(truth[labelled], labels[labelled])
    refined_ari = score_clustering(truth[labelled], refined[labelled])["ari"]
    row = {"case": name, "seed": seed, "image": image, "image_weight": weight if image != "none" else None,
           "n_spots": adata.n_obs, "k": n_domains, "ari": round(scores["ari"], 4), "nmi": round(scores["nmi"], 4),
           "ari_refined": round(refined_ari, 4),
           "epochs": len(model.history), "seconds": round(seconds, 1), "setup_seconds": round(setup_seconds, 2)}
    if model.data.image_features is not None:
        row["image_spots_masked"] = int(np.isnan(model.data.image_features).any(1).sum())
    if name == "sim":
        simulation = adata.uns["simulation"]
        pair = truth.isin([f"domain{simulation['hidden_domain']}", f"domain{simulation['partner_domain']}"]).to_numpy()
        row["ari_hidden_pair"] = round(score_clustering(truth[pair], labels[pair])["ari"], 4)
        row["ari_hidden_pair_refined"] = round(score_clustering(truth[pair], refined[pair])["ari"], 4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            features = extract_image_features(adata, "lowres").values
        row["ari_image_features_only"] = round(score_clustering(truth, cluster_kmeans(features, n_domains,
                                                                                      seed=seed))["ari"], 4)
    return row


def pixels_of(adata) -> np.ndarray:
    """Full-resolution pixel positions of the spots."""
    return np.asarray(adata.obsm["spatial_fullres" if "spatial_fullres" in adata.obsm else "spatial"])[:, :2]


def refined_domains(adata, latent: np.ndarray, n_domains: int, seed: int) -> np.ndarray:
    """KMeans domains refined by hexagonal neighbour majority, as ``spavae run`` gives them."""
    lattice = visium_array_to_xy(adata.obsm["spatial"]) if "spatial_fullres" in adata.obsm else pixels_of(adata)
    return cluster_domains(latent, lattice, n_domains, refine="hexagon", seed=seed).refined


def draw(adata, domains: np.ndarray, path: Path, title: str) -> None:
    """Domains over the section's lowres thumbnail."""
    library = next(iter(adata.uns["spatial"].values()))
    factors = library["scalefactors"]
    scale = factors["tissue_lowres_scalef"]
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_domains_on_image(library["images"]["lowres"], pixels_of(adata) * scale, domains, path,
                          spot_diameter_px=factors["spot_diameter_fullres"] * scale, title=title)


def summarize(rows: list[dict]) -> list[dict]:
    frame = pd.DataFrame(rows)
    frame["image_weight"] = frame["image_weight"].fillna(0.0)
    out = []
    for (case, image, weight), group in frame.groupby(["case", "image", "image_weight"], sort=False):
        line = {"summary": True, "case": case, "image": image, "image_weight": weight or None, "seeds": len(group),
                "ari": round(float(group["ari"].mean()), 4), "ari_sd": round(float(group["ari"].std(ddof=1)), 4)
                if len(group) > 1 else 0.0, "seconds": round(float(group["seconds"].mean()), 1)}
        for key in ("ari_refined", "ari_hidden_pair", "ari_hidden_pair_refined"):
            if key in group and group[key].notna().all():
                line[key] = round(float(group[key].mean()), 4)
        out.append(line)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["sim", "dlpfc_151507", "dlpfc_151510"])
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument("--images", nargs="+", default=["none", "lowres"],
                        help="'none' (no image view) and/or image keys ('lowres', 'hires', 'auto')")
    parser.add_argument("--weights", nargs="+", type=float, default=[1.0], help="image_weight values")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--figures", type=Path, help="folder for the seed-0 domains over the thumbnail")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.cases:
        for seed in range(args.seeds):
            for image in args.images:
                for weight in ([1.0] if image == "none" else args.weights):
                    row = run(name, seed, image, weight, args.figures) | {"threads": args.threads, "spavae": spavae.__version__}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    for line in summarize(rows):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
