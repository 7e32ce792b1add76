"""The number of domains, domain colours, and the analysis commands end to end on one tiny trained run."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.colors import is_color_like
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from sklearn.metrics import roc_auc_score, silhouette_score
from sklearn.neighbors import kneighbors_graph
from threadpoolctl import threadpool_limits

import spavae
from spavae.analysis import (choose_n_domains, cluster_domains, count_leiden_communities, domain_colors, find_domains,
                             spatial_coherence)
from spavae.analysis.svg import spatial_scores
from spavae.cli import build_parser, main
from spavae.cli.domains import describe_choice

N_DOMAINS = 3
HEX = re.compile(r"^#[0-9a-f]{6}$")


def run_cli(argv: list[str]) -> tuple[int, str]:
    """``spavae ARGV``: exit code and standard output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue()


@pytest.fixture(scope="module", autouse=True)
def _one_openmp_thread():
    """KMeans on a few hundred spots is 10x slower with OpenMP threads competing for a busy machine."""
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def section():
    """196 simulated spots, 30 genes, 3 planted domains with strong markers."""
    return spavae.simulate_spatial_counts(n_rows=14, n_cols=14, n_genes=30, n_domains=N_DOMAINS, marker_lfc=1.5,
                                          mean_count=2.0, seed=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, section):
    """`spavae run` (30 epochs of MIN_STEPS_PER_EPOCH = 7 steps: this section has one batch per pass) on the section
    saved without its labels; the labels go to truth.csv."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("cli_analyses")
    unlabelled = section.copy()
    del unlabelled.obs["ground_truth"]
    unlabelled.write_h5ad(root / "data.h5ad")
    section.obs[["ground_truth"]].to_csv(root / "truth.csv")
    code, printed = run_cli(["run", str(root / "data.h5ad"), "--out", str(root / "run"), "--epochs", "30",
                             "--lr", "3e-2", "--quiet", "--threads", "1"])
    assert code == 0
    return root, root / "run", printed


# ------------------------------------------------------------------ number of domains
def test_spatial_coherence_matches_a_hand_count():
    line = np.column_stack([np.arange(10.0), np.zeros(10)])
    labels = np.array([0] * 5 + [1] * 5)
    # 2 nearest neighbours: the two spots at the boundary agree with 1 of 2, the other 8 with both -> 0.9;
    # shuffled labels agree half the time -> (0.9 - 0.5) / (1 - 0.5)
    assert spatial_coherence(labels, line, n_neighbors=2) == pytest.approx(0.8)
    # alternating labels: only the two end spots agree with one neighbour (spot 2 or 7) -> 0.1 observed
    assert spatial_coherence(np.array([0, 1] * 5), line, n_neighbors=2) == pytest.approx((0.1 - 0.5) / 0.5)
    with pytest.raises(ValueError, match="n_neighbors"):
        spatial_coherence(labels, line, n_neighbors=10)


def separated_domains_latent(n_planted: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A latent whose planted domains are far apart (distance 4.2 against a spread of 0.5 per dimension)."""
    adata = spavae.simulate_spatial_counts(n_rows=16, n_cols=16, n_genes=10, n_domains=n_planted, seed=n_planted)
    truth = adata.obs["ground_truth"].cat.codes.to_numpy()
    rng = np.random.default_rng(0)
    return 3.0 * np.eye(n_planted, 10)[truth] + 0.5 * rng.normal(size=(adata.n_obs, 10)), truth, adata.obsm["spatial"]


@pytest.mark.parametrize("criterion", ["leiden", "silhouette"])
@pytest.mark.parametrize("n_planted", [3, 4, 6])
def test_choose_n_domains_finds_the_planted_number_on_a_separating_latent(n_planted, criterion):
    latent, truth, locations = separated_domains_latent(n_planted)
    k, table = choose_n_domains(latent, locations, k_range=range(2, 10), criterion=criterion)
    assert k == n_planted
    if criterion == "leiden":
        assert table.attrs["leiden_communities"] == n_planted
    assert list(table.index) == list(range(2, 10)) and table["chosen"].sum() == 1 and table.loc[k, "chosen"]
    # at the planted k KMeans recovers the domains, so the silhouette is that of the true labels
    assert table.loc[k, "silhouette"] == pytest.approx(silhouette_score(latent, truth))
    assert table.loc[k, "spatial_coherence"] == pytest.approx(spatial_coherence(truth, locations))


def test_the_leiden_count_is_brought_into_the_range_and_said_so():
    latent, _, locations = separated_domains_latent(3)
    knn = kneighbors_graph(latent, 20)  # three domains apart: three pieces of the graph, and three communities
    assert connected_components(knn + knn.T)[0] == 3 == count_leiden_communities(latent)
    k, table = choose_n_domains(latent, locations, k_range=range(4, 8))
    assert k == 4 and table.attrs["leiden_communities"] == 3 and table.loc[4, "chosen"] and table["chosen"].sum() == 1
    assert describe_choice(k, "leiden", table).startswith(
        "4 domains: the latent's graph has 3 Leiden communities at resolution 0.3, brought into k = 4..7 ")
    k, table = choose_n_domains(latent, locations, k_range=range(2, 8))
    assert describe_choice(k, "leiden", table).startswith(
        "3 domains: the latent's graph has 3 Leiden communities at resolution 0.3 (")
    with pytest.raises(ValueError, match="criterion must be one of"):
        choose_n_domains(latent, locations, criterion="gap")
    with pytest.raises(ValueError, match="resolution must be positive"):
        count_leiden_communities(latent, resolution=0.0)


def test_cluster_domains_takes_the_number_from_labelled_spots_only():
    adata = spavae.simulate_spatial_counts(n_rows=12, n_cols=12, n_genes=10, n_domains=3, seed=3)
    codes = adata.obs["ground_truth"].cat.codes.to_numpy()
    latent = 3.0 * np.eye(3, 4)[codes] + 0.3 * np.random.default_rng(0).normal(size=(adata.n_obs, 4))
    locations = adata.obsm["spatial"]
    unlabelled = np.array(["NA"] * (adata.n_obs - 1) + [None], dtype=object)
    found = cluster_domains(latent, locations, None, truth=unlabelled, k_range=range(2, 5), n_init=2)
    assert found.chosen_by == "leiden" and found.n_domains == 3 and found.scores is None
    assert found.selection is not None and found.refined is None
    partly = np.where(np.arange(adata.n_obs) % 2 == 0, codes.astype(str), "NA").astype(object)
    found = cluster_domains(latent, locations, None, refine="hexagon", truth=partly, n_init=2)
    assert found.chosen_by == "labels" and found.n_domains == 3 and found.selection is None
    assert set(found.scores) == {"labels", "refined"} and found.scores["labels"]["n_scored"] == (adata.n_obs + 1) // 2
    assert found.scores["labels"]["ari"] == pytest.approx(1.0)
    assert cluster_domains(latent, None, 4, n_init=2).chosen_by == "given"
    with pytest.raises(ValueError, match="need the spot locations"):
        cluster_domains(latent, None, "auto")


def test_choose_n_domains_rejects_a_bad_range():
    latent = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(ValueError, match="k_range"):
        choose_n_domains(latent, latent[:, :2], k_range=range(1, 4))
    with pytest.raises(ValueError, match="k_range"):
        choose_n_domains(latent, latent[:, :2], k_range=[3, 20])


def test_run_without_labels_chooses_and_reports_the_number_of_domains(trained):
    _, run, printed = trained
    metrics = json.loads((run / "metrics.json").read_text())
    table = pd.read_csv(run / "n_domains_selection.csv", index_col="k")
    assert metrics["n_domains_chosen_by"] == "leiden"
    assert metrics["n_domains"] == int(table.index[table["chosen"]][0])
    assert list(table.index) == list(range(3, 13))
    count = int(re.search(rf"{metrics['n_domains']} domains: the latent's graph has (\d+) Leiden communities",
                          printed).group(1))
    assert metrics["n_domains"] == min(max(count, 3), 12)
    results = ad.read_h5ad(run / "results.h5ad")
    assert len(results.obs["spavae_domain"].cat.categories) == metrics["n_domains"]


def test_run_reports_the_active_dimensions_of_its_latent(trained):
    _, run, printed = trained
    latent = pd.read_csv(run / "latent.csv", index_col=0)
    variance = latent.var(ddof=0)
    gp_columns = [c for c in latent.columns if "gp" in c.lower()]
    assert len(gp_columns) == 2
    expected = {"gp": int((variance[gp_columns] > 0.01).sum()),
                "gaussian": int((variance.drop(gp_columns) > 0.01).sum())}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["active_dimensions"] == expected
    assert (f"latent used: {sum(expected.values())} of 10 dimensions active ({expected['gp']} of 2 GP, "
            f"{expected['gaussian']} of 8 Gaussian") in printed


# ------------------------------------------------------------------ colours
def assert_scanpy_colours(adata: ad.AnnData, key: str) -> None:
    categories = list(adata.obs[key].cat.categories)
    colours = list(adata.uns[f"{key}_colors"])
    assert len(colours) == len(categories)
    assert all(HEX.match(c) and is_color_like(c) for c in colours), colours
    assert len(set(colours)) == len(colours)


def test_find_domains_writes_one_hex_colour_per_category(section):
    adata = section.copy()
    adata.obsm["X_spavae"] = np.eye(N_DOMAINS)[adata.obs["ground_truth"].cat.codes] \
        + 0.1 * np.random.default_rng(0).normal(size=(adata.n_obs, N_DOMAINS))
    find_domains(adata, 3, refine="hexagon", n_init=2)
    for key in ("spavae_domains", "spavae_domains_unrefined"):
        assert_scanpy_colours(adata, key)
        assert list(adata.uns[f"{key}_colors"]) == domain_colors(3) == ["#1f77b4", "#ff7f0e", "#2ca02c"]
    find_domains(adata, "auto", k_range=range(2, 6), n_init=2, key_added="auto")
    assert adata.uns["auto"]["n_domains"] == N_DOMAINS and adata.uns["auto"]["selection"]["rule"] == "leiden"
    assert_scanpy_colours(adata, "auto")
    with pytest.raises(ValueError, match="'auto'"):
        find_domains(adata, "many")


def test_domain_colours_stay_distinct_beyond_the_qualitative_palettes():
    for n in (1, 10, 11, 20, 21, 40):
        colours = domain_colors(n)
        assert len(colours) == n == len(set(colours)) and all(HEX.match(c) for c in colours)


def test_run_results_carry_colours_for_its_domain_columns(trained):
    _, run, _ = trained
    results = ad.read_h5ad(run / "results.h5ad")
    for key in ("spavae_domain", "spavae_domain_refined"):
        assert_scanpy_colours(results, key)


# ------------------------------------------------------------------ commands
@pytest.mark.parametrize("command,outputs", [
    ("domains", ["domains.csv", "domains.h5ad", "domains.png", "summary.json", "n_domains_selection.csv"]),
    ("de", ["de_<group1>_vs_<group2>.csv", "volcano_<group1>_vs_<group2>.png", "summary.csv"]),
    ("svg", ["svg.csv", "svg.png", "svg_model.pt", "--permutations"]),
    ("predict", ["predictions.csv", "predictions.h5ad", "predictions.png", "--x-column", "--genes"]),
    ("enhance", ["enhanced.h5ad", "enhanced.png", "--plot-gene"]),
])
def test_help_says_what_comes_out(command, outputs, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    for item in [*outputs, "SOURCE", "--model", "--out", "--seed"]:
        assert item in text, item


def test_domains_command(trained, section):
    _, run, _ = trained
    code, printed = run_cli(["domains", str(run), "--n-domains", "auto", "--k-range", "2:8", "--threads", "1"])
    assert code == 0 and "wrote" in printed
    folder = run / "domains"
    summary = json.loads((folder / "summary.json").read_text())
    table = pd.read_csv(folder / "n_domains_selection.csv", index_col="k")
    assert summary["n_domains"] == int(table.index[table["chosen"]][0])
    assert abs(summary["n_domains"] - N_DOMAINS) <= 1  # a short training: the planted number or one off
    domains = pd.read_csv(folder / "domains.csv", index_col="spot")
    assert list(domains.index) == list(section.obs_names)
    assert domains["spavae_domains"].nunique() == summary["n_domains"]
    exported = ad.read_h5ad(folder / "domains.h5ad")
    assert_scanpy_colours(exported, "spavae_domains")
    np.testing.assert_array_equal(exported.obs["spavae_domains"].astype(int), domains["spavae_domains"])
    assert "spavae_denoised" in ad.read_h5ad(run / "results.h5ad").layers and "spavae_denoised" not in exported.layers
    assert (folder / "domains.png").read_bytes()[:4] == b"\x89PNG"

    code, _ = run_cli(["domains", str(run), "--n-domains", "3", "--method", "leiden", "--refine", "hexagon",
                       "--out", str(run / "leiden"), "--threads", "1"])
    leiden = pd.read_csv(run / "leiden" / "domains.csv", index_col="spot")
    assert code == 0 and list(leiden.columns) == ["spavae_domains", "spavae_domains_unrefined"]
    assert leiden["spavae_domains_unrefined"].nunique() == 3
    assert "resolution" in json.loads((run / "leiden" / "summary.json").read_text())


def test_de_command_ranks_the_planted_markers(trained, section):
    root, run, _ = trained
    code, printed = run_cli(["de", str(run), "--labels", str(root / "truth.csv"), "--groupby", "ground_truth",
                             "--n-draws", "2000", "--threads", "1"])
    assert code == 0 and "column 'ground_truth'" in printed
    summary = pd.read_csv(run / "de" / "summary.csv")
    assert list(summary["group1"]) == [f"domain{d}" for d in range(N_DOMAINS)]
    assert summary["n_spots1"].sum() == section.n_obs
    for d in range(N_DOMAINS):
        table = pd.read_csv(run / "de" / f"de_domain{d}_vs_rest.csv", index_col="gene")
        assert sorted(table.index) == sorted(section.var_names)  # one row per gene
        assert (np.diff(table["bayes_factor"].to_numpy()) <= 0).all()
        planted = section.varm["domain_effect"][:, d] > 0
        assert roc_auc_score(planted, table["LFC"].reindex(section.var_names)) > 0.85
        assert (run / "de" / f"volcano_domain{d}_vs_rest.png").stat().st_size > 0


def test_de_command_two_groups_and_default_groups(trained):
    root, run, _ = trained
    out = run / "de_pair"
    code, _ = run_cli(["de", str(run), "--labels", str(root / "truth.csv"), "--group1", "domain0",
                       "--group2", "domain1,domain2", "--n-draws", "500", "--out", str(out), "--threads", "1"])
    summary = pd.read_csv(out / "summary.csv")
    assert code == 0 and (out / "de_domain0_vs_domain1+domain2.csv").is_file()
    assert summary.loc[0, "group2"] == "domain1+domain2" and summary.loc[0, "n_spots2"] > 0
    # without groups: the refined domains of `spavae run` (or those of `spavae domains` once written)
    code, printed = run_cli(["de", str(run), "--n-draws", "200", "--out", str(run / "de_default"), "--threads", "1"])
    assert code == 0 and "groups:" in printed
    assert len(pd.read_csv(run / "de_default" / "summary.csv")) >= 2


def test_svg_command_ranks_with_a_linear_decoder_model(trained, section):
    _, run, _ = trained
    code, printed = run_cli(["svg", str(run), "--epochs", "5", "--beta", "1", "--quiet", "--threads", "1"])
    assert code == 0 and "spaLDVAE" in printed
    table = pd.read_csv(run / "svg" / "svg.csv", index_col="gene")
    assert sorted(table.index) == sorted(section.var_names)
    assert list(table["rank"]) == list(range(1, section.n_vars + 1))
    assert (np.diff(table["spatial_score"].to_numpy()) <= 0).all()
    results = ad.read_h5ad(run / "results.h5ad")
    model = spavae.SpaVAE.load(run / "svg" / "svg_model.pt", results)
    expected = spatial_scores(model)["spatial_score"]
    np.testing.assert_allclose(table["spatial_score"], expected.reindex(table.index), rtol=1e-5)
    assert (run / "svg" / "svg.png").read_bytes()[:4] == b"\x89PNG"


def test_svg_command_refuses_what_it_cannot_do_before_training(trained, capsys):
    _, run, _ = trained
    code, _ = run_cli(["svg", str(run), "--statistic", "spatial_variance", "--permutations", "3"])
    assert code == 2 and "permutation p-values of 'spatial_variance'" in capsys.readouterr().err
    code, _ = run_cli(["svg", str(run), "--permutations", "3", "--num-cpus", "2"])
    assert code == 2 and "add --ray" in capsys.readouterr().err


def test_predict_command_one_row_per_location(trained, section):
    root, run, _ = trained
    spots = section.obsm["spatial"][[0, 50, 120]]
    between = spots[:2].mean(0, keepdims=True)
    locations = pd.DataFrame({"name": ["s0", "s50", "s120", "mid"], "x": np.r_[spots[:, 0], between[:, 0]],
                              "y": np.r_[spots[:, 1], between[:, 1]]})
    locations.to_csv(root / "new.csv", index=False)
    code, _ = run_cli(["predict", str(run), str(root / "new.csv"), "--genes", "gene3,gene7", "--n-samples", "5",
                       "--threads", "1"])
    assert code == 0
    table = pd.read_csv(run / "predict" / "predictions.csv")
    assert len(table) == 4 and list(table["name"]) == ["s0", "s50", "s120", "mid"]
    assert list(table.columns[-2:]) == ["gene3", "gene7"] and (table[["gene3", "gene7"]] > 0).all().all()
    assert list(table["nearest_spot"][:3]) == ["spot0", "spot50", "spot120"]
    # at a training spot the prediction is the spot's own latent (GP posterior given all spots, its Gaussian dims)
    results = ad.read_h5ad(run / "results.h5ad")
    latent = table.filter(like="latent_").to_numpy()
    np.testing.assert_allclose(latent[:3], results.obsm["X_spavae"][[0, 50, 120]], rtol=1e-4, atol=1e-5)
    predicted = ad.read_h5ad(run / "predict" / "predictions.h5ad")
    assert predicted.shape == (4, section.n_vars)


def test_enhance_command_writes_five_sub_spots_per_spot(trained, section):
    _, run, _ = trained
    code, _ = run_cli(["enhance", str(run), "--plot-gene", "gene3", "--n-samples", "5", "--threads", "1"])
    assert code == 0
    enhanced = ad.read_h5ad(run / "enhance" / "enhanced.h5ad")
    assert enhanced.shape == (5 * section.n_obs, section.n_vars)
    assert (enhanced.obs["parent_spot"].value_counts() == 5).all()
    centre = (enhanced.obs["offset"] == "center").to_numpy()
    np.testing.assert_allclose(enhanced.obsm["spatial"][centre], section.obsm["spatial"], atol=1e-8)
    # the sub-spots sit around their spot, closer to it than to any other spot
    _, nearest = cKDTree(section.obsm["spatial"]).query(enhanced.obsm["spatial"])
    np.testing.assert_array_equal(section.obs_names[nearest], enhanced.obs["parent_spot"].astype(str))
    assert (run / "enhance" / "enhanced.png").stat().st_size > 0


def test_a_results_h5ad_with_a_model_file_is_a_source(trained, section):
    root, run, _ = trained
    locations = pd.DataFrame({"x": section.obsm["spatial"][:5, 0], "y": section.obsm["spatial"][:5, 1]})
    locations.to_csv(root / "five.csv", index=False)
    code, printed = run_cli(["predict", str(run / "results.h5ad"), str(root / "five.csv"), "--model",
                             str(run / "model.pt"), "--genes", "gene0", "--n-samples", "2", "--threads", "1"])
    assert code == 0 and f"wrote {run / 'predict'}/" in printed  # the default folder is beside the .h5ad
    assert len(pd.read_csv(run / "predict" / "predictions.csv")) == 5


def test_commands_read_a_train_run_folder(tmp_path, section):
    data = tmp_path / "section.h5ad"
    section.write_h5ad(data)
    config = {"name": "tiny", "save_dir": str(tmp_path / "experiments"),
              "data": {"path": str(data), "label_key": "ground_truth"},
              "model": {"encoder_layers": [16, 8], "decoder_layers": [16]},
              "trainer": {"max_epochs": 3, "threads": 1, "progress": False},
              "evaluation": {"kmeans_n_init": 2, "denoise_samples": 2, "n_marker_genes": 2, "umap": False}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["train", "-c", str(tmp_path / "config.json")]) == 0
    run = tmp_path / "experiments" / "tiny"
    code, printed = run_cli(["domains", str(run), "--threads", "1"])
    assert code == 0 and f"{N_DOMAINS} domains (the number of labelled domains)" in printed
    summary = json.loads((run / "results" / "domains" / "summary.json").read_text())
    assert summary["n_domains_chosen_by"] == "labels"
    assert summary["scores"]["spavae_domains"]["n_scored"] == section.n_obs
    # without groups, de compares the domains `spavae domains` just wrote to results/domains/
    code, printed = run_cli(["de", str(run), "--n-draws", "200", "--threads", "1"])
    assert code == 0 and "groups: column 'spavae_domains'" in printed


@pytest.mark.parametrize("argv,message", [
    (["domains", "{root}/missing"], "not found"),
    (["de", "{run}/results.h5ad", "--groupby", "spavae_domain"], "--model"),
    (["enhance", "{run}/results.h5ad", "--model", "{root}/no_model.pt"], "no_model.pt not found"),
    (["predict", "{run}", "{root}/bad.csv"], "no column(s) ['x', 'y']"),
    (["predict", "{run}", "{root}/new_xy.csv", "--genes", "gene1,NOPE"], "unknown gene(s) ['NOPE']"),
    (["de", "{run}", "--groupby", "nope"], "no such obs column"),
])
def test_bad_input_is_one_line_and_exit_code_2(trained, argv, message, capsys):
    root, run, _ = trained
    pd.DataFrame({"a": [1.0], "b": [2.0]}).to_csv(root / "bad.csv", index=False)
    pd.DataFrame({"x": [1.0], "y": [2.0]}).to_csv(root / "new_xy.csv", index=False)
    capsys.readouterr()
    assert main([a.format(root=root, run=run) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not Path(root / "missing").exists()
