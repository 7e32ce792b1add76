"""The development panel: spavae's defaults against a smoothed-PCA baseline on every kind of section we have.

Usage: python benchmarks/panel.py [--seeds 3] [--threads T] [--cases NAME ...] [--panel DIR] [--dlpfc DIR]
       [--set KEY=VALUE ...] [--init KEY=VALUE ...] [--latents DIR] [--summarize FILE.jsonl]

Cases (``--cases`` picks some by name, ``--list`` prints them):

* ``sim_200``, ``sim_500``, ``sim_4000``: the simulator (:func:`spavae.data.simulate.simulate_many_genes_section`,
  10,000 genes of which 300 carry 5 domains, domain log fold change 1.5), a new section per seed;
* every labelled section of ``../shared/data/panel/`` (``obs['label']``, NaN unlabelled; ``obsm['spatial']``);
* the two DLPFC sections of ``../shared/data/dlpfc/`` (spaVAE ``.h5`` layout, ``NA`` unlabelled).

One protocol for both methods. spavae: ``spavae.SpaVAE(adata, seed=seed)`` with its defaults (``--init`` adds
model options, ``--set`` ``train`` options), trained, its latent clustered by KMeans with k = the number of
label classes, ARI/NMI on the labelled spots. Then, as ``spavae run`` does without ``--n-domains``, the number of
domains is chosen from the latent alone (:func:`spavae.analysis.domains.choose_n_domains`) and the ARI of those
domains is reported beside the k-given one. Baseline: PCA (10 components, on 2,000 highly variable genes when
there are more) of the normalised expression averaged over each spot and its 6 nearest neighbours, KMeans with
the same k and seed. Sections are passed through :func:`spavae.data.filter_empty` first (as the README advises);
a refusal is recorded as a line with ``error`` instead of stopping the panel.

Prints one JSON line per case and seed, then one summary line per case (``"summary": true``: spavae mean and SD,
baseline mean, difference, seconds, how often the chosen k is within 1 of the reference), then a Markdown table.
``--summarize FILE`` prints the summary lines and table of an earlier run's per-seed lines without training.
``--latents DIR`` also saves each run's latent, labels and coordinates (``DIR/<case>_seed<seed>.npz``), so that
criteria on the latent (e.g. the number of domains) can be compared without training again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

import spavae
from spavae.analysis import cluster_kmeans, score_clustering, visium_array_to_xy
from spavae.analysis.domains import choose_n_domains
from spavae.analysis.latent_activity import active_dimensions, count_active
from spavae.data import filter_empty
from spavae.data.simulate import simulate_many_genes_section

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package: the baseline by path
from dlpfc import baseline_ari, key_values  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SIM_SIZES = (200, 500, 4000)


def panel_section(path: Path) -> tuple[ad.AnnData, np.ndarray]:
    """A panel ``.h5ad`` with its labels as ``obs['ground_truth']`` (``NA`` unlabelled) and its coordinates."""
    adata = ad.read_h5ad(path)
    adata.obs["ground_truth"] = adata.obs["label"].astype(object).where(adata.obs["label"].notna(), "NA").astype(str)
    adata = filter_empty(adata)
    return adata, np.asarray(adata.obsm["spatial"], dtype=float)


def dlpfc_section(path: Path) -> tuple[ad.AnnData, np.ndarray]:
    adata = filter_empty(spavae.read_spavae_h5(str(path)))
    return adata, visium_array_to_xy(adata.obsm["spatial"])


def case_names(panel: Path, dlpfc: Path) -> dict[str, tuple]:
    """Every case: name -> (kind, argument)."""
    names = {f"sim_{n}": ("sim", n) for n in SIM_SIZES}
    names |= {path.stem: ("panel", path) for path in sorted(panel.glob("*.h5ad"))}
    names |= {path.stem.replace("sample_", "dlpfc_"): ("dlpfc", path) for path in sorted(dlpfc.glob("sample_*.h5"))}
    return names


def load_case(kind: str, argument, seed: int) -> tuple[ad.AnnData, np.ndarray]:
    if kind == "sim":
        adata = filter_empty(simulate_many_genes_section(argument, 10_000, n_domain_genes=300, domain_lfc=1.5,
                                                         seed=seed))
        return adata, np.asarray(adata.obsm["spatial"], dtype=float)
    return panel_section(argument) if kind == "panel" else dlpfc_section(argument)


def run_case(name: str, kind: str, argument, seed: int, model_options: dict, train_options: dict,
             latents: Path | None = None) -> dict:
    adata, lattice = load_case(kind, argument, seed)
    truth = adata.obs["ground_truth"].astype(str)
    n_domains = int(truth[truth != "NA"].nunique())
    row = {"case": name, "seed": seed, "n_spots": adata.n_obs, "n_genes": adata.n_vars, "k": n_domains}
    start = time.perf_counter()
    try:
        model = spavae.SpaVAE(adata, seed=seed, **model_options).train(progress=False, **train_options)
    except (ValueError, RuntimeError) as error:  # a refusal is a result of the panel, not the end of it
        row |= {"error": f"{type(error).__name__}: {str(error).splitlines()[0]}"}
        row["baseline_ari"] = round(baseline_ari(adata, n_domains, lattice, seed), 4)
        return row
    seconds = time.perf_counter() - start
    latent = model.get_latent_representation()
    if latents is not None:
        latents.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(latents / f"{name}_seed{seed}.npz", latent=latent, lattice=lattice,
                            truth=truth.to_numpy().astype(str), obs_names=np.asarray(adata.obs_names, dtype=str))
    scores = score_clustering(truth, cluster_kmeans(latent, n_domains, seed=seed))
    chosen, _ = choose_n_domains(latent, lattice, seed=seed)
    own = score_clustering(truth, cluster_kmeans(latent, chosen, seed=seed))
    scale = model.module.gp.kernel_scale
    best = model.history.loc[model.history["val_loss"].idxmin()] if "val_loss" in model.history else None
    held_out = None if best is None else \
        round(float(best[["val_nb", "val_kl_gp", "val_kl_gauss", "val_kl_other"]].sum()), 3)
    active = count_active(active_dimensions(latent), model.module.n_gp)
    row |= {"model_genes": model.setup.n_genes, "input_axes": None if model.setup.input_axes is None else
            model.setup.n_gene_input, "inducing_points": len(model.setup.inducing_points),
            "kernel_scale": None if scale is None else round(scale, 3),
            "active_gp": active["gp"], "active_gaussian": active["gaussian"],
            "held_out_negative_elbo": held_out, "epochs": len(model.history), "seconds": round(seconds, 1),
            "stop_reason": model.trainer.state.stop_reason, "ari": round(scores["ari"], 4),
            "nmi": round(scores["nmi"], 4), "k_chosen": chosen, "ari_chosen_k": round(own["ari"], 4),
            "baseline_ari": round(baseline_ari(adata, n_domains, lattice, seed), 4),
            "model_options": model_options, "train_options": train_options}
    return row


def summarize(rows: list[dict]) -> list[dict]:
    """One summary per case: spavae mean and SD, baseline, difference, seconds, chosen-k agreement."""
    frame = pd.DataFrame(rows)
    if "error" not in frame:
        frame["error"] = np.nan
    summaries = []
    for name, group in frame.groupby("case", sort=False):
        ok = group[group["error"].isna()]
        line = {"summary": True, "case": name, "seeds": len(group), "refused": int(group["error"].notna().sum()),
                "k": int(group["k"].iloc[0]), "baseline_ari": round(float(group["baseline_ari"].mean()), 4)}
        if len(ok):
            line |= {"ari": round(float(ok["ari"].mean()), 4),
                     "ari_sd": round(float(ok["ari"].std(ddof=1)), 4) if len(ok) > 1 else 0.0,
                     "difference": round(float(ok["ari"].mean() - group["baseline_ari"].mean()), 4),
                     "seconds": round(float(ok["seconds"].mean()), 1),
                     "k_chosen": [int(k) for k in ok["k_chosen"]],
                     "k_within_1": int((abs(ok["k_chosen"] - ok["k"]) <= 1).sum()),
                     "ari_chosen_k": round(float(ok["ari_chosen_k"].mean()), 4)}
        summaries.append(line)
    return summaries


def markdown(summaries: list[dict]) -> str:
    lines = ["| case | k | spavae ARI (mean +- SD) | baseline | difference | k chosen | ARI at chosen k | seconds |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for s in summaries:
        if "ari" not in s:
            lines.append(f"| {s['case']} | {s['k']} | refused ({s['refused']}/{s['seeds']}) | {s['baseline_ari']:.3f} "
                         "| | | | |")
            continue
        refused = f" ({s['refused']} refused)" if s["refused"] else ""
        lines.append(f"| {s['case']} | {s['k']} | {s['ari']:.3f} +- {s['ari_sd']:.3f}{refused} | "
                     f"{s['baseline_ari']:.3f} | {s['difference']:+.3f} | {s['k_chosen']} | {s['ari_chosen_k']:.3f} | "
                     f"{s['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--cases", nargs="*", help="case names to run (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument("--panel", type=Path, default=SHARED / "panel", help="folder of panel .h5ad sections")
    parser.add_argument("--dlpfc", type=Path, default=SHARED / "dlpfc", help="folder of the DLPFC .h5 sections")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="SpaVAE.train option, VALUE read as JSON (repeatable)")
    parser.add_argument("--init", action="append", default=[], metavar="KEY=VALUE",
                        help="SpaVAE model option, VALUE read as JSON (repeatable)")
    parser.add_argument("--latents", type=Path, help="folder to save each run's latent, labels and coordinates")
    parser.add_argument("--summarize", type=Path, help="summarise the per-seed lines of an earlier run's output")
    args = parser.parse_args()
    if args.summarize:
        rows = [json.loads(line) for line in args.summarize.read_text().splitlines()
                if line.startswith("{") and '"summary"' not in line]
        summaries = summarize(rows)
        for line in summaries:
            print(json.dumps(line))
        print(markdown(summaries))
        return
    names = case_names(args.panel, args.dlpfc)
    if args.list:
        print("\n".join(names))
        return
    unknown = sorted(set(args.cases or []) - set(names))
    if unknown:
        parser.error(f"unknown case(s) {unknown}; --list shows the {len(names)} cases")
    torch.set_num_threads(args.threads)
    model_options, train_options = key_values(args.init), key_values(args.set)
    rows = []
    for name in args.cases or names:
        kind, argument = names[name]
        for seed in range(args.seeds):
            row = run_case(name, kind, argument, seed, model_options, train_options, args.latents)
            row |= {"threads": args.threads, "spavae": spavae.__version__}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summaries = summarize(rows)
    for line in summaries:
        print(json.dumps(line), flush=True)
    print(markdown(summaries), flush=True)


if __name__ == "__main__":
    main()
